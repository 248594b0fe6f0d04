"""The blocking flavour over the broker's Unix socket: plain sockets, no event loop,
usable from threads and scripts. Parsing is the sans-IO ``ClientSession``.

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
from typing import Self

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
    one_shot_request,
    parse_target,
    stdin_netstrings,
    timeout_error,
    unavailable,
)

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
            raise Timeout(timeout_error(self.timeout, self.what))
        return left

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
        self._parser = ClientSession()
        self._on_stdout, self._on_stderr = on_stdout, on_stderr
        # A send of many netstrings goes out whole before a close from another thread.
        self._send_lock = threading.Lock()
        self._stdin_closed = False
        #: How the program ended, once the last frame was read.
        self.exited: Exited | None = None

    def send(self, data: bytes) -> None:
        """Send stdin, any amount (in netstrings of at most 64 KiB); ignored after
        :meth:`close_stdin` or the program's end."""
        with self._send_lock:
            for netstring in stdin_netstrings(data):
                if self._stdin_closed:
                    return
                self._sendall(netstring)

    def close_stdin(self) -> None:
        """Close the program's stdin (it reads EOF after what was sent before)."""
        with self._send_lock:
            if not self._stdin_closed:
                self._stdin_closed = True
                self._sendall(CLOSE_STDIN)

    def _sendall(self, data: bytes) -> None:
        try:
            self._deadline.arm(self._sock)
            self._sock.sendall(data, _SEND_FLAGS)
        except TimeoutError:
            raise Timeout(timeout_error(self._deadline.timeout, self._deadline.what)) from None
        except _GONE:
            self._stdin_closed = True  # the program is gone; its exit is on the way

    def __iter__(self) -> Iterator[Frame]:
        """Frames as they arrive; the last one is :class:`Exited`.

        Error handling: :class:`Timeout` when the deadline passes, :class:`ProtocolError`
        when the broker breaks the protocol or closes before the exit pair.
        """
        while self.exited is None:
            event = self._parser.next_event()
            if event is NEED_DATA:
                try:
                    self._deadline.arm(self._sock)
                    data = self._sock.recv(RECV_CHUNK)
                except TimeoutError:
                    raise Timeout(
                        timeout_error(self._deadline.timeout, self._deadline.what)
                    ) from None
                except ConnectionResetError:
                    data = b""
                self._parser.receive_data(data)
                continue
            assert isinstance(event, Output | Exited)
            if isinstance(event, Exited):
                self.exited = event
            dispatch(event, self._on_stdout, self._on_stderr)
            yield event


def open_session(
    target: str,
    argv: Sequence[str | bytes],
    *,
    timeout: float | None = None,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
) -> Session:
    """Connect, send ``argv`` and return the started :class:`Session`."""
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
    """One-shot over the Unix socket: one thread, a non-blocking socket and a selector,
    so stdin is written while the output is read."""
    request = one_shot_request(argv, stdin)
    pending = memoryview(next(request))  # argv: a bad one raises before connecting
    deadline = _Deadline(timeout, "the program")
    parser, collector = ClientSession(), Collector()
    with connect(target, deadline) as sock, selectors.DefaultSelector() as selector:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while collector.exited is None:
            for _, events in selector.select(deadline.remaining()):
                if events & selectors.EVENT_WRITE:
                    try:
                        pending = pending[sock.send(pending, _SEND_FLAGS) :]
                    except BlockingIOError:
                        pass
                    except _GONE:
                        request = iter([])  # the program ended early; its exit is coming
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
                    parser.receive_data(data)
                    while (event := parser.next_event()) is not NEED_DATA:
                        assert isinstance(event, Output | Exited)
                        collector.add(event)
    return collector.result()
