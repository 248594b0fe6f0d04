"""Answers that are sent while the program runs, and the watch for an HTTP client that
goes away (the program is then terminated, whatever the mode)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from sockexec_py.client.wire import error_frame, frame_json
from sockexec_py.errors import single_errors
from sockexec_py.events import Exited, Output

from .request import HTTPError

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"

_T = TypeVar("_T")
#: Runs a broker session, handing each frame to the given callable.
SessionRun = Callable[[Callable[[Output | Exited], Awaitable[None]]], Awaitable[None]]


class ClientLeft(Exception):
    """The HTTP client went away before its answer was complete."""


async def unless_client_leaves(receive: Receive, work: Callable[[], Awaitable[_T]]) -> _T:
    """``await work()``, cancelled if the HTTP client goes away first.

    The disconnect is watched for on ``receive`` (call it once the request body has
    been read), so it is seen even while the program prints nothing and nothing is
    being sent. A broker session inside ``work`` is then closed, which makes the
    broker terminate the program.

    Error handling: raises :class:`ClientLeft` if the client left first; what
    ``work`` raises propagates as itself.
    """
    left = False
    with single_errors():
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                nonlocal left
                while (await receive())["type"] != "http.disconnect":
                    pass
                left = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            result = await work()
            nursery.cancel_scope.cancel()
    if left:
        raise ClientLeft
    return result


class Stream(Response):
    """NDJSON or SSE frames as they happen; the program is terminated if the HTTP
    client goes away (see :func:`unless_client_leaves`)."""

    def __init__(self, run_session: SessionRun, media_type: str, b64: bool) -> None:
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        # No content-length: the body is streamed. No caching or proxy buffering
        # (X-Accel-Buffering is nginx's): each frame must reach the client at once.
        self.raw_headers = [
            (b"content-type", media_type.encode("latin-1")),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self.run_session, self.b64 = run_session, b64
        self.mode = "ndjson" if media_type == NDJSON else "sse"

    def _encode(self, obj: dict[str, Any]) -> bytes:
        line = json.dumps(obj)
        if self.media_type == SSE:
            return f"event: {obj['type']}\ndata: {line}\n\n".encode()
        return (line + "\n").encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def forward(event: Output | Exited) -> None:
            body = self._encode(frame_json(event, self.b64))
            await send({"type": "http.response.body", "body": body, "more_body": True})

        async def stream() -> None:
            try:
                await self.run_session(forward)
            except HTTPError as exc:
                error = error_frame(exc.status, exc.error, exc.detail)
                await send(
                    {"type": "http.response.body", "body": self._encode(error), "more_body": True}
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        with contextlib.suppress(ClientLeft):
            await unless_client_leaves(receive, stream)
