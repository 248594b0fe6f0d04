"""The front door's lane for one-shot runs: plain ``POST /v1/exec`` requests read and
answered by a small HTTP/1.1 loop that calls the same ASGI app as Hypercorn does.

Why: a one-shot ``true`` through Hypercorn cost the gateway ~1.3 ms of CPU, ~40% of
it in Hypercorn and h11 (a task and several queue hand-offs per request), and the
gateway served a third of the broker's own rate (issue 14, bench row 7). The app,
and so every check, model, error and metric of the endpoint, is the same on both
paths; only the HTTP/1.1 framing around it is ours here.

The lane takes only requests whose every byte it understands, and hands the
connection to Hypercorn for good, with every byte read so far, at the first one it
does not: a request line other than ``POST /v1/exec[?query] HTTP/1.1``, a head over
:data:`MAX_HEAD`, a header line that is not plain ``name: value``,
``Transfer-Encoding``, ``Expect``, ``Upgrade``, a ``Connection`` other than
keep-alive, a missing, repeated, malformed or too large ``Content-Length``, or an
``Accept`` that asks for a stream (NDJSON, SSE). So whatever is unusual, wrong or
hostile gets Hypercorn's answer, as before; what the lane answers it answers with
Hypercorn's status line and its ``date`` and ``server`` headers.

The connection's life follows Hypercorn's (0.18, h11) rules too, each checked
against it in ``tests/test_gateway_exec_lane.py``:

- a head must be complete within the keep-alive timeout of the previous answer (or
  of the connection's start); a body may take its time;
- a connection ends after an answer given before the whole body came (401, 415...),
  after ``keep_alive_max_requests`` answers (the last one says ``connection:
  close``; after a hand-over Hypercorn counts the lane's too), and after the
  current answer once the gateway stops;
- a request that starts with a byte no request line can start with gets
  Hypercorn's 400 at once (h11 refuses it before the line ends);
- an answer h11 would refuse to write (a malformed header, a wrong length) is
  Hypercorn's 500 instead;
- the client's end of the connection (EOF) is a disconnect for the app (which ends
  the program and counts 499), unless a pipelined request is waiting, as h11 reads
  nothing more then; inside a head it gets Hypercorn's 400, inside a body a 400 as
  h11's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, MutableSet
from typing import Any, Literal

import trio
from hypercorn.config import Config
from hypercorn.utils import parse_socket_addr

from .exec_head import EXEC_REQUEST, MAX_HEAD, Request, answer_head, parse_head

__all__ = ["EXEC_REQUEST", "ExecLane", "Replayed"]

#: Bytes asked of the socket at a time.
_READ = 65536

log = logging.getLogger("sockexec_py.gateway")


class Replayed:
    """A socket stream whose first reads return ``unread`` (what the lane read and
    did not serve): what Hypercorn's ``TCPServer`` is handed."""

    def __init__(self, stream: trio.SocketStream, unread: bytes) -> None:
        self.socket = stream.socket
        self._stream = stream
        self._unread = unread

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._unread:
            data, self._unread = self._unread, b""
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


#: Hands a connection to Hypercorn (a :class:`Replayed` stream) until it ends, with
#: the number of requests the lane answered on it (Hypercorn's limit counts them).
HandOver = Callable[[Replayed, int], Awaitable[None]]


