"""The gateway's ASGI application (Starlette): the broker's modes over HTTP.

It spawns nothing: every request opens one broker session over the Unix socket, so
the broker's limits and policy apply unchanged. Errors are JSON ``{error, detail}``
with a 4xx/5xx status and never a stack trace.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from sockexec_py.client import AsyncSession, BrokerUnavailable, check_broker
from sockexec_py.client.wire import error_frame, frame_json
from sockexec_py.events import Exited, Output

from .auth import TokenStore
from .metrics import GatewayMetrics
from .openapi import OPENAPI
from .request import (
    ExecRequest,
    HTTPError,
    error_response,
    refuse_cross_site,
    refuse_foreign_host,
    require_json,
)
from .sessions import SessionRunner
from .settings import GatewaySettings
from .streaming import NDJSON, SSE, ClientLeft, Stream, unless_client_leaves

log = logging.getLogger(__name__)


class Gateway:
    """Holds the settings, tokens and metrics; its ``app`` is the ASGI application."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.tokens = TokenStore(settings.token_file) if settings.token_file else None
        self.metrics = GatewayMetrics()
        self.sessions = SessionRunner(settings.socket_path, self.metrics, settings.max_output)
        self.app = Starlette(
            routes=[
                Route("/v1/exec", self._guard("oneshot", self.exec_http), methods=["POST"]),
                WebSocketRoute("/v1/exec/ws", self.exec_ws),
                Route("/healthz", self._guard("other", self.healthz, auth=False)),
                Route("/metrics", self._guard("other", self.metrics_endpoint)),
                Route("/openapi.json", self._guard("other", self.openapi, auth=False)),
            ],
            exception_handlers={404: self._not_found, 405: self._not_allowed},
        )

    # -- plumbing ------------------------------------------------------------------

    def _authorized(self, headers: Any) -> bool:
        return self.tokens is None or self.tokens.check(headers.get("authorization"))

    def _screen(self, headers: Any, *, auth: bool) -> None:
        """The checks every request passes, HTTP or WebSocket; HTTPError if refused."""
        refuse_cross_site(headers)
        if self.tokens is None:
            refuse_foreign_host(headers)
        if auth and not self._authorized(headers):
            raise HTTPError(401, "unauthorized", "a valid bearer token is required")

    def _guard(
        self,
        mode: str,
        handler: Callable[[Request], Awaitable[Response]],
        *,
        auth: bool = True,
    ) -> Callable[[Request], Awaitable[Response]]:
        """Auth, JSON errors and the request counter around a handler."""

        async def endpoint(request: Request) -> Response:
            try:
                self._screen(request.headers, auth=auth)
                response = await handler(request)
            except HTTPError as exc:
                response = error_response(exc)
            except ClientLeft:  # nobody reads this answer: 499 is for the metrics (nginx's)
                response = Response(status_code=499)
            counted = getattr(response, "mode", mode)
            self.metrics.requests.labels(counted, str(response.status_code)).inc()
            return response

        return endpoint

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return error_response(HTTPError(404, "not_found", f"no such endpoint: {request.url.path}"))

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return error_response(
            HTTPError(405, "method_not_allowed", f"{request.method} is not allowed here")
        )

    async def _read_json(self, request: Request) -> Any:
        limit = self.settings.max_body
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise HTTPError(413, "too_large", f"the request body exceeds {limit} bytes")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPError(413, "too_large", f"the request body exceeds {limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientLeft from None
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise HTTPError(400, "bad_request", "the body is not valid JSON") from None

    # -- endpoints -------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        """Whether the broker answers. Probes need no token, so the answer says no more
        than that: the reason (which names the socket path) goes to the log."""
        try:
            await check_broker(self.settings.socket_path)
        except BrokerUnavailable as exc:
            log.warning("healthz: %s", exc)
            raise HTTPError(503, "broker_unavailable", "broker unavailable") from None
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def exec_http(self, request: Request) -> Response:
        require_json(request.headers)
        body = await self._read_json(request)
        exec_request = ExecRequest(body, self.settings)
        b64 = request.query_params.get("encoding") == "base64"
        if request.query_params.get("encoding") not in (None, "base64", "text"):
            raise HTTPError(400, "bad_request", "encoding must be text or base64")
        accept = request.headers.get("accept", "")
        if NDJSON in accept or SSE in accept:
            media_type = NDJSON if NDJSON in accept else SSE
            try:  # a stream starts with 200: say "broker down" while a status can
                await check_broker(self.settings.socket_path)
            except BrokerUnavailable as exc:
                raise HTTPError(503, "broker_unavailable", str(exc)) from None
            return Stream(functools.partial(self.sessions.run, exec_request), media_type, b64)
        return await unless_client_leaves(request.receive, lambda: self._oneshot(exec_request, b64))

    async def _oneshot(self, exec_request: ExecRequest, b64: bool) -> Response:
        """Run to the end and answer everything at once (bounded: see
        :meth:`SessionRunner.collect`)."""
        started = time.monotonic()
        ran = await self.sessions.collect(exec_request)
        result: dict[str, Any] = {}
        for kind, data in (("stdout", ran.stdout), ("stderr", ran.stderr)):
            if b64:
                result[f"{kind}_b64"] = base64.b64encode(data).decode()
            else:
                result[kind] = data.decode("utf-8", "replace")
        result.update(
            exitcode=ran.exitcode,
            termsig=ran.termsig,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
        )
        return JSONResponse(result)

    async def exec_ws(self, websocket: WebSocket) -> None:
        """Duplex: JSON request, then stdin messages and ``close_stdin``; frames back."""
        mode = "websocket"
        try:
            self._screen(websocket.headers, auth=True)
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
            try:
                body = json.loads(first.get("text") or "")
            except (ValueError, RecursionError):
                raise HTTPError(
                    400, "bad_request", "the first message must be a JSON request"
                ) from None
            exec_request = ExecRequest(body, self.settings, allow_stdin=False)
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
