"""What the jobs API asks of a task beyond the runner's own work: cancel it, or
one of its steps (by name), and find the step whose output is read (waiting for
it to start when followed). Works on a running task (its
:class:`~.task.RunningTask`) or on one that waits or has ended (the store)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

import trio

from .errors import IllegalTransition, JobNotFound, StoreUnavailable
from .model import Job
from .output import OutputStore, output_key
from .session import RunningJob, terminate_session
from .steps import Step, StepState
from .store import Store
from .task import CANCELLED_STEP_REASON, RunningTask, record_step_end

__all__ = ["cancel_named_step", "cancel_step", "cancel_task", "cancelled_steps", "step_to_read"]


class _Jobs(Protocol):
    async def get(self, job_id: str) -> Job: ...
    async def wait(self, job_id: str, *, started: bool = False) -> Job: ...


async def cancel_named_step(
    run: RunningJob | None,
    job: Job,
    name: str,
    store: Store,
    outputs: OutputStore,
    grace: float,
    clock: Callable[[], float],
) -> Job:
    """Cancel step ``name`` of ``job`` (see :meth:`~.runner.Runner.cancel_step`)."""
    job_id = job.id
    if isinstance(run, RunningTask):
        await run.loaded.wait()
        if not run.steps:  # they could not be read: it is not running
            raise IllegalTransition(job_id, "running", "a step cancelled")
        index = run.step_index(name)
        if index is None:
            raise JobNotFound(f"{job_id} step {name}")
        step = run.steps[index]
        if step.finished:
            raise IllegalTransition(f"{job_id} step {name!r}", step.state.value, "cancelled")
        await cancel_step(run, store, index, grace, clock)
        while not run.steps[index].finished:
            await run.changed.wait()
        return run.snapshot()
    steps = await store.steps(job_id)
    found = [step for step in steps if step.name == name]
    if not job.is_task or not found:
        raise JobNotFound(f"{job_id} step {name}")
    step = found[0]
    if step.finished or job.finished:
        raise IllegalTransition(f"{job_id} step {name!r}", step.state.value, "cancelled")
    # The task waits: record the step cancelled (and its dependents skipped), in
    # the store only if it still waits (else IllegalTransition: claimed meanwhile,
    # and the step's output, which is shared, now the running step's: left open).
    waiting = RunningTask(job, outputs.open(output_key(job_id, step.index)))
    waiting.load(steps)
    await store.end_steps(job, cancelled_steps(waiting, step.index, clock()), waiting=True)
    await waiting.output.close()  # its followers end: it never runs
    return await store.get(job_id)


async def cancel_step(
    task: RunningTask, store: Store, index: int, grace: float, clock: Callable[[], float]
) -> None:
    """Stop one step: a queued one never runs, a running one is terminated through
    the broker (its dependents are skipped when its end is recorded)."""
    if task.steps[index].state is StepState.QUEUED:
        ended = cancelled_steps(task, index, clock())
        await record_step_end(task, store, ended)
        task.wake()
        task.notify()
        return
    run = task.step_runs.get(index)
    if run is not None:
        await terminate_session(run, grace)


def cancelled_steps(task: RunningTask, index: int, now: float) -> list[Step]:
    """Mark queued step ``index`` cancelled and its dependents skipped (in
    memory); returns them, to be recorded."""
    task.steps[index] = replace(
        task.steps[index], state=StepState.CANCELLED, ended_at=now, reason=CANCELLED_STEP_REASON
    )
    return [task.steps[index], *task.skip_after(index, now)]


async def cancel_task(task: RunningTask, grace: float) -> None:
    """Cancel the whole task: no step starts any more, running ones are terminated."""
    task.cancel_requested = True
    task.wake()
    async with trio.open_nursery() as nursery:
        for run in list(task.step_runs.values()):
            nursery.start_soon(terminate_session, run, grace)


async def step_to_read(
    running: Callable[[], RunningJob | None],
    job_id: str,
    name: str,
    follow: bool,
    store: Store,
    jobs: _Jobs,
) -> int:
    """The index of step ``name``; with ``follow``, once it runs or has ended.
    ``running()`` is the task's run while it runs (it may start meanwhile)."""
    while True:
        run = running()
        if isinstance(run, RunningTask) and run.final is None:
            await run.loaded.wait()
            if not run.steps:
                raise StoreUnavailable(f"the steps of task {job_id} could not be read")
            index = run.step_index(name)
            if index is None:
                raise JobNotFound(f"{job_id} step {name}")
            if not follow or run.steps[index].state is not StepState.QUEUED:
                return index
            await run.changed.wait()
            continue
        steps = await store.steps(job_id)
        found = [step for step in steps if step.name == name]
        if not found:
            raise JobNotFound(f"{job_id} step {name}")
        job = await jobs.get(job_id)
        if not follow or job.finished or found[0].state is not StepState.QUEUED:
            return found[0].index
        await jobs.wait(job_id, started=True)  # a resumed task: it starts again
