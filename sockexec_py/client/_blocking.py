"""The blocking flavour: :func:`run` and :func:`open_session`, on plain sockets, no event
loop (usable from threads and scripts). :class:`Session` drives any session state of
:mod:`._state` (the broker's socket, or the gateway's WebSocket).

Timeouts are one deadline over the whole session (connect included); when it passes
the call raises :class:`Timeout` and the connection is closed, so the broker
terminates the program.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Self

from sockexec_py.errors import BrokerUnavailable, Timeout
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

# The peer may close while we still send stdin (the program exited without reading
# it); MSG_NOSIGNAL keeps that an EPIPE error even where SIGPIPE is not ignored.
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
_GONE = (BrokenPipeError, ConnectionResetError)


class _Deadline:
    """One deadline over a whole session; ``None`` waits for ever."""

    def __init__(self, timeout: float | None, what: str) -> None:
        self.timeout = timeout
        self.what = what
        self._at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left; raises :class:`Timeout` once none are."""
        if self._at is None:
            return None
        left = self._at - time.monotonic()
        if left <= 0:
            raise self.expired()
        return left

    def expired(self) -> Timeout:
        """The error to raise once the deadline has passed."""
        return Timeout(timeout_error(self.timeout, self.what))

    def arm(self, sock: socket.socket) -> None:
        sock.settimeout(self.remaining())


def connect(target: str, deadline: _Deadline) -> socket.socket:
    """A connected socket to the broker, or :class:`BrokerUnavailable`/:class:`Timeout`."""
    path = parse_target(target)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        deadline.arm(sock)  # a full backlog makes connect() wait
        sock.connect(path)
    except TimeoutError:
        sock.close()
        raise Timeout(f"connecting to {path}: {timeout_error(deadline.timeout)}") from None
    except OSError as exc:
        sock.close()
        raise unavailable(path, exc) from None
    except BaseException:
        sock.close()
        raise
    return sock


class Session:
    """A duplex session over a blocking socket, whatever the transport.

    ``send`` and ``close_stdin`` may be called from other threads than the one
    iterating the frames (one ``send`` goes out whole, before a later close);
    ``on_stdout``/``on_stderr`` are called with each chunk as it is iterated. The
    broker holds bounded buffers: a program that echoes its stdin stalls if nobody
    reads its output while a large stdin is sent.

    Resource handling: the session owns its socket; leaving the ``with`` block (or
    :meth:`close`) closes it, and the broker then terminates the program if it still
    runs.
    """

    def __init__(self, sock: socket.socket, state: SessionState, deadline: _Deadline) -> None:
        self._sock = sock
        self._state = state
        self._deadline = deadline
        # A send of many pieces goes out whole before a close from another thread.
        self._send_lock = threading.Lock()

    def _open(self) -> None:
        """Send the opening and read until the session is open (a handshake)."""
        self._sendall(self._state.opening())
        while not self._state.ready:
            self._state.receive_data(self._recv())
            self._sendall(self._state.data_to_send())

    @property
    def exited(self) -> Exited | None:
        """How the program ended, once the last frame was read."""
        return self._state.exited

    def send(self, data: bytes) -> None:
        """Send stdin, any amount (in pieces of at most 64 KiB); ignored after
        :meth:`close_stdin` or the program's end."""
        with self._send_lock:
            for piece in self._state.stdin(data):
                self._sendall(piece)

    def close_stdin(self) -> None:
        """Close the program's stdin (it reads EOF after what was sent before)."""
        with self._send_lock:
            self._sendall(self._state.close_stdin())

    def terminate(self) -> None:
        """Ask the broker to terminate the program (TERM, then KILL after its ``-k``);
        keep iterating: the exit frame says how it ended. No stdin after this."""
        with self._send_lock:
            self._sendall(self._state.terminate())

    def _sendall(self, data: bytes) -> None:
        if not data:
            return
        try:
            self._deadline.arm(self._sock)
            self._sock.sendall(data, _SEND_FLAGS)
        except TimeoutError:
            raise self._deadline.expired() from None
        except _GONE:
            self._state.stdin_gone()

    def _recv(self) -> bytes:
        try:
            self._deadline.arm(self._sock)
            return self._sock.recv(RECV_CHUNK)
        except TimeoutError:
            raise self._deadline.expired() from None
        except ConnectionResetError:
            return b""

    def __iter__(self) -> Iterator[Frame]:
        """Frames as they arrive; the last one is :class:`Exited`.

        Error handling: :class:`Timeout` when the deadline passes, :class:`ProtocolError`
        when the peer breaks the protocol or closes before the exit.
        """
        state = self._state
        while state.exited is None:
            frame = state.next_frame()
            if frame is not None:
                yield frame
                continue
            state.receive_data(self._recv())
            if owed := state.data_to_send():
                with self._send_lock:
                    self._sendall(owed)

    def wait(self) -> Result:
        """Read to the end and return everything as a :class:`Result`."""
        collector = Collector()
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


