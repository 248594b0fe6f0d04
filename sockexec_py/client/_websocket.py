"""The gateway's WebSocket ``/v1/exec/ws`` as a session state (see :mod:`._state`),
spoken with the sans-IO ``wsproto``: bytes in, frames out; stdin in, bytes out.

The handshake request is the opening; once the gateway accepts, the JSON request is
owed to it (:meth:`data_to_send`). Stdin goes out as binary messages of at most
64 KiB, so one ``send()`` of any size passes the gateway's and any proxy's message
limit (Hypercorn's default is 16 MiB).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from sockexec_py.errors import ProtocolError

from ._common import STDIN_CHUNK, Frame, OutputCallback
from ._state import FrameDelivery
from .wire import (
    CLOSE_STDIN_MESSAGE,
    TERMINATE_MESSAGE,
    argv_text,
    auth_headers,
    parse_frame,
    raise_for_status,
)


class GatewayAddress:
    """Where a gateway URL points: host, port, TLS, and the path prefix."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.secure = parts.scheme in ("https", "wss")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.secure else 80)
        self.netloc = parts.netloc
        self.prefix = parts.path.rstrip("/")


#: What :meth:`GatewayWebSocket.receive` yields when the gateway accepted the upgrade.
ACCEPTED = object()


class GatewayWebSocket:
    """The client end of one gateway WebSocket (sans-IO, wsproto), shared by the
    exec session and the monitor: the upgrade request with the token, refusals
    raised as typed errors once their JSON body is in (:func:`~.wire.raise_for_status`),
    text messages put together from their pieces, pings answered, the close noted.
    """

    def __init__(self, address: GatewayAddress, token: str | None) -> None:
        self.address = address
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._token = token
        self._outgoing = bytearray()
        self._text: list[str] = []
        #: A refusal's HTTP status and body, while its body arrives.
        self._refusal: tuple[int, bytearray] | None = None
        #: True once the gateway closed (or the connection ended).
        self.closed = False

    def opening(self, target: str) -> bytes:
        """The upgrade request for ``target`` (a path and query after the prefix)."""
        headers = [(k.encode(), v.encode()) for k, v in auth_headers(self._token).items()]
        request = Request(
            host=self.address.netloc, target=self.address.prefix + target, extra_headers=headers
        )
        return self._ws.send(request)

    def send(self, event: TextMessage | BytesMessage) -> bytes:
        return self._ws.send(event)

    def owe(self, data: bytes) -> None:
        """Keep ``data`` for :meth:`data_to_send`."""
        self._outgoing += data

    def data_to_send(self) -> bytes:
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def receive(self, data: bytes) -> Iterator[object]:
        """Bytes from the gateway (``b""``: it closed): yields :data:`ACCEPTED`, then
        each whole text message (a ``str``)."""
        self._ws.receive_data(data or None)
        for event in self._ws.events():
            if isinstance(event, AcceptConnection):
                yield ACCEPTED
            elif isinstance(event, RejectConnection):
                self._refusal = (event.status_code, bytearray())
                if not event.has_body:
                    raise_for_status(event.status_code, b"")
            elif isinstance(event, RejectData) and self._refusal is not None:
                self._refusal[1].extend(event.data)
                if event.body_finished:
                    raise_for_status(self._refusal[0], bytes(self._refusal[1]))
            elif isinstance(event, TextMessage):
                # A message may arrive in pieces (wsproto hands them out as they come).
                self._text.append(event.data)
                if event.message_finished:
                    text, self._text = "".join(self._text), []
                    yield text
            elif isinstance(event, Ping):
                self._outgoing += self._ws.send(event.response())
            elif isinstance(event, CloseConnection):
                self.closed = True
        if not data:
            if self._refusal is not None:  # closed before the whole body came
                raise_for_status(self._refusal[0], bytes(self._refusal[1]))
            self.closed = True


class WebSocketSessionState(FrameDelivery):
    """A duplex session through the gateway's WebSocket (see the module docstring).

    Error handling: a refusal of the upgrade raises the same typed error as a one-shot
    request gets (:func:`~.wire.raise_for_status`: 401, 403, 421, 503…), once its JSON
    body has arrived; an ``error`` frame likewise; a close before the exit frame is a
    :class:`ProtocolError`.
    """

    def __init__(
        self,
        address: GatewayAddress,
        argv: Sequence[str | bytes],
        token: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> None:
        super().__init__(on_stdout, on_stderr)
        self._socket = GatewayWebSocket(address, token)
        self._request = json.dumps({"argv": argv_text(argv)})  # a bad argv raises now
        self._frames: deque[Frame] = deque()
        self._accepted = False

    @property
    def ready(self) -> bool:
        return self._accepted

    def opening(self) -> bytes:
        return self._socket.opening("/v1/exec/ws?encoding=base64")

    def data_to_send(self) -> bytes:
        return self._socket.data_to_send()

    def receive_data(self, data: bytes) -> None:
        for message in self._socket.receive(data):
            if message is ACCEPTED:
                self._accepted = True
                self._socket.owe(self._socket.send(TextMessage(data=self._request)))
            else:
                assert isinstance(message, str)
                self._frames.append(parse_frame(json.loads(message)))

    def next_frame(self) -> Frame | None:
        if self._frames:
            return self.deliver(self._frames.popleft())
        if self._socket.closed:
            raise ProtocolError(
                f"the gateway at {self._socket.address.url} closed the session before the exit"
            )
        return None

    def stdin(self, data: bytes) -> Iterator[bytes]:
        view = memoryview(data)
        for start in range(0, len(view), STDIN_CHUNK):
            if self._stdin_closed:
                return
            yield self._socket.send(BytesMessage(data=bytes(view[start : start + STDIN_CHUNK])))

    def close_stdin(self) -> bytes:
        if self._stdin_closed:
            return b""
        self._stdin_closed = True
        return self._socket.send(TextMessage(data=CLOSE_STDIN_MESSAGE))

    def terminate(self) -> bytes:
        if self._terminate_sent:
            return b""
        self._terminate_sent = self._stdin_closed = True
        return self._socket.send(TextMessage(data=TERMINATE_MESSAGE))
