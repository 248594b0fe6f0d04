"""The scheduler: runs queued jobs as ordinary broker sessions, one task per job.

Who owns what: the :class:`Runner` owns one nursery (started by :meth:`Runner.run`)
holding a dispatcher task, a timer task for scheduled jobs, an optional retention
task and one task per running job. The store is the truth: the runner keeps in
memory only what runs now, so a restart resumes queued and scheduled jobs from the
database, and a job the previous process was running is marked ``lost`` first.

Policy: FIFO per name (oldest ``queued_at`` first), at most ``max_running`` jobs at
once and ``limits.get(name, default_limit)`` per name; a submit past ``max_waiting``
waiting jobs of a name raises :class:`~.errors.QueueFull`. Each job's session goes
through :func:`sockexec_py.client.open_async_session`, so the broker's policy,
limits and process-group handling apply unchanged. When the broker cannot be
reached, the job goes back to the queue in its place and nothing starts until a
retry time (exponential backoff, bounded): a broker that is down does not turn the
queue into failures.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from . import task_access
from .errors import IllegalTransition, JobError
from .events import EventHub
from .execution import Execution, RunnerConfig
from .model import (
    CANCELLED_WAITING_REASON,
    WAITING_STATES,
    Job,
    JobState,
)
from .output import OutputReader, OutputStore, View, output_key
from .request import SubmitRequest
from .session import RunningJob, terminate_session
from .steps import Step
from .store import Store
from .task import RunningTask

__all__ = ["Runner", "RunnerConfig", "terminate_session"]

log = logging.getLogger("sockexec_py.jobs")

#: The longest a timer sleeps before looking at the wall clock again (it may step).
_MAX_TIMER = 60.0


@dataclass
class _Watch:
    """Tasks waiting for a job's next change; set (and dropped) at that change."""

    event: trio.Event = field(default_factory=trio.Event)
    job: Job | None = None
    waiters: int = 0


