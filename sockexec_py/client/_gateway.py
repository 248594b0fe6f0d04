"""The client's transport through the HTTP gateway (``http(s)://``, ``ws(s)://``).

One-shot runs are one ``POST /v1/exec`` (base64 both ways, so bytes are exact);
duplex sessions are the WebSocket ``/v1/exec/ws``, spoken with the sans-IO ``wsproto``
over a plain socket — the same shape as the Unix transport: bytes in, events out.
A bearer token comes from the ``token`` argument or ``$SOCKEXEC_TOKEN``.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from sockexec_py.errors import BrokerUnavailable, LocalProtocolError, ProtocolError, Timeout
from sockexec_py.events import Exited, Output

from ._blocking import _BlockingSession
from ._common import Collector as _Collector
from ._common import Result

_RECV_CHUNK = 256 * 1024


def _argv_text(argv: Sequence[str | bytes]) -> list[str]:
    """argv as the JSON text the gateway takes.

    Error handling: an argument that is not UTF-8 (bytes, or a str holding lone
    surrogates, as ``sys.argv`` has for such bytes) cannot be carried as JSON text:
    :class:`LocalProtocolError` naming its index (the Unix socket carries any bytes).
    """
    text = []
    for index, arg in enumerate(argv):
        try:
            text.append(arg.decode() if isinstance(arg, bytes) else arg)
            text[-1].encode()  # lone surrogates do not encode
        except UnicodeError:
            raise LocalProtocolError(
                f"argv[{index}] is not valid UTF-8: the gateway carries argv as JSON text "
                "(use the broker's Unix socket for arbitrary bytes)"
            ) from None
    return text


def _headers(token: str | None) -> dict[str, str]:
    token = token or os.environ.get("SOCKEXEC_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _error_text(status: int, body: bytes) -> str:
    try:
        payload = json.loads(body)
        return f"{status} {payload['error']}: {payload['detail']}"
    except (ValueError, KeyError, TypeError):
        return f"{status}: {body[:200].decode('utf-8', 'replace')}"


def _raise_for(status: int, body: bytes) -> None:
    """The typed error for a gateway's error answer: 504 the session timed out, 503
    the broker cannot be reached, 502 the broker answered but broke the protocol,
    anything else the gateway refused the request."""
    text = _error_text(status, body)
    if status == 504:
        raise Timeout(f"gateway: {text}")
    if status == 503:
        raise BrokerUnavailable(f"gateway: {text}")
    if status == 502:
        raise ProtocolError(f"gateway: {text}")
    raise ProtocolError(f"gateway refused the request: {text}")


def run_gateway(
    url: str,
    argv: Sequence[str | bytes],
    *,
    stdin: bytes = b"",
    timeout: float | None = None,
    token: str | None = None,
) -> Result:
    """One-shot through the gateway: one ``POST /v1/exec?encoding=base64``."""
    parts = urlsplit(url.replace("ws://", "http://", 1).replace("wss://", "https://", 1))
    body: dict[str, Any] = {"argv": _argv_text(argv)}
    if stdin:
        body["stdin_b64"] = base64.b64encode(stdin).decode()
    if timeout is not None:
        body["timeout"] = timeout
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    conn = connection_class(parts.netloc, timeout=None if timeout is None else timeout + 5)
    try:
        conn.request(
            "POST",
            parts.path.rstrip("/") + "/v1/exec?encoding=base64",
            body=json.dumps(body),
            headers={"Content-Type": "application/json", **_headers(token)},
        )
        response = conn.getresponse()
        data = response.read()
    except TimeoutError:
        raise Timeout(f"{url}: the gateway did not answer in time") from None
    except OSError as exc:
        raise BrokerUnavailable(f"cannot reach the gateway at {url}: {exc}") from None
    finally:
        conn.close()
    if response.status != 200:
        _raise_for(response.status, data)
    result = json.loads(data)
    return Result(
        base64.b64decode(result["stdout_b64"]),
        base64.b64decode(result["stderr_b64"]),
        result["exitcode"],
        result["termsig"],
    )


class _WebSocketProtocol:
    """The gateway's WebSocket session, sans-IO (like ClientSession for the socket):
    bytes in, frames out; stdin in, bytes out. Both flavours move its bytes."""

    def __init__(self, url: str, argv: Sequence[str | bytes], token: str | None) -> None:
        parts = urlsplit(url)
        self.secure = parts.scheme in ("https", "wss")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.secure else 80)
        self.url = url
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._argv = _argv_text(argv)
        path = parts.path.rstrip("/") + "/v1/exec/ws?encoding=base64"
        extra = [(k.encode(), v.encode()) for k, v in _headers(token).items()]
        self.handshake = self._ws.send(Request(host=parts.netloc, target=path, extra_headers=extra))
        self.accepted = False
        #: A refusal's HTTP status and body, while its body arrives.
        self._refusal: tuple[int, bytearray] | None = None

    def receive(self, data: bytes | bytearray) -> list[Output | Exited] | bytes:
        """Feed bytes; returns the frames decoded, or (once, on acceptance) the bytes
        of the request message to send. Raises on refusal or a premature close."""
        self._ws.receive_data(bytes(data) or None)
        frames: list[Output | Exited] = []
        for event in self._ws.events():
            if isinstance(event, AcceptConnection):
                self.accepted = True
                return self._ws.send(TextMessage(data=json.dumps({"argv": self._argv})))
            if isinstance(event, RejectConnection):
                # The gateway answered the upgrade with an HTTP error: the same typed
                # error as a one-shot request gets (401, 403, 421, 503...), once its
                # JSON body has arrived.
                self._refusal = (event.status_code, bytearray())
                if not event.has_body:
                    _raise_for(event.status_code, b"")
            elif isinstance(event, RejectData) and self._refusal is not None:
                self._refusal[1].extend(event.data)
                if event.body_finished:
                    _raise_for(self._refusal[0], bytes(self._refusal[1]))
            if isinstance(event, TextMessage):
                frames.append(_frame(json.loads(event.data)))
            elif isinstance(event, CloseConnection) and not frames:
                raise ProtocolError(f"gateway closed the session ({event.code}) before the exit")
        if not data and self._refusal is not None:  # closed before the whole body came
            _raise_for(self._refusal[0], bytes(self._refusal[1]))
        if not data and not frames:
            raise ProtocolError(f"the gateway at {self.url} closed the connection")
        return frames

    def stdin(self, data: bytes) -> bytes:
        return self._ws.send(BytesMessage(data=data))

    def close_stdin(self) -> bytes:
        return self._ws.send(TextMessage(data=json.dumps({"type": "close_stdin"})))


class GatewaySession(_BlockingSession):
    """A duplex session over the gateway's WebSocket, with the API of
    :class:`sockexec_py.client.Session` (send, close_stdin, iterate, wait, close)."""

    def __init__(
        self,
        sock: socket.socket,
        protocol: _WebSocketProtocol,
        deadline: float | None,
        on_stdout: Callable[[bytes], object] | None = None,
        on_stderr: Callable[[bytes], object] | None = None,
    ) -> None:
        self._sock = sock
        self._protocol = protocol
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self._deadline = deadline
        self._stdin_closed = False
        self._frames: list[Output | Exited] = []
        self.exited: Exited | None = None

    def _arm(self) -> None:
        if self._deadline is not None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout("the session did not finish in time")
            self._sock.settimeout(remaining)

    def _sendall(self, data: bytes) -> None:
        try:
            self._arm()
            self._sock.sendall(data)
        except TimeoutError:
            raise Timeout("the session did not finish in time") from None
        except (BrokenPipeError, ConnectionResetError):
            self._stdin_closed = True

    def _recv(self) -> bytes:
        try:
            self._arm()
            return self._sock.recv(_RECV_CHUNK)
        except TimeoutError:
            raise Timeout("the session did not finish in time") from None

    def send(self, data: bytes) -> None:
        if data and not self._stdin_closed:
            self._sendall(self._protocol.stdin(data))

    def close_stdin(self) -> None:
        if not self._stdin_closed:
            self._stdin_closed = True
            self._sendall(self._protocol.close_stdin())

    def _handshake(self) -> None:
        self._sendall(self._protocol.handshake)
        while not self._protocol.accepted:
            reply = self._protocol.receive(self._recv())
            if isinstance(reply, bytes):
                self._sendall(reply)

    def __iter__(self) -> Iterator[Output | Exited]:
        while self.exited is None:
            while not self._frames:
                reply = self._protocol.receive(self._recv())
                assert isinstance(reply, list)
                self._frames.extend(reply)
            frame = self._frames.pop(0)
            if isinstance(frame, Exited):
                self.exited = frame
            elif (callback := self._callbacks[frame.kind]) is not None:
                callback(frame.data)
            yield frame


def _frame(message: dict[str, Any]) -> Output | Exited:
    kind = message.get("type")
    if kind in ("stdout", "stderr"):
        if "data_b64" in message:
            return Output(kind, base64.b64decode(message["data_b64"]))
        return Output(kind, message["data"].encode())
    if kind == "exit":
        return Exited(exitcode=message["exitcode"], termsig=message["termsig"])
    if kind == "error":
        status = int(message.get("status", 500))
        _raise_for(status, json.dumps(message).encode())
    raise ProtocolError(f"unexpected frame from the gateway: {str(message)[:100]}")


def open_gateway_session(
    url: str,
    argv: Sequence[str | bytes],
    *,
    timeout: float | None = None,
    token: str | None = None,
    on_stdout: Callable[[bytes], object] | None = None,
    on_stderr: Callable[[bytes], object] | None = None,
) -> GatewaySession:
    """Open the WebSocket ``/v1/exec/ws`` and start ``argv``."""
    protocol = _WebSocketProtocol(url, argv, token)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        sock = socket.create_connection((protocol.host, protocol.port), timeout=timeout)
        if protocol.secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=protocol.host)
    except OSError as exc:
        raise BrokerUnavailable(f"cannot reach the gateway at {url}: {exc}") from None
    session = GatewaySession(sock, protocol, deadline, on_stdout, on_stderr)
    try:
        session._handshake()
    except BaseException:
        sock.close()
        raise
    return session


class AsyncGatewaySession:
    """The trio flavour: the API of :class:`sockexec_py.client.AsyncSession`."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: _WebSocketProtocol,
        on_stdout: Callable[[bytes], object] | None = None,
        on_stderr: Callable[[bytes], object] | None = None,
    ) -> None:
        self._stream = stream
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self._protocol = protocol
        self._send_lock = trio.Lock()
        self._stdin_closed = False
        self._frames: list[Output | Exited] = []
        self.exited: Exited | None = None

    async def _sendall(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except trio.BrokenResourceError:
                self._stdin_closed = True

    async def send(self, data: bytes) -> None:
        if data and not self._stdin_closed:
            await self._sendall(self._protocol.stdin(data))

    async def close_stdin(self) -> None:
        if not self._stdin_closed:
            self._stdin_closed = True
            await self._sendall(self._protocol.close_stdin())

    async def _handshake(self) -> None:
        await self._sendall(self._protocol.handshake)
        while not self._protocol.accepted:
            reply = self._protocol.receive(await self._stream.receive_some(_RECV_CHUNK))
            if isinstance(reply, bytes):
                await self._sendall(reply)

    def __aiter__(self) -> AsyncGatewaySession:
        return self

    async def __anext__(self) -> Output | Exited:
        if self.exited is not None:
            raise StopAsyncIteration
        while not self._frames:
            reply = self._protocol.receive(await self._stream.receive_some(_RECV_CHUNK))
            assert isinstance(reply, list)
            self._frames.extend(reply)
        frame = self._frames.pop(0)
        if isinstance(frame, Exited):
            self.exited = frame
        elif (callback := self._callbacks[frame.kind]) is not None:
            callback(frame.data)
        return frame

    async def wait(self) -> Result:
        collector = _Collector()
        async for frame in self:
            collector.add(frame)
        return collector.result()


@asynccontextmanager
async def open_async_gateway_session(
    url: str,
    argv: Sequence[str | bytes],
    *,
    token: str | None = None,
    on_stdout: Callable[[bytes], object] | None = None,
    on_stderr: Callable[[bytes], object] | None = None,
) -> AsyncIterator[AsyncGatewaySession]:
    """The trio flavour of :func:`open_gateway_session` (bound it with trio timeouts)."""
    protocol = _WebSocketProtocol(url, argv, token)
    try:
        stream: trio.abc.Stream = await trio.open_tcp_stream(protocol.host, protocol.port)
        if protocol.secure:
            stream = trio.SSLStream(
                stream, ssl.create_default_context(), server_hostname=protocol.host
            )
    except OSError as exc:
        raise BrokerUnavailable(f"cannot reach the gateway at {url}: {exc}") from None
    async with stream:
        session = AsyncGatewaySession(stream, protocol, on_stdout, on_stderr)
        await session._handshake()
        yield session