class ExecLane:
    """Serves the connections whose first request is ``POST /v1/exec`` (see the
    module's docstring); the front door calls :meth:`attach` before the first.

    Args:
        app: the ASGI app (the same one Hypercorn serves).
        max_body: the largest body the lane reads (the app's limit; larger ones get
            Hypercorn's path and its 413).
        served: counts each request the lane answers.
    """

    def __init__(self, app: Any, max_body: int, served: Callable[[], None]) -> None:
        self.app = app
        self.max_body = max_body
        self._served = served
        self.config = Config()
        self.idle: MutableSet[trio.CancelScope] = set()
        self.stopping: Callable[[], bool] = lambda: False

    def attach(
        self,
        config: Config,
        idle: MutableSet[trio.CancelScope],
        stopping: Callable[[], bool],
    ) -> None:
        """The front door's side: Hypercorn's ``config`` (timeouts, answer headers),
        the cancel scopes of connections waiting between requests (cancelled when
        the gateway stops) and whether it stops (no request is read then)."""
        self.config, self.idle, self.stopping = config, idle, stopping

    async def serve(
        self, stream: trio.SocketStream, state: dict[str, Any], hand_over: HandOver
    ) -> None:
        """The connection until it closes or goes to ``hand_over``; never raises."""
        sock = stream.socket
        try:
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
        except OSError:
            await stream.aclose()
            return
        buffer = bytearray()
        deadline = trio.current_time() + self.config.keep_alive_timeout
        try:
            for count in range(1, self.config.keep_alive_max_requests + 1):
                request = await self._read_head(stream, buffer, deadline)
                if request is None:
                    return
                if request is False:
                    await hand_over(Replayed(stream, bytes(buffer)), count - 1)
                    return
                exchange = _Exchange(stream, buffer, request)
                last = count == self.config.keep_alive_max_requests
                if not await self._answer(exchange, state, client, server, last):
                    return
                if last or self.stopping() or not exchange.skip_body():
                    return
                deadline = trio.current_time() + self.config.keep_alive_timeout
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # a bug: this connection ends, the gateway goes on
            log.exception("connection failed")
        finally:
            await stream.aclose()

    async def _read_head(
        self, stream: trio.SocketStream, buffer: bytearray, deadline: float
    ) -> Request | Literal[False] | None:
        """The next request (False: not ours, None: the connection ends)."""
        while True:
            end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD)
            head = buffer[:MAX_HEAD] if end < 0 else buffer[:end]
            if head.count(b"\n") != head.count(b"\r\n"):
                return False  # bare line feeds, which h11 takes and the lane does not
            if end >= 0:
                break
            if buffer and buffer[0] < 0x21:  # h11 refuses such a start at once (400)
                return False
            if len(buffer) >= MAX_HEAD:
                return False
            if self.stopping():  # as Hypercorn's: a connection without a whole request is idle
                return None
            with trio.CancelScope(deadline=deadline) as waiting:
                self.idle.add(waiting)
                try:
                    data = await stream.receive_some(_READ)
                finally:
                    self.idle.discard(waiting)
            if waiting.cancelled_caught:  # idle past the keep-alive, or the gateway stops
                return None
            if not data:  # a head cut short gets Hypercorn's 400 (h11's error)
                return False if buffer else None
            buffer += data
        return parse_head(buffer, self.max_body) or False

    async def _answer(
        self,
        exchange: _Exchange,
        state: dict[str, Any],
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        last: bool,
    ) -> bool:
        """Run the app for the request and write its answer (``last``: with
        ``connection: close``); whether the connection may serve another."""
        request = exchange.request
        scope = {
            "type": "http",
            "http_version": "1.1",
            "asgi": {"spec_version": "2.1", "version": "3.0"},
            "method": "POST",
            "scheme": "http",
            "path": "/v1/exec",
            "raw_path": b"/v1/exec",
            "query_string": request.query,
            "root_path": self.config.root_path,
            "headers": request.headers,
            "client": client,
            "server": server,
            "state": state.copy(),
            "extensions": {},
        }
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except Exception:  # Starlette may have sent its 500 first
            log.exception("Error in ASGI Framework")  # Hypercorn's words
        if exchange.truncated:  # the body was cut short: h11's answer, whatever the app's
            await exchange.stream.send_all(self._error(400))
            return False
        head = exchange.head()
        if head is None:  # h11 would refuse to write it: Hypercorn's 500
            if exchange.started:
                log.error("the app's answer to POST /v1/exec was incomplete or malformed")
            await exchange.stream.send_all(self._error(500))
            return False
        ending = last or any(  # the app's own "connection: close" too, as h11 reads it
            name.lower() == b"connection" and value.lower() == b"close"
            for name, value in exchange.headers
        )
        extra = self._fixed_headers() + (b"connection: close\r\n" if last else b"")
        await exchange.stream.send_all(head + extra + b"\r\n" + exchange.body)
        self._served()
        return not (exchange.gone or ending)

    def _error(self, status: int) -> bytes:
        """Hypercorn's own error answer (an empty body, and the connection closes)."""
        return (
            b"HTTP/1.1 %d \r\ncontent-length: 0\r\nconnection: close\r\n" % status
            + self._fixed_headers()
            + b"\r\n"
        )

    def _fixed_headers(self) -> bytes:
        """Hypercorn's own answer headers (``date``, ``server``)."""
        return b"".join(b"%s: %s\r\n" % pair for pair in self.config.response_headers("h11"))


