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
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

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

from .client import Result, _BlockingSession
from .errors import BrokerUnavailable, ProtocolError, Timeout
from .events import Exited, Output

_RECV_CHUNK = 256 * 1024


def _argv_text(argv: Sequence[str | bytes]) -> list[str]:
    return [a.decode() if isinstance(a, bytes) else a for a in argv]


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
    text = _error_text(status, body)
    if status == 504:
        raise Timeout(f"gateway: {text}")
    if status in (502, 503):
        raise BrokerUnavailable(f"gateway: {text}")
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


class GatewaySession(_BlockingSession):
    """A duplex session over the gateway's WebSocket, with the API of
    :class:`sockexec_py.client.Session` (send, close_stdin, iterate, wait, close)."""

    def __init__(
        self,
        sock: socket.socket,
        ws: WSConnection,
        deadline: float | None,
        on_stdout: Callable[[bytes], object] | None = None,
        on_stderr: Callable[[bytes], object] | None = None,
    ) -> None:
        self._sock = sock
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self._ws = ws
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

    def _send(self, event: Any) -> None:
        try:
            self._arm()
            self._sock.sendall(self._ws.send(event))
        except TimeoutError:
            raise Timeout("the session did not finish in time") from None
        except (BrokenPipeError, ConnectionResetError):
            self._stdin_closed = True

    def send(self, data: bytes) -> None:
        if data and not self._stdin_closed:
            self._send(BytesMessage(data=data))

    def close_stdin(self) -> None:
        if not self._stdin_closed:
            self._stdin_closed = True
            self._send(TextMessage(data=json.dumps({"type": "close_stdin"})))

    def _pump(self) -> None:
        """Read from the socket until at least one frame is decoded."""
        while not self._frames:
            try:
                self._arm()
                data = self._sock.recv(_RECV_CHUNK)
            except TimeoutError:
                raise Timeout("the session did not finish in time") from None
            self._ws.receive_data(data or None)
            for event in self._ws.events():
                if isinstance(event, TextMessage):
                    self._frames.append(_frame(json.loads(event.data)))
                elif isinstance(event, CloseConnection) and not self._frames:
                    raise ProtocolError(
                        f"gateway closed the session ({event.code}) before the exit"
                    )
            if not data and not self._frames:
                raise ProtocolError("gateway connection closed before the exit")

    def __iter__(self) -> Iterator[Output | Exited]:
        while self.exited is None:
            self._pump()
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
    parts = urlsplit(url)
    secure = parts.scheme in ("https", "wss")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    except OSError as exc:
        raise BrokerUnavailable(f"cannot reach the gateway at {url}: {exc}") from None
    ws = WSConnection(ConnectionType.CLIENT)
    path = parts.path.rstrip("/") + "/v1/exec/ws?encoding=base64"
    extra = [(k.encode(), v.encode()) for k, v in _headers(token).items()]
    sock.sendall(ws.send(Request(host=parts.netloc, target=path, extra_headers=extra)))
    session = GatewaySession(sock, ws, deadline, on_stdout, on_stderr)
    while True:
        session._arm()
        data = sock.recv(_RECV_CHUNK)
        ws.receive_data(data or None)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                session._send(TextMessage(data=json.dumps({"argv": _argv_text(argv)})))
                return session
            if isinstance(event, RejectConnection | RejectData | CloseConnection):
                sock.close()
                raise BrokerUnavailable(f"the gateway at {url} refused the WebSocket")
        if not data:
            sock.close()
            raise BrokerUnavailable(f"the gateway at {url} closed the connection")