class Runner(Execution):
    """Runs the store's jobs; the gateway's jobs API calls its methods.

    ``clock`` is the Unix time of records and schedules (default: the store's);
    timers run on trio's clock, so tests drive both with ``MockClock``.
    """

    def __init__(
        self,
        store: Store,
        output: OutputStore,
        config: RunnerConfig,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.store = store
        self.output = output
        self.config = config
        self.clock = clock or store.clock
        self._runs: dict[str, RunningJob] = {}
        #: Live job events (monitors, the callback deliverer): the store publishes
        #: every committed change here.
        self.hub = EventHub()
        store.publish = self.hub.publish
        self._listeners: list[Callable[[Job], object]] = []
        self._watches: dict[str, _Watch] = {}
        self._dispatch_wake = trio.Event()
        self._schedule_wake = trio.Event()
        # Set while a claim is in flight: a job it moved to running in the database
        # is not yet in _runs (cancel and follow wait for it).
        self._claiming: trio.Event | None = None
        self._retry_at = -math.inf
        self._retry_delay = config.retry_initial
        self._nursery: trio.Nursery | None = None

    # ---- public API ----

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Mark the previous process's running jobs ``lost``, then run jobs until
        cancelled. Cancelling it terminates the running jobs' programs (their
        sessions close) and records them ``lost``."""
        for job_id in await self.store.mark_lost():
            log.warning("job %s was running when the gateway stopped: marked lost", job_id)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._guarded, self._dispatch)
            nursery.start_soon(self._guarded, self._schedule)
            nursery.start_soon(self._guarded, self._retention)
            task_status.started()

    async def _guarded(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a background loop for ever: a bug that escapes it is logged and the
        loop starts again after a pause, so it never takes the runner (and the
        gateway serving it) down."""
        while True:
            try:
                await loop()
            except Exception:
                log.exception("jobs: %s failed; restarting it", loop.__name__)
            await trio.sleep(self.config.retry_max)

    def add_listener(self, listener: Callable[[Job], object]) -> Callable[[], None]:
        """Call ``listener(job)`` (in the trio thread, not awaited) on every state
        change; returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def submit(self, request: SubmitRequest) -> Job:
        """Record a job (committed when this returns) and wake the scheduler."""
        job, _ = await self.submit_positioned(request)
        return job

    async def submit_positioned(self, request: SubmitRequest) -> tuple[Job, int | None]:
        """:meth:`submit`, with the job's place in its queue when it was committed
        (``None`` unless queued)."""
        job, position = await self.store.submit_positioned(
            request, max_waiting=self.config.max_waiting
        )
        self._changed(job)
        return job, position

    async def get(self, job_id: str) -> Job:
        """The job; a running one with its live output sizes and progress."""
        run = self._runs.get(job_id)
        if run is not None:
            return run.final or run.snapshot()
        return await self.store.get(job_id)

    def current(self, job: Job) -> Job:
        """``job`` (read from the store) with its live sizes and progress if it runs."""
        run = self._runs.get(job.id)
        return (run.final or run.snapshot()) if run is not None else job

    async def wait(self, job_id: str, *, started: bool = False) -> Job:
        """Wait until the job has finished (or, with ``started``, left the queue)."""

        def reached(job: Job) -> bool:
            return job.finished or (started and job.state not in WAITING_STATES)

        while True:
            watch = self._watches.setdefault(job_id, _Watch())
            watch.waiters += 1
            try:
                job = await self.get(job_id)
                if reached(job):
                    return job
                await watch.event.wait()
                if watch.job is not None and reached(watch.job):
                    return watch.job
            finally:
                watch.waiters -= 1
                if not watch.waiters and self._watches.get(job_id) is watch:
                    del self._watches[job_id]

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job: a waiting one at once (it never starts), a running one by
        terminating its session; returns the job once it is ``cancelled``.

        Error handling: :class:`~.errors.IllegalTransition` for a finished job,
        :class:`~.errors.JobNotFound` for an unknown one.
        """
        for _attempt in range(5):
            run = self._runs.get(job_id)
            if isinstance(run, RunningTask):
                await task_access.cancel_task(run, self.config.kill_grace)
                await run.done.wait()
                if run.final is not None:
                    return run.final
                continue
            if run is not None:
                await terminate_session(run, self.config.kill_grace)
                await run.done.wait()
                if run.final is not None:
                    return run.final
                continue  # the broker was down: it went back to the queue, cancel it there
            if self._claiming is not None:
                await self._claiming.wait()
                continue
            try:
                job = await self.store.cancel_waiting(job_id, CANCELLED_WAITING_REASON)
            except IllegalTransition as exc:
                if exc.current == JobState.RUNNING:
                    continue  # claimed meanwhile: now in _runs, or a claim is in flight
                raise
            output = self.output.live(job_id)  # requeued once: its followers end now
            if output is not None:
                await output.close()
            self._changed(job)
            return job
        job = await self.store.get(job_id)
        raise IllegalTransition(job_id, job.state.value, JobState.CANCELLED.value)

    async def delete(self, job_id: str) -> None:
        """Delete a finished job's record, then its output files."""
        steps = await self.store.delete(job_id)
        await self.output.remove(job_id, steps)

    async def steps(self, job_id: str) -> list[Step]:
        """A task's steps as they are now (running ones with live sizes)."""
        run = self._runs.get(job_id)
        if isinstance(run, RunningTask) and run.steps and run.final is None:
            return [run.current_step(step.index) for step in run.steps]
        return await self.store.steps(job_id)

    async def cancel_step(self, job_id: str, name: str) -> Job:
        """Stop one step of a task: a queued one never runs, a running one is
        terminated (TERM, then KILL); either way its dependents are skipped. Returns
        the task once the step has ended.

        Error handling: :class:`~.errors.JobNotFound` (no such task or step),
        :class:`~.errors.IllegalTransition` (the step had ended)."""
        for _attempt in range(5):
            job = await self.get(job_id)
            try:
                return await task_access.cancel_named_step(
                    self._runs.get(job_id),
                    job,
                    name,
                    self.store,
                    self.output,
                    self.config.kill_grace,
                    self.clock,
                )
            except IllegalTransition as exc:
                if exc.current != JobState.RUNNING:
                    raise
                if self._claiming is not None:  # claimed meanwhile: the running task's now
                    await self._claiming.wait()
        raise IllegalTransition(job_id, JobState.RUNNING.value, "a step cancelled")

    async def read_output(
        self,
        job_id: str,
        view: View = "both",
        offset: int = 0,
        *,
        follow: bool = False,
        step: str | None = None,
    ) -> OutputReader:
        """A reader of the job's output, or of one step's (see
        :meth:`OutputStore.read`); with ``follow``, a waiting job (step) is waited
        for until it starts or ends.

        Error handling: :class:`~.errors.JobNotFound` for an unknown id or step."""
        if follow:
            await self.wait(job_id, started=True)
        else:
            await self.get(job_id)
        if job_id not in self._runs and self._claiming is not None:
            await self._claiming.wait()
        if step is None:
            return self.output.read(job_id, view, offset, follow=follow)
        index = await task_access.step_to_read(
            lambda: self._runs.get(job_id), job_id, step, follow, self.store, self
        )
        return self.output.read(output_key(job_id, index), view, offset, follow=follow)

    async def purge(self) -> list[str]:
        """One retention pass: delete old finished jobs and their output, and the
        events older than the retention period (7 days without one)."""
        deleted = await self.store.purge_counted(self.config.keep_for, self.config.keep_max)
        for job_id, steps in deleted:
            await self.output.remove(job_id, steps)
        await self.store.purge_events(self.config.keep_for or 7 * 86400.0)
        return [job_id for job_id, _ in deleted]

    # ---- tasks ----

    def _changed(self, job: Job) -> None:
        if job.state is JobState.SCHEDULED:
            self._schedule_wake.set()
        else:
            self._dispatch_wake.set()
        watch = self._watches.pop(job.id, None)
        if watch is not None:
            watch.job = job
            watch.event.set()
        for listener in list(self._listeners):
            try:
                listener(job)
            except Exception:
                log.exception("a job listener failed")

    async def _dispatch(self) -> None:
        """Start queued jobs while there is room; sleep until something changes."""
        while True:
            self._dispatch_wake = wake = trio.Event()
            if trio.current_time() >= self._retry_at:
                await self._start_jobs()
            retry_at = self._retry_at if self._retry_at > trio.current_time() else math.inf
            with trio.move_on_at(retry_at):
                await wake.wait()

    async def _start_jobs(self) -> None:
        assert self._nursery is not None
        slots = self.config.max_running - len(self._runs)
        if slots <= 0:
            return
        running = Counter(run.job.name for run in self._runs.values())
        self._claiming = claiming = trio.Event()
        try:
            claimed = await self.store.claim_with_stdin(
                slots, running, self.config.limits, self.config.default_limit
            )
            jobs = [job for job, _ in claimed]
            for job, stdin in claimed:
                # Registered with its output before anyone can see it running.
                kind = RunningTask if job.is_task else RunningJob
                run = self._runs[job.id] = kind(job, self.output.open(job.id))
                run.stdin = stdin
                self._nursery.start_soon(self._execute, run)
        except JobError as exc:  # StoreUnavailable: try again after a while
            log.error("cannot start jobs: %s", exc)
            self._backoff()
            return
        finally:
            self._claiming = None
            claiming.set()
        for job in jobs:
            self._changed(job)

    def _broker_ok(self) -> None:
        self._retry_delay = self.config.retry_initial

    def _backoff(self) -> None:
        self._retry_at = trio.current_time() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, self.config.retry_max)

    async def _schedule(self) -> None:
        """Queue scheduled jobs when their time comes (a timer, not a polling loop)."""
        while True:
            self._schedule_wake = wake = trio.Event()
            try:
                for job_id in await self.store.promote_due():
                    self._changed(await self.store.get(job_id))
                next_start = await self.store.next_start()
            except JobError as exc:
                log.error("cannot queue scheduled jobs: %s", exc)
                next_start = self.clock() + self.config.retry_max
            delay = math.inf if next_start is None else next_start - self.clock()
            with trio.move_on_after(max(0.0, min(delay, _MAX_TIMER))):
                await wake.wait()

    async def _retention(self) -> None:
        while True:
            try:
                await self.purge()
            except JobError as exc:
                log.error("retention purge failed: %s", exc)
            await trio.sleep(self.config.purge_interval)