class _Exchange:
    """One request's ASGI ``receive`` and ``send`` over the connection.

    ``receive`` gives the body as it comes (the app may answer before reading it
    all, as with a wrong content type), then ``http.disconnect`` once the client
    goes away; bytes read meanwhile (a pipelined next request, at most one read)
    stay in the connection's buffer. The answer is buffered (a one-shot answer is
    bounded by ``--max-output``) and written whole by the lane.
    """

    def __init__(self, stream: trio.SocketStream, buffer: bytearray, request: Request) -> None:
        self.stream = stream
        self.buffer = buffer
        self.request = request
        del buffer[: request.start]  # the head
        self.body = b""
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.started = False  # http.response.start came
        self.done = False  # the last body part came
        self.gone = False  # the client closed its side (or the socket broke)
        self.truncated = False  # ... before the whole body came
        self._unread = request.length  # of the request's body
        self._given = False  # the whole body went to the app

    async def _read(self) -> bool:
        """More bytes into the buffer; False (and ``gone``) at the client's end."""
        try:
            data = await self.stream.receive_some(_READ)
        except (trio.BrokenResourceError, OSError):
            data = b""
        self.buffer += data
        self.gone = not data
        return not self.gone

    async def receive(self) -> dict[str, Any]:
        while not self._given:
            if self.buffer or not self._unread:
                take = min(len(self.buffer), self._unread)
                chunk = bytes(self.buffer[:take])
                del self.buffer[:take]
                self._unread -= take
                self._given = not self._unread
                return {"type": "http.request", "body": chunk, "more_body": not self._given}
            if not await self._read():
                self.truncated = True
                return {"type": "http.disconnect"}
        while not self.gone and not self.done:
            if self.buffer:  # a pipelined request: h11 reads on only after this answer
                await trio.sleep_forever()  # the app's own end cancels this watch
            await self._read()
        return {"type": "http.disconnect"}

    def head(self) -> bytes | None:
        """The answer's head without its last CRLF (see :func:`answer_head`);
        None for an incomplete answer or one h11 would refuse to write."""
        return answer_head(self.status, self.headers, self.body) if self.done else None

    def skip_body(self) -> bool:
        """After the answer: the rest of a body the app did not read dropped, if it
        came (while the app ran, Hypercorn reads on; what is in the socket now is
        taken without waiting); False if it did not (Hypercorn ends such a
        connection)."""
        fd = self.stream.socket.fileno()
        while len(self.buffer) < self._unread:
            try:
                data = os.read(fd, _READ)
            except (BlockingIOError, OSError):
                return False
            if not data:
                return False
            self.buffer += data
        del self.buffer[: self._unread]
        self._unread = 0
        return True

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start" and not self.started:
            self.started = True
            self.status = int(message["status"])
            self.headers = [(bytes(n), bytes(v)) for n, v in message.get("headers", ())]
        elif kind == "http.response.body" and self.started and not self.done:
            self.body += bytes(message.get("body", b""))
            self.done = not message.get("more_body", False)
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
