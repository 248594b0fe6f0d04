"""Plain HTTP requests to the gateway's REST endpoints (the jobs API), one exchange
per connection, on the sans-IO ``h11``: :class:`Exchange` turns a request into bytes
and the answer's bytes into its status, body pieces and end, and two drivers move
the bytes, blocking (:func:`call`, :func:`lines`) and trio (:func:`acall`,
:func:`alines`), as the session states and their drivers do for the WebSocket.

Error handling: a gateway that cannot be reached is :class:`BrokerUnavailable` (as
for the other gateway calls); an answer that is not 2xx is raised by ``refuse``
(the caller's mapping of statuses to typed errors, :func:`~.wire.raise_for_status`
by default); a broken answer is a :class:`ProtocolError`.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import trio

from sockexec_py.errors import BrokerUnavailable, ProtocolError, Timeout

from ._common import RECV_CHUNK, gateway_extra

with gateway_extra():
    import h11

    from ._websocket import GatewayAddress

from .wire import auth_headers, raise_for_status

#: Raises the typed error of a refusal: (status, body).
Refuse = Callable[[int, bytes], NoReturn]
#: The longest NDJSON line taken from a stream (a job's frames are ~350 KiB).
MAX_LINE = 16 << 20


class Exchange:
    """One request and its answer (sans-IO): :meth:`opening` gives the bytes to
    send, :meth:`receive_data` takes what arrived (``b""`` at the end), and
    :meth:`next_event` gives the status (an int, first), then body pieces (bytes),
    then ``None`` at the end, or :data:`h11.NEED_DATA`."""

    def __init__(
        self,
        address: GatewayAddress,
        method: str,
        target: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        self._conn = h11.Connection(h11.CLIENT)
        self._payload = b"" if body is None else json.dumps(body).encode()
        all_headers = {
            "Host": address.netloc,
            "Connection": "close",
            "Content-Length": str(len(self._payload)),
            **({"Content-Type": "application/json"} if body is not None else {}),
            **auth_headers(token),
            **(headers or {}),
        }
        self._request = h11.Request(
            method=method, target=address.prefix + target, headers=list(all_headers.items())
        )

    def opening(self) -> bytes:
        data = self._conn.send(self._request) or b""
        if self._payload:
            data += self._conn.send(h11.Data(data=self._payload)) or b""
        return data + (self._conn.send(h11.EndOfMessage()) or b"")

    def receive_data(self, data: bytes) -> None:
        self._conn.receive_data(data)

    def next_event(self) -> int | bytes | type[h11.NEED_DATA] | None:
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProtocolError(f"the gateway sent a broken answer: {exc}") from None
        if isinstance(event, h11.InformationalResponse):
            return self.next_event()
        if isinstance(event, h11.Response):
            return event.status_code
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return None
        if event is h11.NEED_DATA:
            return h11.NEED_DATA
        raise ProtocolError(f"the gateway closed the connection mid-answer ({event!r})")


def _split_lines(buffer: bytearray, data: bytes) -> Iterator[bytes]:
    buffer += data
    while (end := buffer.find(b"\n")) >= 0:
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        if line.strip():
            yield line
    if len(buffer) > MAX_LINE:
        raise ProtocolError(f"a line of the gateway's stream is longer than {MAX_LINE} bytes")


# -- blocking ----------------------------------------------------------------------


def _connect(address: GatewayAddress, timeout: float | None) -> socket.socket:
    try:
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
    except TimeoutError:
        raise Timeout(f"{address.url}: the gateway did not answer in time") from None
    except OSError as exc:
        raise BrokerUnavailable(f"cannot reach the gateway at {address.url}: {exc}") from None
    if address.secure:
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=address.host)
    return sock


def _events(exchange: Exchange, address: GatewayAddress, timeout: float | None) -> Iterator[Any]:
    with _connect(address, timeout) as sock:
        try:
            sock.sendall(exchange.opening())
            while True:
                event = exchange.next_event()
                if event is h11.NEED_DATA:
                    exchange.receive_data(sock.recv(RECV_CHUNK))
                    continue
                yield event
                if event is None:
                    return
        except TimeoutError:
            raise Timeout(f"{address.url}: the gateway did not answer in time") from None
        except OSError as exc:
            raise BrokerUnavailable(f"the connection to {address.url} failed: {exc}") from None


def _answer(events: Iterator[Any], refuse: Refuse) -> Iterator[bytes]:
    """The body pieces of a 2xx answer; a refusal's whole body goes to ``refuse``."""
    status = next(events)
    if not 200 <= status < 300:
        refuse(status, b"".join(piece for piece in events if piece is not None))
    for piece in events:
        if piece is None:
            return
        yield piece


