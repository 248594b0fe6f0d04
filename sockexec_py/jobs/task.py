"""One running task: its steps run as broker sessions in the order their
dependencies allow (the rules are :mod:`.steps`'), each with its own output,
progress and exit, recorded as it happens.

Who owns what: :class:`RunningTask` is the runner's record of a task that runs
(it takes the place a :class:`~.session.RunningJob` has for a job of one program);
:func:`run_task` runs in the runner's task for it and owns a nursery with one
task per running step. Everything that changes a step happens in the trio thread,
in memory first (so a cancel and a start cannot race) and then in the store.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

import trio

from sockexec_py.client import BrokerUnavailable
from sockexec_py.events import Exited

from .errors import IllegalTransition, StoreUnavailable
from .model import Job, JobState, broken_session_reason, final_state
from .output import OutputStore, RunOutput, output_key
from .progress import Progress
from .session import RunningJob, one_line, run_session
from .steps import (
    Step,
    StepState,
    dependents_closure,
    dependents_of,
    task_end,
    task_progress,
)
from .store import Store

__all__ = ["CANCELLED_STEP_REASON", "RunningTask", "TaskConfig", "record_step_end", "run_task"]

log = logging.getLogger("sockexec_py.jobs")
T = TypeVar("T")

CANCELLED_STEP_REASON = "cancelled before it started"
CANCELLED_TASK_REASON = "the task was cancelled before this step started"


@dataclass(frozen=True, slots=True)
class TaskConfig:
    socket_path: str
    #: Steps of one task running at once.
    max_parallel: int
    kill_grace: float
    retry_initial: float
    retry_max: float


class RunningTask(RunningJob):
    """A task that runs: its steps as recorded (kept current in memory), the
    running ones' sessions, and :attr:`changed`, set (and replaced) at every step
    change, which followers of a step's output wait on."""

    def __init__(self, job: Job, output: RunOutput) -> None:
        super().__init__(job, output)
        #: Its steps, read once it was claimed (:meth:`load`).
        self.steps: list[Step] = []
        self.step_runs: dict[int, RunningJob] = {}
        self.dependents: list[list[int]] = []
        #: Set once its steps were read, or could not be (``steps`` stays empty
        #: then: a task always has one): who waits on it never waits for ever.
        self.loaded = trio.Event()
        self.changed = trio.Event()
        #: Wakes the scheduler of :func:`run_task` (a step cancelled while queued).
        self.wake: Callable[[], None] = lambda: None
        #: Step ends the store refused (a full disk): recorded, in order, by the
        #: scheduler before it starts anything else (:func:`_record_kept`).
        self.unrecorded: list[list[Step]] = []

    def load(self, steps: list[Step]) -> None:
        self.steps = steps
        self.dependents = dependents_of([step.depends_on for step in steps])
        self.loaded.set()

    def snapshot(self) -> Job:
        """The task as it is now: output sizes summed over its steps (running ones
        live), the progress of steps ended of steps."""
        steps = [self.current_step(step.index) for step in self.steps]
        return replace(
            self.job,
            stdout_bytes=sum(step.stdout_bytes for step in steps),
            stderr_bytes=sum(step.stderr_bytes for step in steps),
            dropped_bytes=sum(step.dropped_bytes for step in steps),
            truncated=any(step.truncated for step in steps),
            progress=task_progress(steps),
        )

    def current_step(self, index: int) -> Step:
        """A step with its live sizes and progress while it runs."""
        step = self.steps[index]
        run = self.step_runs.get(index)
        if run is None:
            return step
        live = run.snapshot()
        return replace(
            step,
            stdout_bytes=live.stdout_bytes,
            stderr_bytes=live.stderr_bytes,
            dropped_bytes=live.dropped_bytes,
            truncated=live.truncated,
            progress=live.progress,
        )

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def step_index(self, name: str) -> int | None:
        for step in self.steps:
            if step.name == name:
                return step.index
        return None

    def skip_after(self, index: int, now: float) -> list[Step]:
        """Mark the queued dependents of a step that did not succeed ``skipped``
        (in memory); returns them, to be recorded."""
        states = {step.index: step.state for step in self.steps}
        name = self.steps[index].name
        how = self.steps[index].state.value
        skipped = []
        for dependent in dependents_closure(self.dependents, index, states):
            step = replace(
                self.steps[dependent],
                state=StepState.SKIPPED,
                ended_at=now,
                reason=f"skipped: step {name!r} {how}",
            )
            self.steps[dependent] = step
            skipped.append(step)
        return skipped


