"""Python client of the broker: one-shot and duplex, blocking and trio.

Both flavours drive the same sans-IO :class:`~sockexec_py.protocol.ClientSession`;
only the byte moving differs. A target is a socket path, ``unix:/path``, or (through
the HTTP gateway) ``http(s)://`` / ``ws(s)://`` — see :func:`parse_target`.

Resource handling: a session owns its connection; leaving its context (or calling
``close``) closes it, and the broker then terminates the program if it still runs.
The broker holds only bounded buffers, so a client must read while it writes:
:func:`run` and :func:`arun` send stdin and read output concurrently.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

import trio

if TYPE_CHECKING:
    from .gateway_client import AsyncGatewaySession, GatewaySession

from ._io import single_errors
from .errors import BrokerUnavailable, ProtocolError, SockexecError, Timeout, describe_connect_error
from .events import Exited, Output
from .netstring import encode
from .protocol import NEED_DATA, ClientSession, encode_request

__all__ = [
    "AsyncSession",
    "BrokerUnavailable",
    "Frame",
    "ProgramFailed",
    "ProtocolError",
    "Result",
    "Session",
    "Timeout",
    "arun",
    "check_broker",
    "open_async_session",
    "open_session",
    "open_unix_session",
    "parse_target",
    "run",
]

#: A frame of a session: program output, or its exit (always the last frame).
Frame = Output | Exited
OutputCallback = Callable[[bytes], object]

_RECV_CHUNK = 256 * 1024
_STDIN_CHUNK = 64 * 1024


class ProgramFailed(SockexecError):
    """Raised by :meth:`Result.check` when the program did not exit with status 0."""

    def __init__(self, result: Result) -> None:
        how = (
            f"exit status {result.exitcode}"
            if result.termsig is None
            else f"signal {result.termsig}"
        )
        super().__init__(f"program failed with {how}")
        self.result = result


@dataclass(frozen=True, slots=True)
class Result:
    """What a one-shot run returned."""

    stdout: bytes
    stderr: bytes
    exitcode: int | None
    termsig: str | None

    @property
    def ok(self) -> bool:
        """True when the program exited with status 0."""
        return self.exitcode == 0

    def check(self) -> Result:
        """Return self if :attr:`ok`, else raise :class:`ProgramFailed`."""
        if not self.ok:
            raise ProgramFailed(self)
        return self


def parse_target(target: str) -> str:
    """The socket path of ``target`` (a path or ``unix:/path``).

    Error handling: ``http(s)://`` and ``ws(s)://`` targets are served by the gateway
    transport, not by this function; anything else raises ``ValueError``.
    """
    if target.startswith("unix:"):
        return target[len("unix:") :]
    if "://" in target:
        raise ValueError(f"not a Unix socket target: {target!r}")
    return target


def _is_gateway(target: str) -> bool:
    """True for targets served by the HTTP gateway transport (gateway_client)."""
    return target.startswith(("http://", "https://", "ws://", "wss://"))


class _Collector:
    """Gathers frames into a :class:`Result` (shared by every flavour)."""

    def __init__(self) -> None:
        self.stdout: list[bytes] = []
        self.stderr: list[bytes] = []
        self.exited: Exited | None = None

    def add(self, frame: Frame) -> None:
        if isinstance(frame, Output):
            (self.stdout if frame.kind == "stdout" else self.stderr).append(frame.data)
        else:
            self.exited = frame

    def result(self) -> Result:
        assert self.exited is not None
        return Result(
            b"".join(self.stdout), b"".join(self.stderr), self.exited.exitcode, self.exited.termsig
        )


def _dispatch(
    frame: Frame, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None
) -> None:
    if isinstance(frame, Output):
        callback = on_stdout if frame.kind == "stdout" else on_stderr
        if callback is not None:
            callback(frame.data)


# -- blocking flavour --------------------------------------------------------------


class _BlockingSession:
    """What every blocking session shares: reading to the end, closing, ``with``."""

    _sock: socket.socket

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def wait(self) -> Result:
        """Read to the end and return everything as a :class:`Result`."""
        collector = _Collector()
        for frame in self:
            collector.add(frame)
        return collector.result()

    def close(self) -> None:
        """Close the connection (the broker terminates the program if it still runs)."""
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session(_BlockingSession):
    """A duplex session over a blocking socket (usable from threads and scripts).

    ``send`` and ``close_stdin`` may be called from another thread than the one
    iterating the frames. ``on_stdout``/``on_stderr`` are called with each chunk as
    it is iterated. Leaving the ``with`` block closes the connection.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        deadline: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> None:
        self._sock = sock
        self._parser = ClientSession()
        self._deadline = deadline
        self._on_stdout, self._on_stderr = on_stdout, on_stderr
        self._stdin_closed = False
        self.exited: Exited | None = None

    def _arm(self) -> None:
        if self._deadline is not None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout("the session did not finish in time")
            self._sock.settimeout(remaining)

    def send(self, data: bytes) -> None:
        """Send a chunk of stdin (ignored after :meth:`close_stdin` or the program's end)."""
        if data and not self._stdin_closed:
            self._sendall(encode(data))

    def close_stdin(self) -> None:
        """Close the program's stdin (it reads EOF)."""
        if not self._stdin_closed:
            self._stdin_closed = True
            self._sendall(b"0:,")

    def _sendall(self, data: bytes) -> None:
        try:
            self._arm()
            self._sock.sendall(data)
        except TimeoutError:
            raise Timeout("the session did not finish in time") from None
        except (BrokenPipeError, ConnectionResetError):
            self._stdin_closed = True  # the program is gone; its exit is on the way

    def __iter__(self) -> Iterator[Frame]:
        """Frames as they arrive; the last one is :class:`Exited`."""
        while self.exited is None:
            event = self._parser.next_event()
            if event is NEED_DATA:
                try:
                    self._arm()
                    data = self._sock.recv(_RECV_CHUNK)
                except TimeoutError:
                    raise Timeout("the session did not finish in time") from None
                except ConnectionResetError:
                    data = b""
                self._parser.receive_data(data)
                continue
            assert isinstance(event, Output | Exited)
            if isinstance(event, Exited):
                self.exited = event
            _dispatch(event, self._on_stdout, self._on_stderr)
            yield event


