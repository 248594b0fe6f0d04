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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace

import trio

from sockexec_py.client import BrokerUnavailable

from .errors import IllegalTransition, JobError, JobNotFound
from .events import EventHub
from .model import (
    CANCELLED_RUNNING_REASON,
    CANCELLED_WAITING_REASON,
    LOST_REASON,
    WAITING_STATES,
    Job,
    JobState,
    broken_session_reason,
    final_state,
)
from .output import OutputReader, OutputStore, View, output_key
from .request import SubmitRequest
from .session import RunningJob, one_line, run_session, terminate_session
from .steps import Step, StepState
from .store import Store
from .task import RunningTask, TaskConfig, cancel_step, cancel_task, run_task

__all__ = ["Runner", "RunnerConfig", "terminate_session"]

log = logging.getLogger("sockexec_py.jobs")

#: The longest a timer sleeps before looking at the wall clock again (it may step).
_MAX_TIMER = 60.0


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    """How the runner schedules; times in seconds."""

    socket_path: str
    max_running: int = 8
    limits: Mapping[str, int] = field(default_factory=dict)
    default_limit: int = 1
    max_waiting: int | None = 1000
    progress_interval: float = 1.0
    #: The shortest time between two progress events of one job (or step).
    progress_event_interval: float = 0.25
    #: Steps of one task running at once (default: ``max_running``).
    task_max_parallel: int | None = None
    retry_initial: float = 0.25
    retry_max: float = 10.0
    keep_for: float | None = None
    keep_max: int | None = None
    purge_interval: float = 60.0
    #: How long a cancel waits for the broker's exit pair after asking it to
    #: terminate (it sends KILL after its -k, 10 s by default) before closing.
    kill_grace: float = 15.0


@dataclass
class _Watch:
    """Tasks waiting for a job's next change; set (and dropped) at that change."""

    event: trio.Event = field(default_factory=trio.Event)
    job: Job | None = None
    waiters: int = 0


