"""Live updates for the dashboard's pages: job changes as server-sent events.

Where they come from: the runner's listener (every state change, at once) and, for
the jobs that run, a look at their live record once a second (output sizes and
progress change without a state change, and the runner tells no listener about
them). Totals per state come with the same tick, from the store's counter table
(O(1) whatever the history).

Issue 16's monitor WebSocket (``/v1/monitor``, events with ids) will carry the same
changes; switching means replacing :meth:`JobFeed.frames`' two sources with a
subscription to it. The frames the pages read (``job`` with a job view, ``totals``,
``resync``) stay as they are, so the script does not change.

Bounded: each subscriber has a queue of :data:`QUEUE` changes; one that falls
behind (a stalled browser) gets a ``resync`` frame, its queue is dropped, and the
page reloads what it shows. A subscriber never slows the runner down: the listener
only does a non-blocking put.
"""

from __future__ import annotations

from typing import Any

import trio

from sockexec_py.gateway.auth import ANONYMOUS, Principal, require
from sockexec_py.gateway.jobs_api import JobsService
from sockexec_py.gateway.jobs_views import job_errors, job_view
from sockexec_py.gateway.request import HTTPError
from sockexec_py.gateway.streaming import Emit
from sockexec_py.jobs import Job, JobNotFound, JobState, ListQuery, Runner, Step, Store

#: Changes a subscriber may have waiting.
QUEUE = 256
#: Running jobs looked at per tick at most (more than any sane --jobs-max-running).
MAX_RUNNING = 1000
#: A comment-like frame at least this often, so proxies keep the stream open.
PING = 15.0


def job_frame(job: Job, steps: list[Step] | None = None) -> dict[str, Any]:
    """A job change as the pages read it: the API's job view (a task's steps with
    it on the task's own page)."""
    return {"type": "job", "job": job_view(job, steps=steps).model_dump(mode="json")}


def _mark(job: Job, steps: list[Step] | None = None) -> tuple[object, ...]:
    """What a tick compares to tell whether a running job (and its steps) changed."""
    mark = (job.state, job.stdout_bytes, job.stderr_bytes, job.truncated, job.progress)
    if steps is None:
        return mark
    return (*mark, *((step.state, step.exitcode, step.termsig) for step in steps))


class JobFeed:
    """Job changes for any number of pages.

    Args:
        jobs: the gateway's jobs service (its runner and store exist while the app
            runs; without a data dir the feed answers 404 ``jobs_disabled``).
        interval: seconds between two looks at the running jobs and the totals.
    """

    def __init__(self, jobs: JobsService | None, interval: float = 1.0) -> None:
        self.jobs = jobs
        self.interval = interval

    def _running(self) -> tuple[Runner, Store]:
        if self.jobs is None or self.jobs.runner is None or self.jobs.store is None:
            raise HTTPError(
                404, "jobs_disabled", "jobs are off: start sockexec-gateway with --data-dir DIR"
            )
        return self.jobs.runner, self.jobs.store

    async def frames(
        self, emit: Emit, job_id: str | None = None, principal: Principal = ANONYMOUS
    ) -> None:
        """Emit the changes of every job (or of ``job_id``) that ``principal`` may see
        until the client leaves; totals only to a principal that sees every name.

        Error handling: HTTPError 404 without jobs, or for an unknown ``job_id``; 403
        for a job of a name the principal may not see (before anything is emitted)."""
        runner, store = self._running()
        only_names, only_prefixes = principal.listing("status")
        send, receive = trio.open_memory_channel[Job | None](QUEUE)
        running: set[str] = set()

        def listener(job: Job) -> None:
            if job_id is not None and job.id != job_id:
                return
            if not principal.allows("status", job.name):
                return
            try:
                send.send_nowait(job)
            except trio.WouldBlock:
                _drain(receive)
                send.send_nowait(None)  # the page must reload what it shows

        remove = runner.add_listener(listener)
        try:
            with job_errors():
                if job_id is not None:
                    job = await runner.get(job_id)
                    require(principal, "status", job.name)
                    if job.state is JobState.RUNNING:
                        running.add(job_id)
                    await emit(job_frame(job, await _steps(runner, job, True)))
                else:
                    page = await store.list_jobs(
                        ListQuery(
                            states=frozenset({JobState.RUNNING}),
                            limit=MAX_RUNNING,
                            only_names=only_names,
                            only_prefixes=only_prefixes,
                        )
                    )
                    running.update(job.id for job in page.jobs)
            totals = job_id is None and only_names is None
            detail = job_id is not None
            await self._follow(emit, runner, store, receive, running, totals, detail)
        finally:
            remove()

    async def _follow(
        self,
        emit: Emit,
        runner: Runner,
        store: Store,
        receive: trio.MemoryReceiveChannel[Job | None],
        running: set[str],
        totals: bool,
        detail: bool,
    ) -> None:
        """Emit changes as the runner reports them, and once per ``interval`` what
        changed in the running jobs (sizes, progress; with ``detail``, a task's
        steps) and the totals."""
        marks: dict[str, tuple[object, ...]] = {}
        counts: dict[str, int] | None = None
        quiet_since = trio.current_time()
        tick_at = trio.current_time()
        while True:
            with trio.move_on_at(tick_at):
                change = await receive.receive()
                if change is None:
                    await emit({"type": "resync"})
                    continue
                if change.state is JobState.RUNNING:
                    running.add(change.id)
                else:
                    running.discard(change.id)
                steps = await _steps(runner, change, detail)
                marks[change.id] = _mark(change, steps)
                await emit(job_frame(runner.current(change), steps))
                quiet_since = trio.current_time()
                continue
            tick_at = trio.current_time() + self.interval
            for running_id in list(running):
                try:
                    job = await runner.get(running_id)
                except JobNotFound:
                    running.discard(running_id)
                    continue
                steps = await _steps(runner, job, detail)
                if marks.get(running_id) != (mark := _mark(job, steps)):
                    marks[running_id] = mark
                    await emit(job_frame(job, steps))
                    quiet_since = trio.current_time()
                if job.finished:
                    running.discard(running_id)
            for gone in set(marks) - running:
                del marks[gone]
            if totals:
                with job_errors():
                    now = {state.value: n for state, n in (await store.counts()).items()}
                if now != counts:
                    counts = now
                    await emit({"type": "totals", "totals": now})
                    quiet_since = trio.current_time()
            if trio.current_time() - quiet_since >= PING:
                await emit({"type": "ping"})
                quiet_since = trio.current_time()


async def _steps(runner: Runner, job: Job, detail: bool) -> list[Step] | None:
    """A task's steps, on its own page (``detail``); None otherwise."""
    if not (detail and job.is_task):
        return None
    with job_errors():
        return await runner.steps(job.id)


def _drain(receive: trio.MemoryReceiveChannel[Job | None]) -> None:
    while True:
        try:
            receive.receive_nowait()
        except trio.WouldBlock:
            return
