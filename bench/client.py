"""The benchmark's clients: parsers of the server's pairs, and blocking connect and
one-shot helpers (one session at a time; :mod:`bench.many` runs many at once).

Two parsers collect a :class:`Reply`: :class:`SessionParser` is the project's own
:class:`ClientSession` (every check of the protocol), :class:`CountingParser` a lean
one that counts output without copying it (rows 3-5, and the C sockexec, whose exit
pair may come before its last stdout pair: ``exit_pair_last=False`` counts to EOF).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sockexec_py.errors import ProtocolError
from sockexec_py.events import Exited, Output
from sockexec_py.protocol import NEED_DATA, ClientSession, encode_request

from .config import END_OF_STDIN, RECV_SIZE


class BenchError(Exception):
    """A session did not end as expected (wrong status, wrong byte count, bad reply)."""


@dataclass
class Reply:
    """What one session returned (output counted, stderr kept up to a few KiB)."""

    exited: Exited | None = None
    stdout_bytes: int = 0
    stdout_head: bytes = b""  # the first few KiB (SessionParser only)
    stderr: bytes = b""

    def check(self, expected_stdout: int | None = 0) -> None:
        if self.exited is None:
            raise BenchError("no exit pair")
        if self.exited.exitcode != 0:
            raise BenchError(f"program ended with {self.exited} stderr={self.stderr[:200]!r}")
        if expected_stdout is not None and self.stdout_bytes != expected_stdout:
            raise BenchError(f"got {self.stdout_bytes} stdout bytes, expected {expected_stdout}")


class ReplyParser(Protocol):
    """Bytes from the server in (``b""`` when it closed), a :class:`Reply` out."""

    reply: Reply

    def feed(self, data: bytes) -> None: ...


class SessionParser:
    """The project's :class:`ClientSession`, collecting a :class:`Reply`."""

    def __init__(self) -> None:
        self.session = ClientSession(max_frame=1 << 20)
        self.reply = Reply()

    def feed(self, data: bytes) -> None:
        try:
            self._feed(data)
        except ProtocolError as exc:
            raise BenchError(f"bad reply: {exc}") from None

    def _feed(self, data: bytes) -> None:
        self.session.receive_data(data)
        reply = self.reply
        while (event := self.session.next_event()) is not NEED_DATA:
            if isinstance(event, Output):
                if event.kind == "stdout":
                    reply.stdout_bytes += len(event.data)
                    if len(reply.stdout_head) < 4096:
                        reply.stdout_head += event.data[:4096]
                elif len(reply.stderr) < 4096:
                    reply.stderr += event.data
            else:
                assert isinstance(event, Exited)
                reply.exited = event
        if not data and not self.session.done:
            raise BenchError("connection closed before the exit pair")


_HEADER, _PAYLOAD, _COMMA = 0, 1, 2
_TYPES = frozenset((b"stdout", b"stderr", b"exitcode", b"termsig", b"unknown"))