StepSaver = Callable[[RunningTask, RunningJob, int], Awaitable[object]]


async def run_task(
    task: RunningTask,
    store: Store,
    outputs: OutputStore,
    config: TaskConfig,
    clock: Callable[[], float],
    save_progress: StepSaver,
) -> tuple[JobState, str | None, int | None, str | None]:
    """Run the task's queued steps (rule 3 of :mod:`.steps`) until none is left to
    run; returns the task's end (state, reason, exitcode, termsig).

    Error handling: a step whose session breaks fails that step; a broker that
    cannot be reached delays the step (backoff) until it can, or it is cancelled.
    Resource handling: cancelled (the gateway stops), running steps' sessions close
    (the broker terminates their programs); the next start records them ``lost``.
    """
    waiting = {
        step.index: sum(
            1 for dep in step.depends_on if task.steps[dep].state is not StepState.SUCCEEDED
        )
        for step in task.steps
        if step.state is StepState.QUEUED
    }
    ready = deque(index for index, count in waiting.items() if count == 0)
    # Step ends (their index) and wake-ups (-1: a step cancelled while queued, or
    # the task cancelled) come through one channel, handled one at a time.
    wake, woken = trio.open_memory_channel[int](math.inf)
    task.wake = lambda: wake.send_nowait(-1)
    running = 0

    async def run_step(index: int) -> None:
        try:
            await _run_step(task, index, store, outputs, config, clock, save_progress)
        finally:
            wake.send_nowait(index)

    async with trio.open_nursery() as nursery:
        while True:
            await _record_kept(task, store, config)
            while ready and running < config.max_parallel and not task.cancel_requested:
                index = ready.popleft()
                if task.steps[index].state is not StepState.QUEUED:
                    continue  # cancelled while it waited
                step = task.steps[index]
                started = await _written(
                    partial(_start_step, task, store, step), config, f"the start of {step.name}"
                )
                if started is None or not _startable(task, index):
                    continue  # cancelled meanwhile: it never runs (its end comes after)
                task.steps[index] = started
                # Its session's record is there before anyone sees it running: a
                # cancel from now on terminates it (before it connects: it never
                # does), and a follower waits on its output instead of reading no
                # file and ending.
                task.step_runs[index] = _step_run(task, index, outputs)
                task.notify()
                running += 1
                nursery.start_soon(run_step, index)
            if running == 0 and (not ready or task.cancel_requested):
                break
            index = await woken.receive()
            if index < 0:
                continue
            running -= 1
            if task.steps[index].state is StepState.SUCCEEDED:
                for dependent in task.dependents[index]:
                    if dependent in waiting:
                        waiting[dependent] -= 1
                        if waiting[dependent] == 0:
                            ready.append(dependent)
    now = clock()
    left = [
        replace(step, state=StepState.CANCELLED, ended_at=now, reason=CANCELLED_TASK_REASON)
        for step in task.steps
        if step.state is StepState.QUEUED
    ]
    if left:
        for step in left:
            task.steps[step.index] = step
        task.unrecorded.append(left)
        task.notify()
    await _record_kept(task, store, config)
    return task_end(task.steps, cancel_requested=task.cancel_requested)


async def record_step_end(task: RunningTask, store: Store, ended: list[Step]) -> None:
    """Record a step's end (and its skipped dependents) now, or keep it for the
    scheduler when the store refuses it or earlier ends still wait (their order)."""
    if not task.unrecorded:
        try:
            await store.end_steps(task.job, ended)
            return
        except StoreUnavailable as exc:
            log.error(
                "cannot record the end of step %s of %s yet: %s", ended[0].name, task.job.id, exc
            )
        except Exception as exc:  # a bug or a refusal: said, not the task's end
            log.error("cannot record the end of step %s of %s: %s", ended[0].name, task.job.id, exc)
            return
    task.unrecorded.append(ended)
    task.wake()


