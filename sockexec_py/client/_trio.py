"""The trio flavour: :func:`arun`, :func:`open_async_session` and, for the gateway's
own way to the broker, :func:`open_unix_session` and :func:`check_broker`. Parsing
is the sans-IO :class:`~._common.SessionState`, as in the blocking flavour; only the
byte moving differs. Gateway targets go to :mod:`._gateway`.

Timeouts are cancel scopes: :func:`deadline` turns the expiry of one into
:class:`Timeout`. Leaving a session closes its socket, so the broker terminates the
program.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

import trio

from sockexec_py.errors import Timeout, single_errors
from sockexec_py.events import Exited
from sockexec_py.protocol import encode_request

from ._common import (
    RECV_CHUNK,
    Collector,
    Frame,
    OutputCallback,
    Result,
    SessionState,
    gateway_extra,
    is_gateway,
    parse_target,
    timeout_error,
    unavailable,
)

if TYPE_CHECKING:
    from ._gateway import AsyncGatewaySession

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
    (one ``send`` goes out whole, before a later close); ``on_stdout``/``on_stderr``
    are called with each chunk as it is iterated.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> None:
        self._sock = sock
        self._state = SessionState(on_stdout, on_stderr)
        # A send of many netstrings goes out whole before a close from another task.
        self._send_lock = trio.Lock()

    @property
    def exited(self) -> Exited | None:
        """How the program ended, once the last frame was read."""
        return self._state.exited

    async def _sendall(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[await self._sock.send(view, _SEND_FLAGS) :]
        except (BrokenPipeError, ConnectionResetError):
            self._state.stdin_gone()

    async def send(self, data: bytes) -> None:
        """Send stdin, any amount (in netstrings of at most 64 KiB); ignored after
        :meth:`close_stdin` or the program's end."""
        async with self._send_lock:
            for netstring in self._state.stdin(data):
                await self._sendall(netstring)

    async def close_stdin(self) -> None:
        """Close the program's stdin (it reads EOF after what was sent before)."""
        async with self._send_lock:
            await self._sendall(self._state.close_stdin())

    def __aiter__(self) -> AsyncSession:
        return self

    async def __anext__(self) -> Frame:
        """The next frame as it arrives; the last one is :class:`Exited`.

        A plain iterator, not an async generator: leaving a loop early leaves nothing
        to finalise.
        """
        while self.exited is None:
            frame = self._state.next_frame()
            if frame is not None:
                return frame
            try:
                data = await self._sock.recv(RECV_CHUNK)
            except ConnectionResetError:
                data = b""
            self._state.receive_data(data)
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


@asynccontextmanager
async def open_async_session(
    target: str,
    argv: Sequence[str | bytes],
    *,
    timeout: float | None = None,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
) -> AsyncIterator[AsyncSession | AsyncGatewaySession]:
    """The trio flavour of :func:`~._blocking.open_session`: ``async with`` it,
    ``await send()``, ``await close_stdin()``, ``async for frame in session``.

    Leaving the block closes the connection (the broker terminates the program if it
    still runs). ``timeout`` cancels the block and raises :class:`Timeout`; an outer
    ``trio.move_on_after``/``fail_after`` works as usual.
    """
    with deadline(timeout, "the session"):
        if is_gateway(target):
            with gateway_extra():
                from ._gateway import open_async_gateway_session
            async with open_async_gateway_session(
                target, argv, on_stdout=on_stdout, on_stderr=on_stderr
            ) as gateway_session:
                yield gateway_session
        else:
            async with open_unix_session(
                target, argv, on_stdout=on_stdout, on_stderr=on_stderr
            ) as session:
                yield session


async def arun(
    target: str,
    argv: Sequence[str | bytes],
    *,
    stdin: bytes = b"",
    timeout: float | None = None,
) -> Result:
    """The trio flavour of :func:`~._blocking.run`: a task sends stdin while the
    output is read."""
    if is_gateway(target):
        with gateway_extra():
            from ._gateway import run_gateway
        result: Result = await trio.to_thread.run_sync(
            lambda: run_gateway(target, argv, stdin=stdin, timeout=timeout),
            abandon_on_cancel=True,
        )
        return result
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
