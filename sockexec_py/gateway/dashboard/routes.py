"""The dashboard (issue 17): pages at ``/`` of the gateway, same process and port.

Routes (``page`` and ``data`` are GETs, ``change`` a form POST; see :mod:`.site`):

=============================  ======  ============================================
``/``                          page    jobs list: filters, cursor pages, live rows
``/jobs/{id}``                 page    a job: status, times, exit, progress, output
``/jobs/{id}/output``          data    download (``?stream=both|stdout|stderr``)
``/ui/jobs/{id}/live``         data    its output as SSE (``?offset=``), followed
``/ui/events``                 data    job changes as SSE (``?job=ID``: one job)
``/run``                       page    the policy's named commands, one form each
``/run``                       change  submit one: checked, then a job (303)
``/queue``, ``/ui/queue``      page    per name: running / limit, waiting (+ JSON)
``/login``, ``/logout``                the token exchanged for a session cookie
``/static/{name}``                     the script, the style sheet, the icon
=============================  ======  ============================================

Cancelling goes through the API (``POST /v1/jobs/{id}/cancel``) with the session and
its CSRF token (:meth:`.guard.Guard.api_principal`). Each action asks the session's
principal first (``status``, ``run``, ``cancel``), so scoped tokens (issue 16)
limit the dashboard as they limit the API.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from sockexec_py.gateway.auth import Principal, TokenStore, require
from sockexec_py.gateway.jobs_api import JobsService
from sockexec_py.gateway.jobs_views import job_errors
from sockexec_py.gateway.models import OutputQuery
from sockexec_py.gateway.request import HTTPError
from sockexec_py.gateway.settings import GatewaySettings
from sockexec_py.gateway.streaming import SSE, Stream
from sockexec_py.jobs import (
    InvalidField,
    JobState,
    ListQuery,
    Runner,
    Store,
    is_job_id,
    parse_submit,
)
from sockexec_py.jobs.listing import MAX_PAGE

from .commands import Commands
from .forms import run_page
from .guard import Guard, Visit
from .live import MAX_RUNNING, JobFeed
from .logins import Logins
from .site import Form, Site
from .views import PAGE_SIZES, job_page, jobs_page, queue_page

_OFF = "jobs are off: start sockexec-gateway with --data-dir DIR"


@dataclasses.dataclass(frozen=True, slots=True)
class QueueRow:
    name: str
    running: int
    limit: int
    waiting: int


@dataclasses.dataclass(frozen=True, slots=True)
class Queues:
    """The queue view: per name, and the gateway's overall limits."""

    running: int
    max_running: int
    default_limit: int
    queues: list[QueueRow]


def _allow(visit: Visit, action: str, name: str | None = None) -> None:
    """The API's check (403 ``missing_scope`` naming the scope, and its audit line)."""
    require(visit.principal, action, name)