def _connect_blocking(target: str, deadline: float | None) -> socket.socket:
    path = parse_target(target)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if deadline is not None:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.connect(path)
    except TimeoutError:
        sock.close()
        raise Timeout(f"connecting to {path} timed out") from None
    except OSError as exc:
        sock.close()
        raise BrokerUnavailable(describe_connect_error(path, exc)) from None
    return sock


def open_session(
    target: str,
    argv: Sequence[str | bytes],
    *,
    timeout: float | None = None,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
) -> Session | GatewaySession:
    """Start ``argv`` through the broker and return a duplex :class:`Session`.

    Use it as a context manager: leaving it early terminates the program. Through
    the gateway (``http(s)://``, ``ws(s)://``) the session is its WebSocket.
    """
    if _is_gateway(target):
        from .gateway_client import open_gateway_session

        return open_gateway_session(
            target, argv, timeout=timeout, on_stdout=on_stdout, on_stderr=on_stderr
        )
    deadline = None if timeout is None else time.monotonic() + timeout
    sock = _connect_blocking(target, deadline)
    session = Session(sock, deadline=deadline, on_stdout=on_stdout, on_stderr=on_stderr)
    session._sendall(encode_request(argv))
    return session


def run(
    target: str,
    argv: Sequence[str | bytes],
    *,
    stdin: bytes = b"",
    timeout: float | None = None,
) -> Result:
    """Run ``argv`` to the end: send ``stdin``, close it, collect the output.

    Stdin is written while output is read (one thread, non-blocking socket), so any
    size works with a program that echoes it. Raises :class:`BrokerUnavailable`,
    :class:`Timeout` or :class:`ProtocolError`.
    """
    if _is_gateway(target):
        from .gateway_client import run_gateway

        result: Result = run_gateway(target, argv, stdin=stdin, timeout=timeout)
        return result
    deadline = None if timeout is None else time.monotonic() + timeout
    sock = _connect_blocking(target, deadline)
    with sock:
        sock.setblocking(False)
        pending = memoryview(encode_request(argv, [stdin]) + b"0:,")
        parser, collector = ClientSession(), _Collector()
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        with selector:
            while collector.exited is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise Timeout("the program did not finish in time")
                for _, events in selector.select(remaining):
                    if events & selectors.EVENT_WRITE and pending:
                        try:
                            pending = pending[sock.send(pending[:_RECV_CHUNK]) :]
                        except (BrokenPipeError, ConnectionResetError):
                            pending = memoryview(b"")  # the program ended early
                        except BlockingIOError:
                            pass
                        if not pending:
                            selector.modify(sock, selectors.EVENT_READ)
                    if events & selectors.EVENT_READ:
                        try:
                            data = sock.recv(_RECV_CHUNK)
                        except BlockingIOError:
                            continue
                        except ConnectionResetError:
                            data = b""
                        parser.receive_data(data)
                        while (event := parser.next_event()) is not NEED_DATA:
                            assert isinstance(event, Output | Exited)
                            collector.add(event)
    return collector.result()


