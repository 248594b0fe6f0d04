"""The blocking flavour: :func:`run` and :func:`open_session`. Over the broker's Unix
socket it uses plain sockets, no event loop (usable from threads and scripts); the
session is the sans-IO :class:`~._common.SessionState`. Gateway targets go to
:mod:`._gateway`.

Timeouts are one deadline over the whole session (connect included); when it passes
the call raises :class:`Timeout` and the connection is closed, so the broker
terminates the program.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Self

from sockexec_py.errors import Timeout
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
    one_shot_request,
    parse_target,
    timeout_error,
    unavailable,
)

if TYPE_CHECKING:
    from ._gateway import GatewaySession

# The broker may close while we still send stdin (the program exited without reading
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


class _BlockingSession:
    """What every blocking session shares (the gateway's WebSocket one too): reading
    to the end, closing, ``with``."""

    _sock: socket.socket

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

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


class Session(_BlockingSession):
    """A duplex session over a blocking socket.

    ``send`` and ``close_stdin`` may be called from other threads than the one
    iterating the frames (one ``send`` goes out whole, before a later close);
    ``on_stdout``/``on_stderr`` are called with each chunk as it is iterated. The
    broker holds bounded buffers: a program that echoes its stdin stalls if nobody
    reads its output while a large stdin is sent.

    Resource handling: the session owns its socket; leaving the ``with`` block (or
    :meth:`close`) closes it, and the broker then terminates the program if it still
    runs.
    """

    def __init__(
        self,
        sock: socket.socket,
        deadline: _Deadline,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> None:
        self._sock = sock
        self._deadline = deadline
        self._state = SessionState(on_stdout, on_stderr)
        # A send of many netstrings goes out whole before a close from another thread.
        self._send_lock = threading.Lock()

    @property
    def exited(self) -> Exited | None:
        """How the program ended, once the last frame was read."""
        return self._state.exited

    def send(self, data: bytes) -> None:
        """Send stdin, any amount (in netstrings of at most 64 KiB); ignored after
        :meth:`close_stdin` or the program's end."""
        with self._send_lock:
            for netstring in self._state.stdin(data):
                self._sendall(netstring)

    def close_stdin(self) -> None:
        """Close the program's stdin (it reads EOF after what was sent before)."""
        with self._send_lock:
            self._sendall(self._state.close_stdin())

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

    def __iter__(self) -> Iterator[Frame]:
        """Frames as they arrive; the last one is :class:`Exited`.

        Error handling: :class:`Timeout` when the deadline passes, :class:`ProtocolError`
        when the broker breaks the protocol or closes before the exit pair.
        """
        while self.exited is None:
            frame = self._state.next_frame()
            if frame is not None:
                yield frame
                continue
            try:
                self._deadline.arm(self._sock)
                data = self._sock.recv(RECV_CHUNK)
            except TimeoutError:
                raise self._deadline.expired() from None
            except ConnectionResetError:
                data = b""
            self._state.receive_data(data)


def open_session(
    target: str,
    argv: Sequence[str | bytes],
    *,
    timeout: float | None = None,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
) -> Session | GatewaySession:
    """Start ``argv`` and return a duplex session: ``send(data)``, ``close_stdin()``,
    iterate its frames (``Output``, then ``Exited`` last), ``wait()`` for a
    :class:`Result`.

    Use it as a context manager: leaving it early terminates the program. ``timeout``
    bounds the whole session (then :class:`Timeout`); ``on_stdout``/``on_stderr`` are
    called with each chunk as it is iterated. Through the gateway the session is its
    WebSocket, with the same methods.
    """
    if is_gateway(target):
        with gateway_extra():
            from ._gateway import open_gateway_session
        return open_gateway_session(
            target, argv, timeout=timeout, on_stdout=on_stdout, on_stderr=on_stderr
        )
    request = encode_request(argv)
    deadline = _Deadline(timeout, "the session")
    sock = connect(target, deadline)
    session = Session(sock, deadline, on_stdout=on_stdout, on_stderr=on_stderr)
    try:
        session._sendall(request)
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
            from ._gateway import run_gateway
        result: Result = run_gateway(target, argv, stdin=stdin, timeout=timeout)
        return result
    request = one_shot_request(argv, stdin)
    pending = memoryview(next(request))  # argv: a bad one raises before connecting
    deadline = _Deadline(timeout, "the program")
    state, collector = SessionState(), Collector()
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
                        request = iter(())  # the program ended early; its exit is coming
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