class Dashboard:
    """The dashboard of one gateway.

    Args:
        settings: the gateway's (``policy_file`` and ``public_origin`` are read).
        tokens: the gateway's tokens (``None``: loopback without tokens).
        jobs: the jobs service (``None`` without a data dir: the pages say so).
        count: counts an answered request (mode, status), as the API's.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        tokens: TokenStore | None,
        jobs: JobsService | None,
        count: Callable[[str, int], None],
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.guard = Guard(Logins(tokens), settings.public_origin)
        self.site = Site(self.guard, count)
        self.commands = Commands(settings.policy_file)
        self.feed = JobFeed(jobs)

    def api_principal(self, headers: Headers) -> Principal | None:
        """The gateway's screen hook: who an API request made by a dashboard page
        speaks for (see :meth:`.guard.Guard.api_principal`)."""
        return self.guard.api_principal(headers)

    def routes(self) -> list[BaseRoute]:
        site = self.site
        return [
            Route("/", site.endpoint(self.list_page, "page"), methods=["GET"]),
            Route("/jobs/{job_id}", site.endpoint(self.job_page, "page"), methods=["GET"]),
            Route("/jobs/{job_id}/output", site.endpoint(self.download, "data"), methods=["GET"]),
            Route(
                "/ui/jobs/{job_id}/live", site.endpoint(self.live_output, "data"), methods=["GET"]
            ),
            Route("/ui/events", site.endpoint(self.events, "data"), methods=["GET"]),
            Route("/run", site.endpoint(self.run_form, "page"), methods=["GET"]),
            Route("/run", site.endpoint(self.run, "change"), methods=["POST"]),
            Route("/queue", site.endpoint(self.queue_page, "page"), methods=["GET"]),
            Route("/ui/queue", site.endpoint(self.queue_data, "data"), methods=["GET"]),
            Route("/login", site.login_form, methods=["GET"]),
            Route("/login", site.login, methods=["POST"]),
            Route("/logout", site.endpoint(site.logout, "change"), methods=["POST"]),
            Route("/static/{name}", site.static_file, methods=["GET"]),
        ]

    def _jobs(self) -> tuple[JobsService, Runner, Store]:
        jobs = self.jobs
        if jobs is None or jobs.runner is None or jobs.store is None:
            raise HTTPError(404, "jobs_disabled", _OFF)
        return jobs, jobs.runner, jobs.store

    def _job_id(self, request: Request) -> str:
        job_id: str = request.path_params["job_id"]
        if not is_job_id(job_id):
            raise HTTPError(404, "not_found", f"no job {job_id[:40]!r}")
        return job_id

    # -- the jobs list and a job ---------------------------------------------------

    async def list_page(self, request: Request, visit: Visit, form: Form) -> Response:
        """The jobs list; a token scoped to some names sees only those (and no
        totals, which would count the others), as the API's list."""
        query = request.query_params
        state = query.get("state", "")
        if state not in {s.value for s in JobState}:
            state = ""
        name = query.get("name", "").strip()[:128]
        _allow(visit, "status", name or None)
        only_names, only_prefixes = visit.principal.listing("status")
        limit = int(query["limit"]) if query.get("limit", "").isdigit() else PAGE_SIZES[0]
        limit = limit if 1 <= limit <= MAX_PAGE else PAGE_SIZES[0]
        cursor = query.get("cursor") or None
        began = time.perf_counter()
        if self.jobs is None:
            content = jobs_page(
                [],
                {},
                state=state,
                name=name,
                limit=limit,
                cursor=None,
                next_cursor=None,
                notice=_OFF,
            )
            return self.site.html(visit, "jobs", "Jobs", content)
        _, runner, store = self._jobs()
        with job_errors():
            page = await store.list_jobs(
                ListQuery(
                    states=frozenset({JobState(state)}) if state else None,
                    name=name or None,
                    limit=limit,
                    cursor=cursor,
                    only_names=only_names,
                    only_prefixes=only_prefixes,
                )
            )
            totals = {} if only_names is not None else await store.counts()
        content = jobs_page(
            [runner.current(job) for job in page.jobs],
            {s.value: n for s, n in totals.items()},
            state=state,
            name=name,
            limit=limit,
            cursor=cursor,
            next_cursor=page.next_cursor,
        )
        response = self.site.html(visit, "jobs", "Jobs", content)
        response.headers["server-timing"] = f"app;dur={(time.perf_counter() - began) * 1000:.1f}"
        return response

    async def job_page(self, request: Request, visit: Visit, form: Form) -> Response:
        _allow(visit, "status")
        jobs, runner, _ = self._jobs()
        with job_errors():
            job = await runner.get(self._job_id(request))
        _allow(visit, "status", job.name)
        view = (await jobs.view(job)).model_dump(mode="json")  # with a task's steps
        content = job_page(job, view, can_cancel=visit.principal.allows("cancel", job.name))
        return self.site.html(visit, "job", f"{job.name} {job.id}", content)

    async def download(self, request: Request, visit: Visit, form: Form) -> Response:
        _allow(visit, "status")
        jobs, _, _ = self._jobs()
        job_id = self._job_id(request)
        stream = request.query_params.get("stream", "both")
        if stream not in ("both", "stdout", "stderr"):
            raise HTTPError(400, "bad_request", "stream: expected both, stdout or stderr")
        step = request.query_params.get("step")  # a task's step: unknown names are 404
        query = OutputQuery.model_validate({"stream": stream, "step": step})
        response = await jobs.output(request, None, query)
        suffix = "log" if stream == "both" else stream
        # A step found has a submitted name: [A-Za-z0-9._:@+/-] only.
        name = f"{job_id}.{step.replace('/', '_')}.{suffix}" if step else f"{job_id}.{suffix}"
        response.headers["content-disposition"] = f'attachment; filename="{name}"'
        return response

    async def live_output(self, request: Request, visit: Visit, form: Form) -> Response:
        """The job's output from ``offset`` (bytes of both streams), then as it comes,
        as SSE frames with base64 data: the page decodes the bytes per stream with
        a streaming UTF-8 decoder, so a character cut between two chunks stays whole."""
        _allow(visit, "status")
        jobs, _, _ = self._jobs()
        self._job_id(request)
        raw = request.query_params.get("offset", "0")
        offset = int(raw) if raw.isdigit() else 0
        query = OutputQuery.model_validate(
            {"stream": "both", "offset": offset, "follow": True, "encoding": "base64"}
        )
        return await jobs.output(request, None, query)

    async def events(self, request: Request, visit: Visit, form: Form) -> Response:
        _allow(visit, "status")
        self._jobs()
        job_id = request.query_params.get("job")
        if job_id is not None and not is_job_id(job_id):
            raise HTTPError(404, "not_found", f"no job {job_id[:40]!r}")
        if job_id is not None:  # refused with a status, before the stream begins
            _, runner, _ = self._jobs()
            with job_errors():
                _allow(visit, "status", (await runner.get(job_id)).name)
        principal = visit.principal
        return Stream(lambda emit: self.feed.frames(emit, job_id, principal), SSE)

    # -- the run form -----------------------------------------------------------------

    async def run_form(self, request: Request, visit: Visit, form: Form) -> Response:
        commands = self.commands.all()
        notice = (
            f"The policy could not be read: {self.commands.error}" if self.commands.error else ""
        )
        if self.jobs is None:
            notice = _OFF
        content = run_page(commands, visit.login.csrf, notice=notice)
        return self.site.html(visit, "run", "Run", content)

    async def run(self, request: Request, visit: Visit, form: Form) -> Response:
        """Submit a named command: the parameters checked against its rule here (the
        page checked them too, but a page is not to be trusted), then one job named
        after the command, whose argv the broker's policy expands."""
        name = (form.get("command") or [""])[0]
        params = form.get("param", [])
        command = self.commands.get(name)
        if command is None:
            raise HTTPError(404, "not_found", f"no command {name[:64]!r} in the policy")
        _allow(visit, "run", name)
        _, runner, _ = self._jobs()
        problem = command.problem(params)
        if problem is None:
            try:
                with job_errors():
                    submitted = parse_submit({"argv": [name, *params], "name": name})
                    job, _ = await runner.submit_positioned(submitted)
            except InvalidField as exc:  # pragma: no cover - job_errors maps it
                problem = str(exc)
            except HTTPError as exc:
                if exc.status != 400:
                    raise
                problem = exc.detail
            else:
                return RedirectResponse(f"/jobs/{job.id}", status_code=303)
        content = run_page(
            self.commands.all(), visit.login.csrf, submitted={name: (params, problem)}
        )
        return self.site.html(visit, "run", "Run", content, status=400)

    # -- queues -------------------------------------------------------------------------

    async def _queues(self, principal: Principal) -> Queues:
        """Per name, running / limit and waiting: the names ``principal`` may see
        (the overall running count is every job's: it is what the limits weigh)."""
        jobs, _, store = self._jobs()
        with job_errors():
            waiting = await store.queue_lengths()
            page = await store.list_jobs(
                ListQuery(states=frozenset({JobState.RUNNING}), limit=MAX_RUNNING)
            )
        running = Counter(job.name for job in page.jobs)
        settings = jobs.settings
        every = set(waiting) | set(running) | set(settings.limits)
        names = sorted(name for name in every if principal.allows("status", name))
        return Queues(
            running=sum(running.values()),
            max_running=settings.max_running,
            default_limit=settings.default_limit,
            queues=[
                QueueRow(
                    name,
                    running[name],
                    settings.limits.get(name, settings.default_limit),
                    waiting.get(name, 0),
                )
                for name in names
            ],
        )

    async def queue_page(self, request: Request, visit: Visit, form: Form) -> Response:
        _allow(visit, "status")
        if self.jobs is None:
            content = queue_page([], running=0, max_running=0, default_limit=0, notice=_OFF)
            return self.site.html(visit, "queue", "Queues", content)
        data = await self._queues(visit.principal)
        content = queue_page(
            [(q.name, q.running, q.limit, q.waiting) for q in data.queues],
            running=data.running,
            max_running=data.max_running,
            default_limit=data.default_limit,
        )
        return self.site.html(visit, "queue", "Queues", content)

    async def queue_data(self, request: Request, visit: Visit, form: Form) -> Response:
        _allow(visit, "status")
        return JSONResponse(dataclasses.asdict(await self._queues(visit.principal)))