# -- trio flavour ------------------------------------------------------------------


class AsyncSession:
    """A duplex session over a trio socket: ``await send()``, ``await close_stdin()``,
    ``async for frame in session``. Sending and iterating may run in different tasks.
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
        self._send_lock = trio.Lock()
        self._stdin_closed = False
        self._on_stdout, self._on_stderr = on_stdout, on_stderr
        self.exited: Exited | None = None

    async def _sendall(self, data: bytes) -> None:
        async with self._send_lock:
            view = memoryview(data)
            try:
                while view:
                    view = view[await self._sock.send(view) :]
            except (BrokenPipeError, ConnectionResetError):
                self._stdin_closed = True  # the program is gone; its exit is on the way

    async def send(self, data: bytes) -> None:
        """Send a chunk of stdin (ignored after :meth:`close_stdin` or the program's end)."""
        if data and not self._stdin_closed:
            await self._sendall(encode(data))

    async def close_stdin(self) -> None:
        if not self._stdin_closed:
            self._stdin_closed = True
            await self._sendall(b"0:,")

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
                    data = await self._sock.recv(_RECV_CHUNK)
                except ConnectionResetError:
                    data = b""
                self._parser.receive_data(data)
                continue
            assert isinstance(event, Output | Exited)
            if isinstance(event, Exited):
                self.exited = event
            _dispatch(event, self._on_stdout, self._on_stderr)
            return event
        raise StopAsyncIteration

    async def wait(self) -> Result:
        collector = _Collector()
        async for frame in self:
            collector.add(frame)
        return collector.result()


async def _connect_trio(target: str) -> trio.socket.SocketType:
    path = parse_target(target)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(path)
    except OSError as exc:
        sock.close()
        raise BrokerUnavailable(describe_connect_error(path, exc)) from None
    return sock


@asynccontextmanager
async def open_async_session(
    target: str,
    argv: Sequence[str | bytes],
    *,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
) -> AsyncIterator[AsyncSession | AsyncGatewaySession]:
    """Start ``argv`` and yield an :class:`AsyncSession`; leaving closes the connection
    (the broker terminates the program if it still runs). Bound it with
    ``trio.fail_after``/``move_on_after``. Through the gateway, the WebSocket.
    """
    if _is_gateway(target):
        from .gateway_client import open_async_gateway_session

        async with open_async_gateway_session(
            target, argv, on_stdout=on_stdout, on_stderr=on_stderr
        ) as gateway_session:
            yield gateway_session
        return
    async with open_unix_session(target, argv, on_stdout=on_stdout, on_stderr=on_stderr) as s:
        yield s


@asynccontextmanager
async def open_unix_session(
    target: str,
    argv: Sequence[str | bytes],
    *,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
) -> AsyncIterator[AsyncSession]:
    """:func:`open_async_session` over the broker's Unix socket only (the gateway's own
    way to the broker)."""
    sock = await _connect_trio(target)
    with sock:
        session = AsyncSession(sock, on_stdout=on_stdout, on_stderr=on_stderr)
        await session._sendall(encode_request(argv))
        yield session


async def arun(
    target: str,
    argv: Sequence[str | bytes],
    *,
    stdin: bytes = b"",
    timeout: float | None = None,
) -> Result:
    """The trio flavour of :func:`run`: stdin is sent by a task while output is read."""
    if _is_gateway(target):
        from .gateway_client import run_gateway

        gateway_result: Result = await trio.to_thread.run_sync(
            lambda: run_gateway(target, argv, stdin=stdin, timeout=timeout),
            abandon_on_cancel=True,
        )
        return gateway_result
    try:
        with trio.fail_after(timeout if timeout is not None else float("inf")), single_errors():
            async with open_async_session(target, argv) as session, trio.open_nursery() as nursery:

                async def feed() -> None:
                    for start in range(0, len(stdin), _STDIN_CHUNK):
                        await session.send(stdin[start : start + _STDIN_CHUNK])
                    await session.close_stdin()

                nursery.start_soon(feed)
                result = await session.wait()
                nursery.cancel_scope.cancel()
                return result
    except trio.TooSlowError:
        raise Timeout("the program did not finish in time") from None


async def check_broker(target: str) -> None:
    """Raise :class:`BrokerUnavailable` unless the broker accepts a connection."""
    sock = await _connect_trio(target)
    sock.close()
