"""Running one job to its end: its broker session (or a task's steps), its progress
saved as it goes, and its end recorded; the part of the :class:`~.runner.Runner`
that a job's own task runs, once the scheduler gave it a slot.

Error handling: a broken session (or a bug in its tasks) fails this job, not the
runner; a broker that cannot be reached sends the job back to its queue.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace

import trio

from sockexec_py.client import BrokerUnavailable

from .errors import JobError, StoreUnavailable
from .model import (
    CANCELLED_RUNNING_REASON,
    LOST_REASON,
    Job,
    JobState,
    broken_session_reason,
    final_state,
)
from .output import OutputStore
from .session import RunningJob, one_line, progress_loop, run_session
from .store import Store
from .task import RunningTask, TaskConfig, run_task

__all__ = ["Execution", "RunnerConfig"]

log = logging.getLogger("sockexec_py.jobs")


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


class Execution:
    """A job's run from its claim to its end (the :class:`~.runner.Runner`'s base).

    What it needs of the runner: the store, the output store, the config, the
    clock, the running jobs by id, and :meth:`_changed`, :meth:`_broker_ok` and
    :meth:`_backoff` (the scheduler's reactions)."""

    store: Store
    output: OutputStore
    config: RunnerConfig
    clock: Callable[[], float]
    _runs: dict[str, RunningJob]

    def _changed(self, job: Job) -> None:
        raise NotImplementedError

    def _broker_ok(self) -> None:
        raise NotImplementedError

    def _backoff(self) -> None:
        raise NotImplementedError

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
            run.loaded.set()  # perhaps without its steps: waiters go to the store
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

    async def _record_end(self, ended: Job, remove: bool) -> None:
        """Record a job's end, again and again while the store cannot be written (a
        full disk, say): the end is known and must not become ``lost``. Its slot stays
        taken meanwhile. If the gateway stops first, the next start finds the job
        ``running`` and marks it ``lost``, saying why."""
        delay = self.config.retry_initial
        while True:
            try:
                await self.store.finish(ended, remove=remove)
            except StoreUnavailable as exc:
                log.error(
                    "cannot record the end of job %s (%s): %s; trying again in %g s",
                    ended.id,
                    ended.state.value,
                    exc,
                    delay,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max)
                continue
            except JobError as exc:
                log.error("cannot record the end of job %s: %s", ended.id, exc)
            return

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
        await self._progress_loop(
            run, lambda job, event: self.store.save_progress(job, event=event)
        )

    async def _save_step_progress(self, task: RunningTask, run: RunningJob, index: int) -> None:
        """:meth:`_save_progress` for a task's step."""
        await self._progress_loop(
            run,
            lambda _, event: self.store.save_step_progress(
                task.job, task.current_step(index), event=event
            ),
        )

    async def _progress_loop(
        self, run: RunningJob, save: Callable[[Job, bool], Awaitable[None]]
    ) -> None:
        config = self.config
        await progress_loop(
            run, run.snapshot, save, config.progress_interval, config.progress_event_interval
        )

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
        await self._record_end(ended, remove)
        run.final = ended
        await run.output.close()
        if remove:
            await self.output.remove(ended.id, ended.steps)
        self._runs.pop(ended.id, None)
        run.done.set()
        self._changed(ended)
