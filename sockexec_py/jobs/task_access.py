"""What the jobs API asks of a task's steps beyond the runner's own work: cancel
one by name, find the one whose output is read (waiting for it to start when
followed). Works on a running task (its :class:`~.task.RunningTask`) or on one
that waits or has ended (the store)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .errors import IllegalTransition, JobNotFound, StoreUnavailable
from .model import Job
from .output import OutputStore, output_key
from .session import RunningJob
from .steps import StepState
from .store import Store
from .task import RunningTask, cancel_step, cancelled_steps

__all__ = ["cancel_named_step", "step_to_read"]


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
