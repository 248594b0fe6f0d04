"""Multi-step tasks, sans-IO: the steps of a submission validated into a graph, the
step state machine, and how a task's state follows from its steps'.

Rules of steps, all enforced here and nowhere else:

1. A task is a job with ``steps`` and a ``mode``: ``sequential`` (each step
   depends on the one before), ``parallel`` (no dependencies) or ``dag`` (each
   step's ``depends_on``, by name). Whatever the mode, the graph is stored as each
   step's dependencies by index, and one scheduler runs it (:mod:`.task`).
2. The graph is checked whole at submit: unique names, known dependencies, no cycle.
   The error names the step (and the cycle), so the answer is a 400 a user can act on.
3. A step is born ``queued``; it runs once every dependency ``succeeded``; it ends
   ``succeeded`` (exit 0), ``failed``, ``cancelled`` (asked, one step or the whole
   task) or ``lost`` (the gateway stopped while it ran). A step whose dependency
   ended otherwise is ``skipped``, and so, in turn, are its own dependents.
4. A task ends when no step is left to run: ``succeeded`` when every step did,
   ``cancelled`` when the task was cancelled, ``failed`` when a step failed or was
   cancelled, and ``lost`` when the only steps that did not succeed were lost
   (and skipped after them). A task found running at start-up loses its running
   steps and goes back to the queue if steps remain to run (:func:`resume_after_loss`).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .errors import InvalidField
from .model import JobState, elapsed
from .progress import Progress

__all__ = [
    "MAX_STEPS",
    "MODES",
    "Step",
    "StepRequest",
    "StepState",
    "build_graph",
    "dependents_closure",
    "task_outcome",
]

Mode = Literal["sequential", "parallel", "dag"]
MODES: tuple[Mode, ...] = ("sequential", "parallel", "dag")
#: The most steps one task may have.
MAX_STEPS = 1000


class StepState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    LOST = "lost"


STEP_END_STATES = frozenset(
    {
        StepState.SUCCEEDED,
        StepState.FAILED,
        StepState.CANCELLED,
        StepState.SKIPPED,
        StepState.LOST,
    }
)


@dataclass(frozen=True, slots=True)
class StepRequest:
    """One step as submitted and validated; ``depends_on`` holds indexes (rule 1)."""

    name: str
    argv: tuple[str, ...]
    depends_on: tuple[int, ...]
    stdin: bytes
    timeout: float | None


@dataclass(frozen=True, slots=True)
class Step:
    """One step as recorded (the task's own record is a :class:`~.model.Job`)."""

    index: int
    name: str
    argv: tuple[str, ...]
    depends_on: tuple[int, ...]
    timeout: float | None
    state: StepState
    started_at: float | None = None
    ended_at: float | None = None
    exitcode: int | None = None
    termsig: str | None = None
    reason: str | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    dropped_bytes: int = 0
    truncated: bool = False
    progress: Progress = field(default_factory=Progress)

    @property
    def finished(self) -> bool:
        return self.state in STEP_END_STATES

    @property
    def duration(self) -> float | None:
        return elapsed(self.started_at, self.ended_at)


def build_graph(
    mode: Mode, names: Sequence[str], depends_on: Sequence[Sequence[str]]
) -> list[tuple[int, ...]]:
    """Each step's dependencies by index (rule 1), checked (rule 2).

    ``depends_on[i]`` are the names step ``i`` gave (only ``dag`` takes any).
    Error handling: :class:`InvalidField` naming the step: a duplicate name, an
    unknown dependency, or a cycle (``a -> b -> a``). O(steps + dependencies).
    """
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in index:
            raise InvalidField(f"steps[{i}].name", f"step name {name!r} is used twice")
        index[name] = i
    if mode == "sequential":
        return [() if i == 0 else (i - 1,) for i in range(len(names))]
    if mode == "parallel":
        return [() for _ in names]
    graph: list[tuple[int, ...]] = []
    for i, wanted in enumerate(depends_on):
        deps: list[int] = []
        for dep in wanted:
            if dep not in index:
                raise InvalidField(
                    f"steps[{i}].depends_on",
                    f"step {names[i]!r} depends on {dep!r}, which is not a step of this task",
                )
            if index[dep] not in deps:
                deps.append(index[dep])
        graph.append(tuple(deps))
    cycle = _find_cycle(graph)
    if cycle:
        path = " -> ".join(names[i] for i in [*cycle, cycle[0]])
        raise InvalidField(
            f"steps[{cycle[0]}].depends_on", f"a cycle ('a -> b': a depends on b): {path}"
        )
    return graph


def _find_cycle(graph: Sequence[Sequence[int]]) -> list[int]:
    """A cycle of the graph (each step depends on the next), or [] if none.
    Kahn's algorithm removes every step not on or behind a cycle; a walk along the
    remaining dependencies must then come back to a step it passed."""
    dependents: list[list[int]] = [[] for _ in graph]
    waiting = [len(deps) for deps in graph]
    for i, deps in enumerate(graph):
        for dep in deps:
            dependents[dep].append(i)
    ready = deque(i for i, count in enumerate(waiting) if count == 0)
    while ready:
        for after in dependents[ready.popleft()]:
            waiting[after] -= 1
            if waiting[after] == 0:
                ready.append(after)
    remaining = [i for i, count in enumerate(waiting) if count]
    if not remaining:
        return []
    seen: dict[int, int] = {}
    path: list[int] = []
    step = remaining[0]
    while step not in seen:
        seen[step] = len(path)
        path.append(step)
        step = next(dep for dep in graph[step] if waiting[dep])
    return path[seen[step] :]


def dependents_of(graph: Sequence[Sequence[int]]) -> list[list[int]]:
    """For each step, the steps that depend on it directly."""
    dependents: list[list[int]] = [[] for _ in graph]
    for i, deps in enumerate(graph):
        for dep in deps:
            dependents[dep].append(i)
    return dependents


def dependents_closure(
    dependents: Sequence[Sequence[int]], start: int, states: Mapping[int, StepState]
) -> list[int]:
    """The queued steps that depend on ``start``, directly or not (rule 3: they are
    skipped when it did not succeed)."""
    found: list[int] = []
    seen = {start}
    todo = deque(dependents[start])
    while todo:
        step = todo.popleft()
        if step in seen:
            continue
        seen.add(step)
        if states.get(step) is StepState.QUEUED:
            found.append(step)
            todo.extend(dependents[step])
    return found


TaskOutcome = Literal["succeeded", "failed", "cancelled", "lost"]


def task_outcome(states: Sequence[StepState], *, cancel_requested: bool) -> TaskOutcome:
    """The end state of a task whose steps all ended (rule 4)."""
    if cancel_requested:
        return "cancelled"
    if all(state is StepState.SUCCEEDED for state in states):
        return "succeeded"
    if any(state in (StepState.FAILED, StepState.CANCELLED) for state in states):
        return "failed"
    return "lost"


def task_reason(steps: Sequence[Step]) -> str | None:
    """One line for a task that did not succeed: the first step that failed, was
    cancelled or lost (by end time), and how many were skipped."""
    bad = [s for s in steps if s.state in (StepState.FAILED, StepState.CANCELLED, StepState.LOST)]
    if not bad:
        return None
    first = min(bad, key=lambda s: (s.ended_at or 0.0, s.index))
    how = first.state.value
    if first.state is StepState.FAILED:
        how = (
            f"failed (signal {first.termsig})"
            if first.termsig
            else f"failed (exit {first.exitcode})"
            if first.exitcode is not None
            else f"failed ({first.reason or 'no exit status'})"
        )
    skipped = sum(1 for s in steps if s.state is StepState.SKIPPED)
    more = f"; {skipped} skipped" if skipped else ""
    others = len(bad) - 1
    also = f"; {others} more did not succeed" if others else ""
    return f"step {first.name!r} {how}{also}{more}"


def task_progress(steps: Sequence[Step]) -> Progress:
    """A task's progress: steps ended of steps, titled with the last step started."""
    ended = sum(1 for s in steps if s.finished)
    started = [s for s in steps if s.started_at is not None]
    title = max(started, key=lambda s: (s.started_at or 0.0, s.index)).name if started else None
    return Progress(task=ended, tasks=len(steps), title=title)


def task_end(
    steps: Sequence[Step], *, cancel_requested: bool
) -> tuple[JobState, str | None, int | None, str | None]:
    """How a task whose steps all ended ends: its state (rule 4), reason, and the
    exit of its first step that did not succeed (0 when all did)."""
    state = JobState(task_outcome([s.state for s in steps], cancel_requested=cancel_requested))
    if state is JobState.SUCCEEDED:
        return state, None, 0, None
    reason = task_reason(steps)
    if cancel_requested:
        reason = "cancelled" + (f"; {reason}" if reason else "")
    ran = [s for s in steps if s.state is not StepState.SUCCEEDED and s.exitcode is not None]
    ran += [s for s in steps if s.termsig is not None and s not in ran]
    first = min(ran, key=lambda s: (s.ended_at or 0.0, s.index)) if ran else None
    return state, reason, first.exitcode if first else None, first.termsig if first else None
