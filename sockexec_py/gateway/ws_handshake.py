"""A WebSocket upgrade read and answered on a raw stream (for the monitors the
front door takes aside, :mod:`.monitor_wire`): the request head, bounded in bytes
and time, parsed by h11; the upgrade's headers checked (RFC 6455, section 4.2.1);
the 101 or an error answer with the same JSON body as the ASGI app's.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
from http import HTTPStatus

import h11
import trio

from sockexec_py.client.wire import error_body

from .request import HTTPError

__all__ = ["accepted", "not_an_upgrade", "read_head", "refuse", "upgrade_key"]

#: The most bytes of a monitor request's head, and the seconds it may take.
HEAD_MAX = 16384
HEAD_WAIT = 10.0
#: After a refusal: the seconds and bytes read (and dropped) before the close.
LINGER = 2.0
#: The seconds an answer may take to be sent.
SEND_WAIT = 30.0
LINGER_BYTES = 1 << 20
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def read_head(stream: trio.SocketStream) -> tuple[h11.Request, bytes]:
    """The request's head (at most :data:`HEAD_MAX` bytes and :data:`HEAD_WAIT`
    seconds), and what came after it."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_MAX)
    read = 0
    with trio.fail_after(HEAD_WAIT):
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise HTTPError(400, "bad_request", f"not an HTTP/1.1 request: {exc}") from None
            if isinstance(event, h11.Request):
                return event, bytes(conn.trailing_data[0])
            if event is not h11.NEED_DATA:
                raise trio.BrokenResourceError  # the client closed before asking
            if read == HEAD_MAX:
                raise HTTPError(400, "bad_request", f"the request head is over {HEAD_MAX} bytes")
            data = await stream.receive_some(min(4096, HEAD_MAX - read))
            read += len(data)
            conn.receive_data(data)


def not_an_upgrade(path: str) -> HTTPError:
    """The answer to a plain GET of a WebSocket endpoint."""
    return HTTPError(400, "bad_request", f"{path} is a WebSocket: expected an upgrade")


def upgrade_key(request: h11.Request) -> bytes:
    """The client's ``Sec-WebSocket-Key`` once the request is a WebSocket upgrade."""
    values: dict[bytes, list[bytes]] = {}
    for name, value in request.headers:
        values.setdefault(name, []).append(value)

    def tokens(name: bytes) -> set[bytes]:
        return {t.strip().lower() for v in values.get(name, ()) for t in v.split(b",")}

    if request.http_version != b"1.1":
        raise HTTPError(400, "bad_request", "a WebSocket upgrade needs HTTP/1.1")
    if b"transfer-encoding" in values or values.get(b"content-length", [b"0"]) != [b"0"]:
        raise HTTPError(400, "bad_request", "a WebSocket upgrade has no body")
    if b"websocket" not in tokens(b"upgrade") or b"upgrade" not in tokens(b"connection"):
        raise not_an_upgrade(request.target.partition(b"?")[0].decode("latin-1"))
    if values.get(b"sec-websocket-version") != [b"13"]:
        raise HTTPError(400, "bad_request", "expected Sec-WebSocket-Version: 13")
    keys = values.get(b"sec-websocket-key", [])
    try:
        nonce = base64.b64decode(keys[0], validate=True) if len(keys) == 1 else b""
    except binascii.Error:
        nonce = b""
    if len(nonce) != 16:
        raise HTTPError(400, "bad_request", "expected one Sec-WebSocket-Key (16 bytes, base64)")
    return keys[0]


def accepted(key: bytes) -> bytes:
    """The 101 answer to a client that sent ``key``."""
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-accept: " + accept + b"\r\n\r\n"
    )


async def refuse(stream: trio.SocketStream, exc: HTTPError) -> None:
    """The error answer (the ASGI route's JSON body); the connection ends. It names
    the WebSocket version we speak, as RFC 6455 asks of a refused handshake."""
    body = json.dumps(error_body(exc.error, exc.detail), separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {exc.status} {HTTPStatus(exc.status).phrase}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "sec-websocket-version: 13\r\nconnection: close\r\n\r\n"
    )
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        with trio.move_on_after(SEND_WAIT):
            await stream.send_all(head.encode() + body)
        # A close with unread bytes would reset the connection, and the client
        # could lose the answer: say we are done, then read what it still sends
        # (a little, for a little while).
        await stream.send_eof()
        with trio.move_on_after(LINGER):
            left = LINGER_BYTES
            while left > 0 and (data := await stream.receive_some(65536)):
                left -= len(data)