class CountingParser:
    """A lean parser of the server's pairs that counts output without copying it.

    Same checks as :class:`ClientSession` on framing and types, but payloads of
    ``stdout``/``stderr`` pairs are only counted: per 64 KiB pair it costs a handful
    of Python operations and no copy, so the client stays off the critical path in the
    throughput measures.

    With ``exit_pair_last=False`` pairs after the exit pair are counted too (the C
    sockexec may send its last stdout pair after ``exitcode``): the reply ends at EOF.
    """

    def __init__(self, *, exit_pair_last: bool = True) -> None:
        self.reply = Reply()
        self._exit_pair_last = exit_pair_last
        self._state = _HEADER
        self._digits = bytearray()
        self._small = bytearray()  # a type, or the data of an exit pair
        self._remaining = 0
        self._type: bytes | None = None  # set while the data frame of a pair is read
        self._stderr = bytearray()

    def feed_buffer(self, buf: bytearray, n: int) -> None:
        """Parse ``buf[:n]``; ``n == 0`` means the server closed."""
        reply = self.reply
        if n == 0:
            if reply.exited is None:
                raise BenchError("connection closed before the exit pair")
            return
        i = 0
        while i < n:
            if reply.exited is not None and self._exit_pair_last:
                raise BenchError("data after the exit pair")
            state = self._state
            if state == _PAYLOAD:
                take = min(self._remaining, n - i)
                kind = self._type
                if kind == b"stdout":
                    reply.stdout_bytes += take
                elif kind == b"stderr":
                    if len(self._stderr) < 4096:
                        self._stderr += buf[i : i + take]
                else:
                    self._small += buf[i : i + take]
                    if len(self._small) > 64:
                        raise BenchError("oversized type or exit frame")
                i += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _COMMA
            elif state == _HEADER:
                colon = buf.find(b":", i, n)
                end = n if colon < 0 else colon
                self._digits += buf[i:end]
                if len(self._digits) > 9:
                    raise BenchError("netstring length too long")
                if colon < 0:
                    return
                i = colon + 1
                if not self._digits.isdigit():
                    raise BenchError(f"bad netstring length {bytes(self._digits)!r}")
                self._remaining = int(self._digits)
                self._digits.clear()
                self._state = _PAYLOAD if self._remaining else _COMMA
            else:
                if buf[i] != 0x2C:
                    raise BenchError("netstring not terminated by ','")
                i += 1
                self._state = _HEADER
                self._frame_done()

    def feed(self, data: bytes) -> None:
        self.feed_buffer(bytearray(data), len(data))

    def _frame_done(self) -> None:
        if self._type is None:
            kind = bytes(self._small)
            self._small.clear()
            if kind not in _TYPES:
                raise BenchError(f"unknown frame type {kind!r}")
            self._type = kind
            return
        kind, self._type = self._type, None
        data = bytes(self._small)
        self._small.clear()
        if kind == b"stderr":
            self.reply.stderr = bytes(self._stderr)
        elif kind == b"exitcode":
            if not data.isdigit():
                raise BenchError(f"exitcode is not a number: {data!r}")
            self.reply.exited = Exited(exitcode=int(data))
        elif kind == b"termsig":
            self.reply.exited = Exited(termsig=data.decode("ascii", "replace"))


def connect(path: str, timeout: float | None = 60.0) -> socket.socket:
    """Connect to the broker. With a timeout the socket is non-blocking underneath, so,
    as for nginx, a full listen backlog fails at once with EAGAIN instead of waiting."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def reference_parser() -> CountingParser:
    """The parser for the C sockexec: output counted to EOF, whatever the order."""
    return CountingParser(exit_pair_last=False)


def one_shot(
    path: str,
    request: bytes,
    parser_factory: Callable[[], ReplyParser] = SessionParser,
    timeout: float = 60.0,
) -> Reply:
    """connect, send the whole request in one write, read to close (``timeout``: per
    socket operation).

    One write, because the C sockexec crashes on a first read without a complete argc
    netstring; no half-close, because it kills the program on one.
    """
    parser = parser_factory()
    with connect(path, timeout) as sock:
        sock.sendall(request)
        while True:
            data = sock.recv(RECV_SIZE)
            parser.feed(data)
            if not data:
                return parser.reply


def read_reply(sock: socket.socket, parser_kind: str) -> Reply:
    """Read the reply to close with the chosen parser (``fast``, ``session``, or
    ``reference``: the fast one, counting to EOF for the C sockexec)."""
    buf = bytearray(RECV_SIZE)
    if parser_kind in ("fast", "reference"):
        counting = CountingParser(exit_pair_last=parser_kind == "fast")
        while True:
            n = sock.recv_into(buf)
            counting.feed_buffer(buf, n)
            if n == 0:
                return counting.reply
    session = SessionParser()
    while True:
        data = sock.recv(RECV_SIZE)
        session.feed(data)
        if not data:
            return session.reply


def request_for(argv: Sequence[str], close_stdin: bool = True) -> bytes:
    return encode_request(argv) + (END_OF_STDIN if close_stdin else b"")
