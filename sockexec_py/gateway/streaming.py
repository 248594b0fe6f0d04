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
#: Sends one JSON frame of a stream.
Emit = Callable[[dict[str, Any]], Awaitable[None]]
#: Produces a stream's frames (a broker session, a job's output), handing each to emit.
Produce = Callable[[Emit], Awaitable[None]]


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


def session_frames(
    run_session: Callable[[Callable[[Output | Exited], Awaitable[None]]], Awaitable[None]],
    b64: bool,
) -> Produce:
    """A broker session's frames as a stream's JSON frames."""

    async def produce(emit: Emit) -> None:
        await run_session(lambda frame: emit(frame_json(frame, b64)))

    return produce


class Stream(Response):
    """NDJSON or SSE frames as they happen; the producer is cancelled (a broker
    session closed: the program is terminated) if the HTTP client goes away (see
    :func:`unless_client_leaves`). An :class:`HTTPError` after the answer started
    becomes an ``error`` frame."""

    def __init__(self, produce: Produce, media_type: str) -> None:
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
        self.produce = produce
        self.mode = "ndjson" if media_type == NDJSON else "sse"

    def _encode(self, obj: dict[str, Any]) -> bytes:
        line = json.dumps(obj)
        if self.media_type == SSE:
            return f"event: {obj['type']}\ndata: {line}\n\n".encode()
        return (line + "\n").encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def emit(obj: dict[str, Any]) -> None:
            body = self._encode(obj)
            await send({"type": "http.response.body", "body": body, "more_body": True})

        async def stream() -> None:
            try:
                await self.produce(emit)
            except HTTPError as exc:
                await emit(error_frame(exc.status, exc.error, exc.detail))
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        with contextlib.suppress(ClientLeft):
            await unless_client_leaves(receive, stream)
