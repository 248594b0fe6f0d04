"""The trio flavour over the broker's Unix socket. Parsing is the sans-IO
``ClientSession``, as in the blocking flavour; only the byte moving differs.

Timeouts are cancel scopes: :func:`deadline` turns the expiry of one into
:class:`Timeout`. Leaving a session closes its socket, so the broker terminates the
program.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager

import trio

from sockexec_py._io import single_errors
from sockexec_py.errors import Timeout
from sockexec_py.events import Exited, Output
from sockexec_py.protocol import NEED_DATA, ClientSession, encode_request

from ._common import (
    CLOSE_STDIN,
    RECV_CHUNK,
    Collector,
    Frame,
    OutputCallback,
    Result,
    dispatch,
    parse_target,
    stdin_netstrings,
    timeout_error,
    unavailable,
)

_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)


@contextmanager
def deadline(timeout: float | None, what: str) -> Iterator[None]:
    """Cancel the block after ``timeout`` seconds and raise :class:`Timeout` then.

    Only this scope's own expiry becomes :class:`Timeout`; a caller's outer deadline
    still reaches the caller's scope as a cancellation.
    """
    if timeout is None:
        yield
        return
    with trio.move_on_after(timeout) as scope:
        yield
    if scope.cancelled_caught:
        raise Timeout(timeout_error(timeout, what))


class AsyncSession:
    """A duplex session over a trio socket: ``await send()``, ``await close_stdin()``,
        ``async for frame in session``. Sending and iterating may run in different tasks
    (one ``send`` goes out whole, before a later close);
        ``on_stdout``/``on_stderr`` are called with each chunk as it is iterated.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> None:
        self._sock = sock
        self._parser = ClientSession()
        # A send of many netstrings goes out whole before a close from another task.
        self._send_lock = trio.Lock()
        self._stdin_closed = False
        self._on_stdout, self._on_stderr = on_stdout, on_stderr
        #: How the program ended, once the last frame was read.
        self.exited: Exited | None = None

    async def _sendall(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[await self._sock.send(view, _SEND_FLAGS) :]
        except (BrokenPipeError, ConnectionResetError):
            self._stdin_closed = True  # the program is gone; its exit is on the way

    async def send(self, data: bytes) -> None:
        """Send stdin, any amount (in netstrings of at most 64 KiB); ignored after
        :meth:`close_stdin` or the program's end."""
        async with self._send_lock:
            for netstring in stdin_netstrings(data):
                if self._stdin_closed:
                    return
                await self._sendall(netstring)

    async def close_stdin(self) -> None:
        """Close the program's stdin (it reads EOF after what was sent before)."""
        async with self._send_lock:
            if not self._stdin_closed:
                self._stdin_closed = True
                await self._sendall(CLOSE_STDIN)

    def __aiter__(self) -> AsyncSession:
        return self

    async def __anext__(self) -> Frame:
        """The next frame as it arrives; the last one is :class:`Exited`.

        A plain iterator, not an async generator: leaving a loop early leaves nothing
        to finalise.
        """
        while self.exited is None:
            event = self._parser.next_event()
            if event is NEED_DATA:
                try:
                    data = await self._sock.recv(RECV_CHUNK)
                except ConnectionResetError:
                    data = b""
                self._parser.receive_data(data)
                continue
            assert isinstance(event, Output | Exited)
            if isinstance(event, Exited):
                self.exited = event
            dispatch(event, self._on_stdout, self._on_stderr)
            return event
        raise StopAsyncIteration

    async def wait(self) -> Result:
        """Read to the end and return everything as a :class:`Result`."""
        collector = Collector()
        async for frame in self:
            collector.add(frame)
        return collector.result()


async def _connect(target: str) -> trio.socket.SocketType:
    path = parse_target(target)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(path)
    except OSError as exc:
        sock.close()
        raise unavailable(path, exc) from None
    except BaseException:
        sock.close()
        raise
    return sock


@asynccontextmanager
async def open_unix_session(
    target: str,
    argv: Sequence[str | bytes],
    *,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
) -> AsyncIterator[AsyncSession]:
    """A duplex :class:`AsyncSession` over the broker's Unix socket only (the gateway's
    own way to the broker); bound it with trio's cancel scopes.

    Resource handling: leaving the block closes the socket; the broker then
    terminates the program if it still runs.
    """
    request = encode_request(argv)
    with await _connect(target) as sock:
        session = AsyncSession(sock, on_stdout=on_stdout, on_stderr=on_stderr)
        await session._sendall(request)
        yield session


async def arun(
    target: str,
    argv: Sequence[str | bytes],
    *,
    stdin: bytes = b"",
    timeout: float | None = None,
) -> Result:
    """One-shot over the Unix socket: a task sends stdin while the output is read."""
    with deadline(timeout, "the program"), single_errors():
        async with open_unix_session(target, argv) as session, trio.open_nursery() as nursery:

            async def feed() -> None:
                await session.send(stdin)
                await session.close_stdin()

            nursery.start_soon(feed)
            result = await session.wait()
            nursery.cancel_scope.cancel()
            return result
    raise AssertionError("unreachable: the deadline raised Timeout")  # pragma: no cover


async def check_broker(target: str) -> None:
    """Raise :class:`BrokerUnavailable` unless the broker accepts a connection."""
    (await _connect(target)).close()