class Runner:
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
                await cancel_task(run, self.config.kill_grace)
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
        if isinstance(run, RunningTask) and run.loaded.is_set() and run.final is None:
            return [run.current_step(step.index) for step in run.steps]
        return await self.store.steps(job_id)

    async def cancel_step(self, job_id: str, name: str) -> Job:
        """Stop one step of a task: a queued one never runs, a running one is
        terminated (TERM, then KILL); either way its dependents are skipped. Returns
        the task once the step has ended.

        Error handling: :class:`~.errors.JobNotFound` (no such task or step),
        :class:`~.errors.IllegalTransition` (the step had ended)."""
        job = await self.get(job_id)
        run = self._runs.get(job_id)
        if isinstance(run, RunningTask):
            await run.loaded.wait()
            index = run.step_index(name)
            if index is None:
                raise JobNotFound(f"{job_id} step {name}")
            step = run.steps[index]
            if step.finished:
                raise IllegalTransition(f"{job_id} step {name!r}", step.state.value, "cancelled")
            await cancel_step(run, self.store, index, self.config.kill_grace, self.clock)
            while not run.steps[index].finished:
                await run.changed.wait()
            return run.snapshot()
        steps = await self.store.steps(job_id)
        found = [step for step in steps if step.name == name]
        if not job.is_task or not found:
            raise JobNotFound(f"{job_id} step {name}")
        step = found[0]
        if step.finished or job.finished:
            raise IllegalTransition(f"{job_id} step {name!r}", step.state.value, "cancelled")
        # The task waits: record the step cancelled (and its dependents skipped).
        waiting = RunningTask(job, self.output.open(output_key(job_id, step.index)))
        waiting.load(steps)
        await cancel_step(waiting, self.store, step.index, 0, self.clock)
        await self.output.live(output_key(job_id, step.index)).close()  # type: ignore[union-attr]
        return await self.get(job_id)

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
        index = await self._step_started(job_id, step, follow)
        return self.output.read(output_key(job_id, index), view, offset, follow=follow)

    async def _step_started(self, job_id: str, name: str, follow: bool) -> int:
        """The index of step ``name``; with ``follow``, once it runs or has ended."""
        while True:
            run = self._runs.get(job_id)
            if isinstance(run, RunningTask) and run.final is None:
                await run.loaded.wait()
                index = run.step_index(name)
                if index is None:
                    raise JobNotFound(f"{job_id} step {name}")
                if not follow or run.steps[index].state is not StepState.QUEUED:
                    return index
                await run.changed.wait()
                continue
            steps = await self.store.steps(job_id)
            found = [step for step in steps if step.name == name]
            if not found:
                raise JobNotFound(f"{job_id} step {name}")
            job = await self.get(job_id)
            if not follow or job.finished or found[0].state is not StepState.QUEUED:
                return found[0].index
            await self.wait(job_id, started=True)  # a resumed task: it starts again

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

    async def _execute(self, run: RunningJob) -> None:
        """Run one job's session and record how it ended.

        Error handling: a broken session (or a bug in its tasks) fails this job, not
        the runner. Resource handling: when the runner itself is cancelled, the
        session closes (the broker terminates the program) and the job is recorded
        ``lost``, as the next start would.
        """
        if isinstance(run, RunningTask):
            await self._execute_task(run)
            return
        try:
            try:
                exited, reason = await run_session(
                    run,
                    self.config.socket_path,
                    run.stdin,
                    on_connected=self._broker_ok,
                    alongside=self._save_progress,
                )
            except BrokerUnavailable as exc:
                await self._broker_unavailable(run, str(exc))
                return
            except Exception as exc:
                log.warning("job %s: the broker session failed: %s", run.job.id, exc)
                exited, reason = None, broken_session_reason(one_line(exc))
            state = final_state(exited, cancel_requested=run.cancel_requested)
            exitcode, termsig = (exited.exitcode, exited.termsig) if exited else (None, None)
            await self._finish(run, state, reason, exitcode, termsig)
        finally:
            if not run.done.is_set():
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await self._finish(run, JobState.LOST, LOST_REASON, None, None)

    async def _execute_task(self, run: RunningTask) -> None:
        """Run a task's steps (:func:`~.task.run_task`) and record how it ended.
        Cancelled (the gateway stops), its record stays ``running``: the next start
        loses its running steps and queues it again (see :func:`~.queries.mark_lost`)."""
        config = self.config
        task_config = TaskConfig(
            config.socket_path,
            config.task_max_parallel or config.max_running,
            config.kill_grace,
            config.retry_initial,
            config.retry_max,
        )
        try:
            run.load(await self.store.steps(run.job.id))
            state, reason, exitcode, termsig = await run_task(
                run, self.store, self.output, task_config, self.clock, self._save_step_progress
            )
        except JobError as exc:
            log.error("task %s: %s", run.job.id, exc)
            self._runs.pop(run.job.id, None)
            run.done.set()
            await run.output.close()
            self._backoff()
            return
        except BaseException:
            self._runs.pop(run.job.id, None)
            run.done.set()
            with trio.CancelScope(shield=True):
                await run.output.close()
            raise
        await self._finish(run, state, reason, exitcode, termsig)

    async def _broker_unavailable(self, run: RunningJob, detail: str) -> None:
        """The connect failed, so the program never started: back to the queue (or
        ``cancelled`` if that was asked meanwhile), and retry later."""
        log.warning("broker unavailable, job %s stays queued: %s", run.job.id, detail)
        self._backoff()
        if run.cancel_requested:
            await self._finish(run, JobState.CANCELLED, CANCELLED_RUNNING_REASON, None, None)
            return
        try:
            await self.store.requeue(run.job.id)
        except JobError as exc:
            log.error("cannot requeue job %s: %s", run.job.id, exc)
        del self._runs[run.job.id]
        run.done.set()
        self._changed(replace(run.job, state=JobState.QUEUED, started_at=None))

    async def _save_progress(self, run: RunningJob) -> None:
        """Persist sizes and progress while the job runs: a progress event when the
        progress changed (at most one per ``progress_event_interval``), the sizes at
        most once per ``progress_interval``."""

        async def save(job: Job, event: bool) -> None:
            await self.store.save_progress(job, event=event)

        await self._progress_loop(run, run.snapshot, save)

    async def _save_step_progress(self, task: RunningTask, run: RunningJob, index: int) -> None:
        """:meth:`_save_progress` for a task's step."""

        async def save(_: Job, event: bool) -> None:
            await self.store.save_step_progress(task.job, task.current_step(index), event=event)

        await self._progress_loop(run, run.snapshot, save)

    async def _progress_loop(
        self,
        run: RunningJob,
        snapshot: Callable[[], Job],
        save: Callable[[Job, bool], Awaitable[None]],
    ) -> None:
        last_progress = run.parser.progress
        last_saved = -math.inf
        while True:
            await run.progress_dirty.wait()
            run.progress_dirty = trio.Event()
            job = snapshot()
            changed = job.progress != last_progress
            if changed or trio.current_time() - last_saved >= self.config.progress_interval:
                try:
                    await save(job, changed)
                except Exception as exc:  # never the job's end: it goes on
                    log.error("cannot save the progress of job %s: %s", run.job.id, exc)
                last_saved, last_progress = trio.current_time(), job.progress
            else:
                run.progress_dirty.set()  # the sizes, after the interval
            await trio.sleep(self.config.progress_event_interval)

    async def _finish(
        self,
        run: RunningJob,
        state: JobState,
        reason: str | None,
        exitcode: int | None,
        termsig: str | None,
    ) -> None:
        """Record the end (the database and :attr:`RunningJob.final` first, so a
        follower that sees the output end finds the final record), close the output,
        free the slot."""
        await run.output.flush()  # the sizes recorded are those of the files
        run.parser.end()
        ended = replace(
            run.snapshot(),
            state=state,
            reason=reason,
            ended_at=self.clock(),
            exitcode=exitcode,
            termsig=termsig,
        )
        remove = ended.state is JobState.SUCCEEDED and not ended.keep
        try:
            await self.store.finish(ended, remove=remove)
        except JobError as exc:
            log.error("cannot record the end of job %s: %s", ended.id, exc)
        run.final = ended
        await run.output.close()
        if remove:
            await self.output.remove(ended.id, ended.steps)
        self._runs.pop(ended.id, None)
        run.done.set()
        self._changed(ended)
