"""The gateway's ASGI application (Starlette): the broker's modes over HTTP, and
the jobs API with a data dir (:mod:`.jobs_api`).

It spawns nothing: every request (and every job) opens one broker session over the
Unix socket, so the broker's limits and policy apply unchanged. Errors are JSON
``{error, detail}`` with a 4xx/5xx status and never a stack trace.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from sockexec_py._version import __version__
from sockexec_py.client import AsyncSession, BrokerUnavailable, check_broker
from sockexec_py.client.wire import error_frame, frame_json
from sockexec_py.events import Exited, Output
from sockexec_py.jobs import JobError

from .api import Api, validation_error
from .auth import ANONYMOUS, NOBODY, Principal, TokenStore, describe_expiry, require
from .dashboard import Dashboard
from .exec_lane import ExecLane
from .jobs_api import JobsService
from .metrics import GatewayMetrics
from .models import EXEC_WS_PATH, EncodingQuery, ExecRequest, ExecResult, Health
from .monitor import MonitorEndpoint
from .monitor_query import MONITOR_PATH
from .monitor_wire import WireMonitors
from .request import (
    ExecCall,
    HTTPError,
    error_response,
    exec_call,
    refuse_cross_site,
    refuse_foreign_host,
)
from .sessions import SessionRunner
from .settings import GatewaySettings, JobsSettings
from .streaming import NDJSON, SSE, Stream, session_frames, unless_client_leaves
from .ws_handshake import not_an_upgrade

log = logging.getLogger(__name__)

#: What the jobs routes are declared with when jobs are off (never opened).
_NO_JOBS = JobsSettings(data_dir="")

_EXEC_REQUEST: TypeAdapter[ExecRequest] = TypeAdapter(ExecRequest)


class Gateway:
    """Holds the settings, tokens, metrics and (with a data dir) the jobs service;
    its ``app`` is the ASGI application. Every HTTP route is declared on :attr:`api`
    with its models, which also make ``/openapi.json``."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.tokens = TokenStore(settings.token_file) if settings.token_file else None
        self.metrics = GatewayMetrics()
        self.sessions = SessionRunner(settings.socket_path, self.metrics, settings.max_output)
        self.jobs = (
            JobsService(settings.jobs, settings.socket_path, self.metrics)
            if settings.jobs is not None
            else None
        )
        #: The one line saying why the app could not start (the CLI prints it).
        self.startup_error: str | None = None
        self.api = api = Api(self._screen, self._count, settings.max_body)
        api.route(
            "POST",
            "/v1/exec",
            "Run a program (one-shot JSON, or streamed frames by Accept)",
            body=ExecRequest,
            query=EncodingQuery,
            answer=ExecResult,
            errors=(502, 503, 504),
            mode="oneshot",
            media={
                NDJSON: 'One JSON frame per line: {"type": "stdout"|"stderr", "data"} '
                '(or "data_b64"), then {"type": "exit", "exitcode", "termsig"}',
                SSE: "The same frames as server-sent events",
            },
        )(self.exec_http)
        api.route(
            "GET",
            "/healthz",
            "Whether the broker socket answers",
            answer=Health,
            errors=(503,),
            auth=False,
        )(self.healthz)
        api.route(
            "GET",
            "/metrics",
            "Prometheus metrics",
            media={"text/plain": "Prometheus text format"},
        )(self.metrics_endpoint)
        api.route(
            "GET",
            "/openapi.json",
            "This document (OpenAPI 3.1, generated from the models)",
            media={"application/json": "OpenAPI 3.1"},
            auth=False,
        )(self.openapi)
        # Declared even without a data dir: they answer 404 jobs_disabled then.
        (self.jobs or JobsService(_NO_JOBS, settings.socket_path, self.metrics)).register(api)
        self.document = api.openapi(
            {
                "title": "sockexec-gateway",
                "version": __version__,
                "description": "Runs programs through the sockexec_py broker: one-shot, "
                "streamed (NDJSON or SSE), duplex (WebSocket /v1/exec/ws) and as jobs "
                "and multi-step tasks (/v1/jobs, with --data-dir), with their events "
                "(WebSocket /v1/monitor) and signed callbacks.",
            },
            {"/v1/exec/ws": EXEC_WS_PATH, "/v1/monitor": MONITOR_PATH},
        )
        self.dashboard = Dashboard(settings, self.tokens, self.jobs, self._count)
        monitor = MonitorEndpoint(self.jobs, self._screen, self.metrics)
        #: The monitors the front door serves itself (see :mod:`.frontdoor`).
        self.monitors = WireMonitors(monitor)
        self.app = Starlette(
            routes=[
                *api.routes(),
                WebSocketRoute("/v1/exec/ws", self.exec_ws),
                WebSocketRoute("/v1/monitor", monitor.serve),
                Route("/v1/monitor", self._monitor_without_upgrade, methods=["GET"]),
                *self.dashboard.routes(),
            ],
            exception_handlers={404: self._not_found, 405: self._not_allowed},
            lifespan=self._lifespan,
        )
        #: ``POST /v1/exec`` without Hypercorn's per-request path (see :mod:`.exec_lane`).
        self.exec_lane = ExecLane(self.app, settings.max_body, self.metrics.lane_requests.inc)

    # -- plumbing ------------------------------------------------------------------

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """The jobs service runs for the life of the app (one nursery, its own)."""
        if self.jobs is None:
            yield
            return
        started = False
        try:
            async with self.jobs.running():
                started = True
                yield
        except JobError as exc:
            if not started:
                self.startup_error = str(exc)
            raise

    @asynccontextmanager
    async def prepared(self) -> AsyncIterator[None]:
        """What the app needs before it may listen: the jobs' data dir, opened and
        locked (see :meth:`JobsService.opened`); nothing without jobs."""
        if self.jobs is None:
            yield
            return
        async with self.jobs.opened():
            yield

    def _screen(self, headers: Headers, auth: bool) -> Principal:
        """The checks every request passes, HTTP or WebSocket; HTTPError if refused.

        Returns who the request speaks for (:data:`ANONYMOUS` without tokens, or for
        an endpoint that needs none)."""
        # A dashboard page's own requests: its session, same-origin (issue 17).
        principal = self.dashboard.api_principal(headers)
        if principal is not None:
            return principal
        refuse_cross_site(headers)
        if self.tokens is None:
            refuse_foreign_host(headers)
            return ANONYMOUS
        if not auth:
            return NOBODY
        principal = self.tokens.check(headers.get("authorization"))
        if principal is None:
            raise HTTPError(401, "unauthorized", "a valid bearer token is required")
        if self.tokens.expired(principal):
            assert principal.expires is not None
            expiry = describe_expiry(principal.expires)
            raise HTTPError(401, "token_expired", f"this token expired at {expiry}")
        return principal

    def _count(self, mode: str, status: int) -> None:
        self.metrics.requests.labels(mode, str(status)).inc()

    async def _monitor_without_upgrade(self, request: Request) -> Response:
        """A plain GET of the monitor on a connection's later request: the front
        door's answer to one that comes first (see :mod:`.frontdoor`)."""
        self._count("monitor", 400)
        return error_response(not_an_upgrade(request.url.path))

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return error_response(HTTPError(404, "not_found", f"no such endpoint: {request.url.path}"))

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return error_response(
            HTTPError(405, "method_not_allowed", f"{request.method} is not allowed here")
        )

    # -- endpoints -------------------------------------------------------------------

    async def healthz(self, request: Request, body: None, query: None) -> Health:
        """Whether the broker answers. Probes need no token, so the answer says no more
        than that: the reason (which names the socket path) goes to the log."""
        try:
            await check_broker(self.settings.socket_path)
        except BrokerUnavailable as exc:
            log.warning("healthz: %s", exc)
            raise HTTPError(503, "broker_unavailable", "broker unavailable") from None
        return Health(status="ok")

    async def metrics_endpoint(self, request: Request, body: None, query: None) -> Response:
        require(request.state.principal, "admin")
        if self.jobs is not None:
            await self.jobs.refresh_metrics()
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request, body: None, query: None) -> Response:
        return JSONResponse(self.document)

    async def exec_http(
        self, request: Request, body: ExecRequest, query: EncodingQuery
    ) -> Response | ExecResult:
        require(request.state.principal, "exec", body.argv[0])
        call = exec_call(body, self.settings)
        b64 = query.encoding == "base64"
        accept = request.headers.get("accept", "")
        if NDJSON in accept or SSE in accept:
            media_type = NDJSON if NDJSON in accept else SSE
            try:  # a stream starts with 200: say "broker down" while a status can
                await check_broker(self.settings.socket_path)
            except BrokerUnavailable as exc:
                raise HTTPError(503, "broker_unavailable", str(exc)) from None
            run = functools.partial(self.sessions.run, call)
            return Stream(session_frames(run, b64), media_type)
        return await unless_client_leaves(request.receive, lambda: self._oneshot(call, b64))

    async def _oneshot(self, call: ExecCall, b64: bool) -> ExecResult:
        """Run to the end and answer everything at once (bounded: see
        :meth:`SessionRunner.collect`)."""
        started = time.monotonic()
        ran = await self.sessions.collect(call)
        result: dict[str, Any] = {}
        for kind, data in (("stdout", ran.stdout), ("stderr", ran.stderr)):
            if b64:
                result[f"{kind}_b64"] = base64.b64encode(data).decode()
            else:
                result[kind] = data.decode("utf-8", "replace")
        return ExecResult(
            **result,
            exitcode=ran.exitcode,
            termsig=ran.termsig,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
        )

    async def exec_ws(self, websocket: WebSocket) -> None:
        """Duplex: JSON request, then stdin messages and ``close_stdin``; frames back."""
        mode = "websocket"
        try:
            principal = self._screen(websocket.headers, auth=True)
        except HTTPError as exc:
            # Refused before the handshake: an HTTP answer with the real status and the
            # JSON error body, as a POST gets (ASGI's WebSocket denial response, which
            # hypercorn supports; a bare close would show every client a 403).
            if "websocket.http.response" in websocket.scope.get("extensions", {}):
                await websocket.send_denial_response(error_response(exc))
            else:  # an ASGI server without the extension: the client sees a 403
                await websocket.close(code=4000 + exc.status, reason=exc.detail)
            self.metrics.requests.labels(mode, str(exc.status)).inc()
            return
        await websocket.accept()
        status = "200"
        try:
            first = await websocket.receive()
            if first["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(first.get("code", 1000))
            text = first.get("text")
            if text is None:
                raise HTTPError(400, "bad_request", "the first message must be a JSON request")
            try:
                body = _EXEC_REQUEST.validate_json(text)
            except ValidationError as exc:
                raise validation_error(exc) from None
            require(principal, "exec", body.argv[0])
            exec_request = exec_call(body, self.settings, allow_stdin=False)
            b64 = websocket.query_params.get("encoding") == "base64"

            async def forward(event: Output | Exited) -> None:
                await websocket.send_text(json.dumps(frame_json(event, b64)))

            await self.sessions.run(
                exec_request, forward, lambda session: self._ws_stdin(websocket, session)
            )
            await websocket.close()
        except HTTPError as exc:
            status = str(exc.status)
            await websocket.send_text(json.dumps(error_frame(exc.status, exc.error, exc.detail)))
            await websocket.close(code=1011 if exc.status >= 500 else 1008)
        except WebSocketDisconnect:
            status = "499"  # the client left: the session was closed, the program terminated
        finally:
            self.metrics.requests.labels(mode, status).inc()

    async def _ws_stdin(self, websocket: WebSocket, session: AsyncSession) -> None:
        """Stdin messages to the program until ``close_stdin``, and the client watched
        until the session ends: leaving at any time (even after ``close_stdin``, while
        the program prints nothing) raises WebSocketDisconnect, which closes the broker
        session, so the program is terminated. ``{"type": "terminate"}`` asks the
        broker to terminate it (the exit frame still comes). Stdin after
        ``close_stdin`` is dropped, as :meth:`AsyncSession.send` drops it."""
        total, stdin_open = 0, True
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            data: bytes
            if message.get("bytes") is not None:
                data = message["bytes"]
            else:
                text = message.get("text") or ""
                control = _control(text)
                if control == "close_stdin":
                    await session.close_stdin()
                    stdin_open = False
                    continue
                if control == "terminate":
                    await session.terminate()
                    stdin_open = False
                    continue
                data = text.encode()
            if not stdin_open:
                continue
            total += len(data)
            if total > self.settings.max_ws_stdin:
                raise HTTPError(
                    413, "too_large", f"stdin exceeds {self.settings.max_ws_stdin} bytes"
                )
            self.metrics.bytes_in.inc(len(data))
            await session.send(data)


def _control(text: str) -> str | None:
    """The type of a control message (``{"type": "close_stdin"}``...), None for stdin."""
    if not text.startswith("{"):
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    kind = message.get("type") if isinstance(message, dict) else None
    return kind if kind in ("close_stdin", "terminate") else None
