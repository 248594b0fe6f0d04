"""The trio flavour: :func:`arun`, :func:`open_async_session` and, for the gateway's
own way to the broker, :func:`open_unix_session` and :func:`check_broker`.
:class:`AsyncSession` drives any session state of :mod:`._state` over a trio stream,
as the blocking flavour does over a socket.

Timeouts are cancel scopes: :func:`deadline` turns the expiry of one into
:class:`Timeout`. Leaving a session closes its stream, so the broker terminates the
program.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager

import trio

from sockexec_py.errors import BrokerUnavailable, Timeout, single_errors
from sockexec_py.events import Exited

from ._common import (
    RECV_CHUNK,
    Collector,
    Frame,
    OutputCallback,
    Result,
    gateway_extra,
    is_gateway,
    parse_target,
    timeout_error,
    unavailable,
)
from ._state import SessionState, UnixSessionState


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
    """A duplex session over a trio stream, whatever the transport: ``await send()``,
    ``await close_stdin()``, ``async for frame in session``. Sending and iterating may
    run in different tasks (one ``send`` goes out whole, before a later close);
    ``on_stdout``/``on_stderr`` are called with each chunk as it is iterated.
    """

    def __init__(self, stream: trio.abc.Stream, state: SessionState) -> None:
        self._stream = stream
        self._state = state
        # A send of many pieces goes out whole before a close from another task.
        self._send_lock = trio.Lock()

    async def _open(self) -> None:
        """Send the opening and read until the session is open (a handshake)."""
        await self._sendall(self._state.opening())
        while not self._state.ready:
            self._state.receive_data(await self._recv())
            await self._sendall(self._state.data_to_send())

    @property
    def exited(self) -> Exited | None:
        """How the program ended, once the last frame was read."""
        return self._state.exited

    async def _sendall(self, data: bytes) -> None:
        if data:
            try:
                await self._stream.send_all(data)
            except trio.BrokenResourceError:
                self._state.stdin_gone()

    async def _recv(self) -> bytes:
        try:
            return bytes(await self._stream.receive_some(RECV_CHUNK))
        except trio.BrokenResourceError:  # reset by the peer: as good as closed
            return b""

    async def send(self, data: bytes) -> None:
        """Send stdin, any amount (in pieces of at most 64 KiB); ignored after
        :meth:`close_stdin` or the program's end."""
        async with self._send_lock:
            for piece in self._state.stdin(data):
                await self._sendall(piece)

    async def close_stdin(self) -> None:
        """Close the program's stdin (it reads EOF after what was sent before)."""
        async with self._send_lock:
            await self._sendall(self._state.close_stdin())

    async def terminate(self) -> None:
        """Ask the broker to terminate the program (TERM, then KILL after its ``-k``);
        keep iterating: the exit frame says how it ended. No stdin after this."""
        async with self._send_lock:
            await self._sendall(self._state.terminate())

    def __aiter__(self) -> AsyncSession:
        return self

    async def __anext__(self) -> Frame:
        """The next frame as it arrives; the last one is :class:`Exited`.

        A plain iterator, not an async generator: leaving a loop early leaves nothing
        to finalise.
        """
        state = self._state
        while state.exited is None:
            frame = state.next_frame()
            if frame is not None:
                return frame
            state.receive_data(await self._recv())
            if owed := state.data_to_send():
                async with self._send_lock:
                    await self._sendall(owed)
        raise StopAsyncIteration

    async def wait(self) -> Result:
        """Read to the end and return everything as a :class:`Result`."""
        collector = Collector()
        async for frame in self:
            collector.add(frame)
        return collector.result()


async def _connect(target: str) -> trio.SocketStream:
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
    return trio.SocketStream(sock)


@asynccontextmanager
async def _opened(stream: trio.abc.Stream, state: SessionState) -> AsyncIterator[AsyncSession]:
    async with stream:
        session = AsyncSession(stream, state)
        await session._open()
        yield session


@asynccontextmanager
async def open_unix_session(
    target: str,
    argv: Sequence[str | bytes],
    *,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
    stdin: bytes | None = None,
) -> AsyncIterator[AsyncSession]:
    """A duplex :class:`AsyncSession` over the broker's Unix socket only (the gateway's
    own way to the broker); bound it with trio's cancel scopes. ``stdin`` (at most
    64 KiB) goes out with the request, closed: one send, and nothing to feed after.

    Resource handling: leaving the block closes the socket; the broker then
    terminates the program if it still runs.
    """
    state = UnixSessionState(argv, on_stdout, on_stderr, stdin=stdin)  # a bad argv raises
    async with _opened(await _connect(target), state) as session:
        yield session


async def _connect_gateway(url: str) -> trio.abc.Stream:
    with gateway_extra():
        from ._websocket import GatewayAddress
    address = GatewayAddress(url)
    try:
        stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)
    except OSError as exc:
        raise BrokerUnavailable(f"cannot reach the gateway at {url}: {exc}") from None
    if address.secure:
        stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=address.host)
    return stream


@asynccontextmanager
async def open_async_session(
    target: str,
    argv: Sequence[str | bytes],
    *,
    timeout: float | None = None,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
) -> AsyncIterator[AsyncSession]:
    """The trio flavour of :func:`~._blocking.open_session`: ``async with`` it,
    ``await send()``, ``await close_stdin()``, ``async for frame in session``.

    Leaving the block closes the connection (the broker terminates the program if it
    still runs). ``timeout`` cancels the block and raises :class:`Timeout`; an outer
    ``trio.move_on_after``/``fail_after`` works as usual.
    """
    with deadline(timeout, "the session"):
        state: SessionState
        if is_gateway(target):
            with gateway_extra():
                from ._websocket import GatewayAddress, WebSocketSessionState
            state = WebSocketSessionState(GatewayAddress(target), argv, None, on_stdout, on_stderr)
            stream = await _connect_gateway(target)
        else:
            state = UnixSessionState(argv, on_stdout, on_stderr)
            stream = await _connect(target)
        async with _opened(stream, state) as session:
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
            from ._http import run_gateway
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
    await (await _connect(target)).aclose()