def call(
    url: str,
    method: str,
    target: str,
    body: Any = None,
    *,
    token: str | None = None,
    timeout: float | None = None,
    refuse: Refuse = raise_for_status,
) -> Any:
    """One request; the decoded JSON answer (``None`` for an empty one)."""
    address = GatewayAddress(url)
    exchange = Exchange(address, method, target, body, token=token)
    data = b"".join(_answer(_events(exchange, address, timeout), refuse))
    return json.loads(data) if data else None


def lines(
    url: str,
    target: str,
    *,
    token: str | None = None,
    timeout: float | None = None,
    refuse: Refuse = raise_for_status,
) -> Iterator[Any]:
    """``GET target`` as NDJSON: each line decoded, as it arrives."""
    address = GatewayAddress(url)
    exchange = Exchange(
        address, "GET", target, headers={"Accept": "application/x-ndjson"}, token=token
    )
    buffer = bytearray()
    for piece in _answer(_events(exchange, address, timeout), refuse):
        for line in _split_lines(buffer, piece):
            yield json.loads(line)


# -- trio ----------------------------------------------------------------------------


class _AsyncAnswer:
    """The answer of one exchange over a trio stream, read piece by piece (a plain
    object, not an async generator: leaving early leaves nothing to finalise)."""

    def __init__(self, exchange: Exchange, stream: trio.abc.Stream, url: str) -> None:
        self._exchange = exchange
        self._stream = stream
        self._url = url
        self._ended = False

    async def _next(self) -> Any:
        try:
            while (event := self._exchange.next_event()) is h11.NEED_DATA:
                data = await self._stream.receive_some(RECV_CHUNK)
                self._exchange.receive_data(bytes(data))
        except (trio.BrokenResourceError, OSError) as exc:
            raise BrokerUnavailable(f"the connection to {self._url} failed: {exc}") from None
        return event

    async def piece(self) -> bytes | None:
        """The next piece of the body, or None at its end."""
        if self._ended:
            return None
        piece = await self._next()
        self._ended = piece is None
        return piece  # type: ignore[no-any-return]

    async def rest(self) -> bytes:
        pieces = []
        while (piece := await self.piece()) is not None:
            pieces.append(piece)
        return b"".join(pieces)


@asynccontextmanager
async def _aopen(
    url: str, method: str, target: str, body: Any, token: str | None, refuse: Refuse, **headers: str
) -> AsyncIterator[_AsyncAnswer]:
    address = GatewayAddress(url)
    exchange = Exchange(address, method, target, body, headers, token=token)
    try:
        stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)
    except OSError as exc:
        raise BrokerUnavailable(f"cannot reach the gateway at {address.url}: {exc}") from None
    if address.secure:
        stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=address.host)
    async with stream:
        try:
            await stream.send_all(exchange.opening())
        except (trio.BrokenResourceError, OSError) as exc:
            raise BrokerUnavailable(f"the connection to {address.url} failed: {exc}") from None
        answer = _AsyncAnswer(exchange, stream, address.url)
        status = await answer._next()
        if not 200 <= status < 300:
            refuse(status, await answer.rest())
        yield answer


async def acall(
    url: str,
    method: str,
    target: str,
    body: Any = None,
    *,
    token: str | None = None,
    refuse: Refuse = raise_for_status,
) -> Any:
    """The trio flavour of :func:`call` (bound it with trio's cancel scopes)."""
    async with _aopen(url, method, target, body, token, refuse) as answer:
        data = await answer.rest()
    return json.loads(data) if data else None


class AsyncLines:
    """NDJSON lines of an answer, decoded, as they arrive (``async for``)."""

    def __init__(self, answer: _AsyncAnswer) -> None:
        self._answer = answer
        self._buffer = bytearray()
        self._ready: list[bytes] = []

    def __aiter__(self) -> AsyncLines:
        return self

    async def __anext__(self) -> Any:
        while not self._ready:
            piece = await self._answer.piece()
            if piece is None:
                raise StopAsyncIteration
            self._ready.extend(_split_lines(self._buffer, piece))
        return json.loads(self._ready.pop(0))


@asynccontextmanager
async def alines(
    url: str, target: str, *, token: str | None = None, refuse: Refuse = raise_for_status
) -> AsyncIterator[AsyncLines]:
    """The trio flavour of :func:`lines`: ``async with alines(...) as frames``;
    leaving the block closes the connection."""
    accept = {"Accept": "application/x-ndjson"}
    async with _aopen(url, "GET", target, None, token, refuse, **accept) as answer:
        yield AsyncLines(answer)