def _connect_gateway(url: str, deadline: _Deadline) -> socket.socket:
    with gateway_extra():
        from ._websocket import GatewayAddress
    address = GatewayAddress(url)
    try:
        sock = socket.create_connection((address.host, address.port), timeout=deadline.remaining())
        if address.secure:
            context = ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=address.host)
    except TimeoutError:
        raise deadline.expired() from None
    except OSError as exc:
        raise BrokerUnavailable(f"cannot reach the gateway at {url}: {exc}") from None
    return sock


def open_session(
    target: str,
    argv: Sequence[str | bytes],
    *,
    timeout: float | None = None,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
) -> Session:
    """Start ``argv`` and return a duplex session: ``send(data)``, ``close_stdin()``,
    iterate its frames (``Output``, then ``Exited`` last), ``wait()`` for a
    :class:`Result`.

    Use it as a context manager: leaving it early terminates the program. ``timeout``
    bounds the whole session (then :class:`Timeout`); ``on_stdout``/``on_stderr`` are
    called with each chunk as it is iterated. Through the gateway the session is its
    WebSocket, with the same methods.
    """
    deadline = _Deadline(timeout, "the session")
    state: SessionState
    if is_gateway(target):
        with gateway_extra():
            from ._websocket import GatewayAddress, WebSocketSessionState
        state = WebSocketSessionState(GatewayAddress(target), argv, None, on_stdout, on_stderr)
        sock = _connect_gateway(target, deadline)
    else:
        state = UnixSessionState(argv, on_stdout, on_stderr)
        sock = connect(target, deadline)
    session = Session(sock, state, deadline)
    try:
        session._open()
    except BaseException:
        sock.close()
        raise
    return session


def run(
    target: str,
    argv: Sequence[str | bytes],
    *,
    stdin: bytes = b"",
    timeout: float | None = None,
) -> Result:
    """Run ``argv`` to the end: send ``stdin``, close it, collect the output.

    Args:
        target: the broker's socket (path or ``unix:/path``) or the gateway's URL.
        argv: the program and its arguments (``str`` is encoded as UTF-8).
        stdin: all of the program's stdin; it is written (in netstrings of at most
            64 KiB) while the output is read, so any size goes through a program that
            echoes it.
        timeout: seconds for the whole run, connect included; ``None`` waits for ever.

    Returns the :class:`Result` (call :meth:`Result.check` to raise on failure).
    Raises :class:`BrokerUnavailable`, :class:`Timeout` or :class:`ProtocolError`.
    """
    if is_gateway(target):
        with gateway_extra():
            from ._http import run_gateway
        return run_gateway(target, argv, stdin=stdin, timeout=timeout)
    state, collector = UnixSessionState(argv), Collector()  # a bad argv raises here

    def one_shot() -> Iterator[bytes]:
        yield state.opening()
        yield from state.stdin(stdin)
        yield state.close_stdin()

    request = one_shot()
    pending = memoryview(next(request))
    deadline = _Deadline(timeout, "the program")
    # One thread, a non-blocking socket and a selector: stdin is written while the
    # output is read.
    with connect(target, deadline) as sock, selectors.DefaultSelector() as selector:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while state.exited is None:
            for _, events in selector.select(deadline.remaining()):
                if events & selectors.EVENT_WRITE:
                    try:
                        pending = pending[sock.send(pending, _SEND_FLAGS) :]
                    except BlockingIOError:
                        pass
                    except _GONE:
                        state.stdin_gone()  # the program ended early; its exit is coming
                        request = iter(())
                        pending = memoryview(b"")
                    if not pending:
                        pending = memoryview(next(request, b""))
                        if not pending:
                            selector.modify(sock, selectors.EVENT_READ)
                if events & selectors.EVENT_READ:
                    try:
                        data = sock.recv(RECV_CHUNK)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        data = b""
                    state.receive_data(data)
                    while (frame := state.next_frame()) is not None:
                        collector.add(frame)
    return collector.result()
