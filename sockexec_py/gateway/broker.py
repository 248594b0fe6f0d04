"""The gateway's side of a broker session, over the Unix socket (trio).

Thin on purpose: framing and parsing are the sans-IO :class:`ClientSession`; this
only moves bytes. Leaving :func:`open_session` early closes the connection, and the
broker terminates the program when its client hangs up.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress

import trio

from sockexec_py.errors import BrokerUnavailable, describe_connect_error
from sockexec_py.events import Exited, Output
from sockexec_py.netstring import encode
from sockexec_py.protocol import NEED_DATA, ClientSession, encode_request

_RECV_CHUNK = 256 * 1024


class Session:
    """An open broker session: send stdin, close it, iterate output and exit events."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._client = ClientSession()
        self._send_lock = trio.Lock()
        self._stdin_closed = False

    async def _send_all(self, data: bytes) -> None:
        async with self._send_lock:
            view = memoryview(data)
            while view:
                view = view[await self._sock.send(view) :]

    async def send(self, data: bytes) -> None:
        """Send a stdin chunk (ignored once stdin is closed or the program is gone)."""
        if data and not self._stdin_closed:
            try:
                await self._send_all(encode(data))
            except (BrokenPipeError, ConnectionResetError):
                self._stdin_closed = True  # the program ended: its exit is on the way

    async def close_stdin(self) -> None:
        if not self._stdin_closed:
            self._stdin_closed = True
            with suppress(BrokenPipeError, ConnectionResetError):
                await self._send_all(b"0:,")

    async def __aiter__(self) -> AsyncIterator[Output | Exited]:
        while True:
            event = self._client.next_event()
            if event is NEED_DATA:
                try:
                    data = await self._sock.recv(_RECV_CHUNK)
                except ConnectionResetError:
                    data = b""
                self._client.receive_data(data)
                continue
            assert isinstance(event, Output | Exited)
            yield event
            if isinstance(event, Exited):
                return


async def _connect(path: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(path)
    except OSError as exc:
        sock.close()
        raise BrokerUnavailable(describe_connect_error(path, exc)) from None
    return sock


@asynccontextmanager
async def open_session(path: str, argv: Sequence[str | bytes]) -> AsyncIterator[Session]:
    """Connect, send the argv, and yield the session; the socket is closed on exit."""
    sock = await _connect(path)
    with sock:
        session = Session(sock)
        await session._send_all(encode_request(argv))
        yield session


async def check(path: str) -> None:
    """Raise :class:`BrokerUnavailable` unless the broker accepts a connection."""
    sock = await _connect(path)
    sock.close()
