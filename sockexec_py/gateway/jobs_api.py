"""The jobs API (``/v1/jobs``): submit, list, show, cancel, delete and follow jobs
run by :mod:`sockexec_py.jobs` on the gateway's behalf.

Who owns what: :class:`JobsService` opens the store (which locks the data dir) and
runs the :class:`~sockexec_py.jobs.Runner` for the life of the app, in the app's
lifespan nursery (:meth:`JobsService.running`); the handlers only call the runner and
the store. The runner's own loops log and restart on a bug, and a last guard here
does the same for the runner as a whole: nothing in the background takes the server
down. Errors of the jobs layer map one to one onto answers (:func:`job_errors`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from starlette.requests import Request
from starlette.responses import Response

from sockexec_py.jobs import (
    Job,
    JobNotFound,
    JobState,
    ListQuery,
    OutputStore,
    Runner,
    RunnerConfig,
    Store,
    SubmitLimits,
    is_job_id,
    open_store,
    parse_submit,
)

from .api import Api
from .auth import Principal, audit, audit_name, require
from .callback_policy import AllowRule, CallbackPolicy, CallbackRefused
from .jobs_output import output_response
from .jobs_routes import register
from .jobs_views import (
    job_errors,
    job_url,
    job_view,
    label_filter,
    time_filter,
)
from .metrics import GatewayMetrics
from .models import (
    JobAccepted,
    JobGetQuery,
    JobListQuery,
    JobPage,
    JobSubmit,
    JobView,
    OutputQuery,
)
from .request import HTTPError
from .settings import JobsSettings
from .streaming import unless_client_leaves

log = logging.getLogger("sockexec_py.gateway")

#: How long the runner as a whole pauses before it restarts after a bug.
_RESTART_PAUSE = 5.0


class _StartedOnce:
    """A task status that remembers whether ``started`` was called."""

    def __init__(self, inner: trio.TaskStatus[None]) -> None:
        self.inner = inner
        self.done = False

    def started(self, value: None = None) -> None:
        self.done = True
        self.inner.started(value)


class JobsService:
    """The jobs API's state while the app runs, and its handlers.

    Args:
        settings: the data dir and the scheduling limits.
        socket_path: the broker's socket (every job is one broker session).
        metrics: where jobs by state, queue lengths and run durations go.
    """

    def __init__(self, settings: JobsSettings, socket_path: str, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.socket_path = socket_path
        self.metrics = metrics
        self.limits = SubmitLimits()
        self.store: Store | None = None
        self.runner: Runner | None = None
        self._opened: Store | None = None
        #: Raises ValueError for a bad --callback-allow (the CLI checked them first).
        self.callbacks = CallbackPolicy(AllowRule.parse(text) for text in settings.callback_allow)

    # -- life ---------------------------------------------------------------------

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[Store]:
        """Open the store (locking the data dir) for the block; :meth:`running` then
        uses it. The CLI opens it before it listens, so a data dir it cannot use is
        a one-line error and no port is ever bound for nothing.

        Error handling: :class:`~sockexec_py.jobs.DataDirLocked`,
        :class:`~sockexec_py.jobs.StoreUnavailable` (cannot create, open or write
        the data dir) and :class:`~sockexec_py.jobs.SchemaError` propagate.
        Resource handling: leaving closes the store and releases the lock.
        """
        async with open_store(self.settings.data_dir) as store:
            self._opened = store
            try:
                yield store
            finally:
                self._opened = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the runner for the block (the app's lifespan), over the store of
        :meth:`opened` (or one opened here, for an ASGI server other than our CLI).

        Error handling: as :meth:`opened`, and what marking the previous run's jobs
        ``lost`` raises. Resource handling: leaving cancels the runner (running jobs'
        sessions close; they are recorded ``lost``).
        """
        if self._opened is None:
            async with self.opened(), self.running():
                yield
            return
        settings = self.settings
        store = self._opened
        async with trio.open_nursery() as nursery:
            output = OutputStore(Path(settings.data_dir) / "output", cap=settings.output_max)
            config = RunnerConfig(
                self.socket_path,
                max_running=settings.max_running,
                limits=dict(settings.limits),
                default_limit=settings.default_limit,
                max_waiting=settings.max_queue,
                keep_for=settings.keep_for,
                keep_max=settings.keep_max,
                kill_grace=settings.kill_grace,
            )
            runner = Runner(store, output, config)
            runner.hub.limit = settings.monitor_queue
            runner.hub.on_overflow = self.metrics.monitor_overflows.inc
            runner.add_listener(self._observe)
            if self.callbacks.rules:
                # Only here: the HTTP client is loaded by gateways that call back.
                from .callbacks import Deliverer, DeliverySettings, secret_file

                if settings.callback_secret_file is None:
                    raise ValueError("--callback-allow needs --callback-secret-file")
                deliverer = Deliverer(
                    store,
                    runner.hub,
                    self.callbacks,
                    secret_file(settings.callback_secret_file).current,
                    DeliverySettings(
                        timeout=settings.callback_timeout,
                        attempts=settings.callback_attempts,
                        backoff=settings.callback_backoff,
                        deadline=settings.callback_deadline,
                    ),
                    count=lambda outcome: self.metrics.callbacks.labels(outcome).inc(),
                )
                await nursery.start(deliverer.run)
            await nursery.start(self._supervise, runner)
            self.store, self.runner = store, runner
            try:
                yield
            finally:
                self.store = self.runner = None
                nursery.cancel_scope.cancel()

    async def _supervise(
        self, runner: Runner, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the runner; a failure before it started fails the startup, one after
        is logged and the runner restarted (it marks what ran then ``lost``)."""
        status = _StartedOnce(task_status)
        while True:
            try:
                await runner.run(task_status=trio.TASK_STATUS_IGNORED if status.done else status)
            except Exception:
                if not status.done:
                    raise
                log.exception("jobs: the runner failed; restarting it")
            await trio.sleep(_RESTART_PAUSE)

    def _observe(self, job: Job) -> None:
        if job.finished and job.duration is not None:
            self.metrics.job_seconds.labels(job.state.value).observe(job.duration)

    async def refresh_metrics(self) -> None:
        """Jobs by state and queue lengths, read from the store for /metrics."""
        if self.store is None:
            return
        with job_errors():
            counts = await self.store.counts()
            queues = await self.store.queue_lengths()
        for state, count in counts.items():
            self.metrics.jobs.labels(state.value).set(count)
        if self.runner is not None:
            self.metrics.monitors.set(self.runner.hub.subscribers)
        self.metrics.queue_length.clear()
        for name, length in queues.items():
            self.metrics.queue_length.labels(name).set(length)

    def _runner(self) -> Runner:
        if self.runner is None:
            raise HTTPError(
                404, "jobs_disabled", "jobs are off: start sockexec-gateway with --data-dir DIR"
            )
        return self.runner

    def _job_id(self, request: Request) -> str:
        job_id: str = request.path_params["job_id"]
        if not is_job_id(job_id):
            raise HTTPError(404, "not_found", f"no job {job_id[:40]!r}")
        return job_id

    async def _allowed_job(self, request: Request, action: str) -> tuple[Runner, str, Job]:
        """The runner, the job's id and the job, once the token may do ``action`` on
        the job's name (403 naming the scope otherwise)."""
        runner = self._runner()
        job_id = self._job_id(request)
        with job_errors():
            job = await runner.get(job_id)
        require(request.state.principal, action, job.name)
        return runner, job_id, job

    async def _position(self, job: Job) -> int | None:
        if job.state is not JobState.QUEUED or self.store is None:
            return None
        with job_errors():
            try:
                return await self.store.position(job.id)
            except JobNotFound:
                return None

    # -- endpoints ----------------------------------------------------------------

    def register(self, api: Api) -> None:
        """Declare the jobs endpoints on ``api`` (:mod:`.jobs_routes`)."""
        register(self, api)

    async def submit(self, request: Request, body: JobSubmit, query: None) -> JobAccepted:
        runner = self._runner()
        principal: Principal = request.state.principal
        with job_errors():
            submitted = parse_submit(body.model_dump(exclude_unset=True), self.limits)
        for program in submitted.programs:
            require(principal, "run", program)
        require(principal, "run", submitted.name)
        if submitted.callback_url is not None:
            try:
                self.callbacks.rule_for(submitted.callback_url)
            except CallbackRefused as exc:
                raise HTTPError(400, "bad_request", f"callback.url: {exc}") from None
        with job_errors():
            job, position = await runner.submit_positioned(submitted)
        audit.info(
            "%s submitted job %s (name %s%s)",
            audit_name(principal),
            job.id,
            job.name,
            f", {len(submitted.steps)} steps" if submitted.steps else "",
        )
        return JobAccepted(id=job.id, state=job.state.value, position=position, url=job_url(job.id))

    async def list_jobs(self, request: Request, body: None, query: JobListQuery) -> JobPage:
        runner = self._runner()
        assert self.store is not None
        principal: Principal = request.state.principal
        require(principal, "status", query.name)
        only_names, only_prefixes = principal.listing("status")
        with job_errors():
            listing = ListQuery(
                states=frozenset(JobState(state) for state in query.state) or None,
                name=query.name,
                labels=label_filter(query.label),
                created_from=time_filter(query.created_after, "created_after"),
                created_to=time_filter(query.created_before, "created_before"),
                sort=query.sort,
                descending=query.order == "desc",
                limit=query.limit,
                cursor=query.cursor,
                only_names=only_names,
                only_prefixes=only_prefixes,
            )
            page = await self.store.list_jobs(listing)
            totals = {} if only_names is not None else await self.store.counts()
        return JobPage(
            jobs=[job_view(runner.current(job)) for job in page.jobs],
            next_cursor=page.next_cursor,
            totals={state.value: count for state, count in totals.items()},
        )

    async def show(self, request: Request, body: None, query: JobGetQuery) -> JobView:
        runner, job_id, job = await self._allowed_job(request, "status")
        with job_errors():
            if query.wait and not job.finished:

                async def wait() -> Job:
                    with trio.move_on_after(query.wait):
                        return await runner.wait(job_id)
                    return await runner.get(job_id)

                job = await unless_client_leaves(request.receive, wait)
        return await self.view(job)

    async def view(self, job: Job) -> JobView:
        """The full view of one job: its queue position, a task's steps, the callback
        (the API's answers and the dashboard's job page)."""
        assert self.store is not None and self.runner is not None
        position = await self._position(job)
        with job_errors():
            steps = await self.runner.steps(job.id) if job.is_task else None
            callback = await self.store.callback(job.id)
        return job_view(job, position, steps=steps, callback=callback)

    async def cancel(self, request: Request, body: None, query: None) -> JobView:
        runner, job_id, _ = await self._allowed_job(request, "cancel")
        with job_errors():
            job = await runner.cancel(job_id)
        audit.info("%s cancelled job %s", audit_name(request.state.principal), job_id)
        return await self.view(job)

    async def cancel_step(self, request: Request, body: None, query: None) -> JobView:
        runner, job_id, _ = await self._allowed_job(request, "cancel")
        name: str = request.path_params["step"]
        with job_errors():
            job = await runner.cancel_step(job_id, name)
        audit.info(
            "%s cancelled step %s of job %s", audit_name(request.state.principal), name, job_id
        )
        return await self.view(job)

    async def delete(self, request: Request, body: None, query: None) -> Response:
        runner, job_id, _ = await self._allowed_job(request, "cancel")
        with job_errors():
            await runner.delete(job_id)
        audit.info("%s deleted job %s", audit_name(request.state.principal), job_id)
        return Response(status_code=204)

    async def output(self, request: Request, body: None, query: OutputQuery) -> Response:
        runner, job_id, job = await self._allowed_job(request, "status")
        if query.step is not None and not job.is_task:
            raise HTTPError(404, "not_found", f"job {job_id} has no steps")
        return await output_response(runner, job, query, request.headers.get("accept", ""))