async def _record_kept(task: RunningTask, store: Store, config: TaskConfig) -> None:
    """Record the step ends kept back, in order, trying while the store refuses."""
    while task.unrecorded:
        ended = task.unrecorded[0]
        await _written(partial(store.end_steps, task.job, ended), config, "a step's end")
        task.unrecorded.pop(0)


async def _written(write: Callable[[], Awaitable[T]], config: TaskConfig, what: str) -> T:
    """``write()`` once the store takes it: while it is unavailable (a full disk,
    an I/O error) tried again with backoff; the task waits, steps that run go on."""
    delay = config.retry_initial
    while True:
        try:
            return await write()
        except StoreUnavailable as exc:
            log.error("cannot record %s yet: %s; trying again in %g s", what, exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, config.retry_max)


def _startable(task: RunningTask, index: int) -> bool:
    return task.steps[index].state is StepState.QUEUED and not task.cancel_requested


async def _start_step(task: RunningTask, store: Store, step: Step) -> Step | None:
    """Record a step's start (None: it was cancelled, before this try of it or in
    the store while the store refused the try before)."""
    if not _startable(task, step.index):
        return None
    try:
        return await store.start_step(task.job, step)
    except IllegalTransition:
        return None


def _step_run(task: RunningTask, index: int, outputs: OutputStore) -> RunningJob:
    """The session record of a step about to run, its output open."""
    step = task.steps[index]
    key = output_key(task.job.id, index)
    as_job = replace(task.job, id=key, argv=step.argv, timeout=step.timeout, progress=Progress())
    return RunningJob(as_job, outputs.open(key))


async def _run_step(
    task: RunningTask,
    index: int,
    store: Store,
    outputs: OutputStore,
    config: TaskConfig,
    clock: Callable[[], float],
    save_progress: StepSaver,
) -> None:
    """One step's broker session, then its end (and its skipped dependents) recorded."""
    step = task.steps[index]
    run = task.step_runs[index]
    run.stdin = await store.step_stdin(task.job.id, index)
    delay = config.retry_initial
    exitcode: int | None = None
    termsig: str | None = None
    exited: Exited | None
    reason: str | None
    try:
        while True:
            if run.cancel_requested:  # before it connected: it never starts
                exited = None
                reason = CANCELLED_TASK_REASON if task.cancel_requested else CANCELLED_STEP_REASON
                break
            try:
                exited, reason = await run_session(
                    run,
                    config.socket_path,
                    run.stdin,
                    on_connected=lambda: None,
                    alongside=lambda r: save_progress(task, r, index),
                )
            except BrokerUnavailable as exc:
                if run.cancel_requested:
                    continue  # ended as above
                log.warning(
                    "broker unavailable, step %s of %s waits: %s", step.name, task.job.id, exc
                )
                with trio.move_on_after(delay):
                    await run.cancelled.wait()
                delay = min(delay * 2, config.retry_max)
                run.session_scope = trio.CancelScope()  # one scope per session
                continue
            except Exception as exc:
                log.warning(
                    "job %s step %s: the broker session failed: %s", task.job.id, step.name, exc
                )
                exited, reason = None, broken_session_reason(one_line(exc))
            break
        state = final_state(exited, cancel_requested=run.cancel_requested)
        if exited is not None:
            exitcode, termsig = exited.exitcode, exited.termsig
    except BaseException:
        state, reason = JobState.LOST, "lost: the gateway stopped while it ran"
        raise
    finally:
        with trio.CancelScope(shield=True):
            await run.output.flush()
            run.parser.end()
            live = run.snapshot()
            now = clock()
            ended = replace(
                step,
                state=StepState(state.value),
                ended_at=now,
                exitcode=exitcode,
                termsig=termsig,
                reason=reason,
                stdout_bytes=live.stdout_bytes,
                stderr_bytes=live.stderr_bytes,
                dropped_bytes=live.dropped_bytes,
                truncated=live.truncated,
                progress=live.progress,
            )
            task.steps[index] = ended
            skipped = task.skip_after(index, now) if state is not JobState.SUCCEEDED else []
            if state is not JobState.LOST:
                await record_step_end(task, store, [ended, *skipped])
            await run.output.close()
            del task.step_runs[index]
            run.done.set()
            task.notify()
