"""The session state machines, sans-IO: bytes in, events out; events in, bytes out.

Rules of the protocol, all enforced here and nowhere else:

1. Client -> server: ``argc`` (canonical decimal, 1..max_args), then ``argc`` argv
   netstrings (no NUL byte, total size bounded), then stdin netstrings streamed as they
   arrive, then ``0:,`` to close stdin. End of input at a frame boundary after the argv
   also closes stdin (a half-close, what ``socat`` does); anywhere else in the request
   it is a protocol error. After ``0:,`` only more ``0:,`` may come, and are ignored
   (lua-resty-exec sends two for an empty stdin, and the C sockexec takes them);
   any other byte after it is a protocol error.
2. After the argv, and only between frames, the byte ``!`` asks for the program's
   termination (TERM, then KILL after ``-k``; the exit pair is still sent). It is
   the last thing the client sends: anything after it is a protocol error. (Any
   protocol error after the start terminates the program, SPEC §4; this one is not
   an error but a request, so the broker says so.) Clients of the C sockexec never
   send it.
3. Server -> client: pairs of netstrings, a type then its data. Types are ``stdout``,
   ``stderr``, ``exitcode``, ``termsig`` (and ``unknown``, which we never send but
   accept). The ``exitcode``/``termsig`` pair is the last one.
4. A peer's violation is a :class:`RemoteProtocolError` whose message is one line fit
   to send back; misuse by our own code is a :class:`LocalProtocolError`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar

from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    ArgvReady,
    ClientEvent,
    Exited,
    InputEnded,
    Output,
    ServerEvent,
    StdinClosed,
    StdinData,
    TerminateRequested,
)
from .netstring import END, NEED_DATA, Chunk, Decoder, _Sentinel, encode
from .replies import (
    encode_error_reply,
    encode_exit,
    encode_exit_pair,
    encode_output_pair,
    exit_event,
    termsig_text,
)

__all__ = [
    "NEED_DATA",
    "ClientSession",
    "ServerLimits",
    "ServerSession",
    "encode_error_reply",
    "encode_exit",
    "encode_exit_pair",
    "encode_output_pair",
    "encode_request",
    "exit_event",
    "termsig_text",
]

#: The byte that asks for the program's termination (rule 2).
TERMINATE = b"!"
#: The empty netstring: it closes the program's stdin.
CLOSE_STDIN = b"0:,"


#: Longer decimal fields are refused before int() sees them: past 4300 digits int()
#: raises ValueError (not a protocol error), and it is quadratic well before that.
_MAX_DECIMAL_DIGITS = 19
# The argc frame is a short decimal; anything longer is refused on its length digits.
_MAX_ARGC_FRAME = 64


def _parse_decimal(text: bytes) -> int | None:
    """Parse canonical non-negative decimal ASCII (no sign, space or leading zero) of at
    most 19 digits."""
    if (
        not text
        or len(text) > _MAX_DECIMAL_DIGITS
        or not text.isdigit()
        or (len(text) > 1 and text[:1] == b"0")
    ):
        return None
    return int(text)


_T = TypeVar("_T")


class _Poisonable(Protocol):
    _error: RemoteProtocolError | None


def _poisoned_on_error(session: _Poisonable, step: Callable[[], _T]) -> _T:
    """Run ``step``; after a peer's protocol error, raise that error on every call.

    The stream cannot be resynchronised, so a session never reads on past an error.
    """
    if session._error is not None:
        raise session._error
    try:
        return step()
    except RemoteProtocolError as error:
        session._error = error
        raise


# ---------------------------------------------------------------------------------
# Server side


class ServerLimits:
    """Bounds on what one request may make the server buffer."""

    __slots__ = ("max_args", "max_argv_bytes", "max_frame")

    def __init__(
        self, *, max_frame: int = 64 << 20, max_args: int = 10_000, max_argv_bytes: int = 2 << 20
    ) -> None:
        self.max_frame = max_frame
        self.max_args = max_args
        self.max_argv_bytes = max_argv_bytes


class _ServerState(enum.Enum):
    ARGC = "argc"
    ARGV = "argv"
    STDIN = "stdin"
    STDIN_CLOSED = "stdin closed"
    TERMINATING = "terminating"
    ENDED = "ended"


class ServerSession:
    """The server's view of one client session.

    Feed every byte read from the client to :meth:`receive_data` (``b""`` at end of
    input) and call :meth:`next_event` until it returns :data:`NEED_DATA`. Events come in
    this order: one :class:`ArgvReady`, any number of :class:`StdinData`, at most one
    :class:`StdinClosed`, at most one :class:`TerminateRequested` (after which no
    stdin event comes), and :class:`InputEnded` when the client's input ended.
    A client that leaves before sending a byte yields just :class:`InputEnded`.

    Error handling: malformed or out-of-limit input raises :class:`RemoteProtocolError`
    (and again on every later call).
    """

    __slots__ = (  # many live at once: no __dict__ each
        "_argc", "_argv", "_argv_bytes", "_decoder", "_error", "_input_ended_pending", "_state",
        "limits"
    )  # fmt: skip

    def __init__(self, limits: ServerLimits | None = None) -> None:
        self.limits = limits or ServerLimits()
        self._decoder = Decoder(self.limits.max_frame)
        self._state = _ServerState.ARGC
        self._argc = 0
        self._argv: list[bytes] = []
        self._argv_bytes = 0
        self._input_ended_pending = False
        self._error: RemoteProtocolError | None = None

    @property
    def state(self) -> str:
        return self._state.value

    def receive_data(self, data: bytes | memoryview) -> None:
        """Feed bytes from the client; ``b""`` means it will send nothing more."""
        self._decoder.feed(data)

    def next_event(self) -> ServerEvent | _Sentinel:
        return _poisoned_on_error(self, self._next_event)

    def _next_event(self) -> ServerEvent | _Sentinel:
        state = self._state
        if state is _ServerState.STDIN:
            return self._next_stdin_event()
        if state is _ServerState.ARGC or state is _ServerState.ARGV:
            return self._next_request_event()
        if state is _ServerState.STDIN_CLOSED:
            return self._next_after_close()
        if state is _ServerState.TERMINATING:
            return self._next_after_terminate()
        return NEED_DATA

    def _next_request_event(self) -> ServerEvent | _Sentinel:
        limits = self.limits
        while True:
            # Refuse an oversized argc or argument on its length digits: what is
            # buffered before the argv is complete stays within the argv budget.
            if self._state is _ServerState.ARGC:
                frame = self._decoder.next_frame(_MAX_ARGC_FRAME, "argc is not a decimal number")
            else:
                frame = self._decoder.next_frame(
                    max(limits.max_argv_bytes - self._argv_bytes - 1, 0),
                    f"argv exceeds the limit of {limits.max_argv_bytes} bytes",
                )
            if frame is NEED_DATA:
                return NEED_DATA
            if frame is END:
                if self._state is _ServerState.ARGC:
                    self._state = _ServerState.ENDED
                    return InputEnded()
                raise RemoteProtocolError("input ended before the argv was complete")
            assert isinstance(frame, bytes)
            if self._state is _ServerState.ARGC:
                argc = _parse_decimal(frame)
                if argc is None:
                    raise RemoteProtocolError(f"argc is not a decimal number: {frame[:20]!r}")
                if argc == 0:
                    raise RemoteProtocolError("argc must be at least 1")
                if argc > limits.max_args:
                    raise RemoteProtocolError(
                        f"argc {argc} exceeds the limit of {limits.max_args} arguments"
                    )
                self._argc = argc
                self._state = _ServerState.ARGV
                continue
            if b"\0" in frame:
                raise RemoteProtocolError(f"argument {len(self._argv)} contains a NUL byte")
            self._argv_bytes += len(frame) + 1
            if self._argv_bytes > limits.max_argv_bytes:
                raise RemoteProtocolError(
                    f"argv exceeds the limit of {limits.max_argv_bytes} bytes"
                )
            self._argv.append(frame)
            if len(self._argv) == self._argc:
                self._state = _ServerState.STDIN
                argv = tuple(self._argv)
                self._argv = []
                return ArgvReady(argv)

    def _next_stdin_event(self) -> ServerEvent | _Sentinel:
        if self._decoder.take_prefix(TERMINATE):
            return self._terminate_requested()
        chunk = self._decoder.next_chunk()
        if chunk is NEED_DATA:
            return NEED_DATA
        if chunk is END:
            # Half-close at a frame boundary: end of stdin, then end of input.
            self._state = _ServerState.STDIN_CLOSED
            self._input_ended_pending = True
            return StdinClosed()
        assert isinstance(chunk, Chunk)
        if chunk.frame_length == 0:
            self._state = _ServerState.STDIN_CLOSED
            return StdinClosed()
        if chunk.data:
            return StdinData(chunk.data)
        # The terminating ',' of a frame whose payload was already handed out.
        return self._next_stdin_event()

    def _next_after_close(self) -> ServerEvent | _Sentinel:
        if self._input_ended_pending:
            self._input_ended_pending = False
            self._state = _ServerState.ENDED
            return InputEnded()
        while self._decoder.buffered:
            if self._decoder.take_prefix(TERMINATE):
                return self._terminate_requested()
            taken = self._decoder.take_prefix(CLOSE_STDIN)
            if taken is None:
                return NEED_DATA
            if not taken:
                raise RemoteProtocolError("data received after stdin was closed")
        if self._decoder.next_frame() is END:
            self._state = _ServerState.ENDED
            return InputEnded()
        return NEED_DATA

    def _terminate_requested(self) -> TerminateRequested:
        self._state = _ServerState.TERMINATING
        return TerminateRequested()

    def _next_after_terminate(self) -> ServerEvent | _Sentinel:
        if self._decoder.buffered:
            raise RemoteProtocolError("data received after the request to terminate")
        if self._decoder.next_frame() is END:
            self._state = _ServerState.ENDED
            return InputEnded()
        return NEED_DATA


# ---------------------------------------------------------------------------------
# Client side


def encode_request(argv: Sequence[bytes | str], stdin: Iterable[bytes] = ()) -> bytes:
    """Encode argc and argv, then the given stdin chunks (``0:,`` is not added)."""
    if not argv:
        raise LocalProtocolError("argv must not be empty")
    items = [a.encode() if isinstance(a, str) else a for a in argv]
    if any(b"\0" in a for a in items):
        raise LocalProtocolError("an argument contains a NUL byte")
    parts = [encode(b"%d" % len(items))]
    parts.extend(encode(a) for a in items)
    parts.extend(encode(c) for c in stdin if c)
    return b"".join(parts)


class _ClientState(enum.Enum):
    TYPE = "type"
    DATA = "data"
    DONE = "done"


_CLIENT_TYPES = frozenset((b"stdout", b"stderr", b"exitcode", b"termsig", b"unknown"))


class ClientSession:
    """The client's view of one session: parses the server's pairs into events.

    Feed the bytes read from the server to :meth:`receive_data` and call
    :meth:`next_event` until :data:`NEED_DATA`. The last event is :class:`Exited`.
    End of input before it, any byte after it, an unknown type or an oversized frame
    raise :class:`RemoteProtocolError`.
    """

    def __init__(self, max_frame: int = 16 << 20) -> None:
        self._decoder = Decoder(max_frame)
        self._state = _ClientState.TYPE
        self._type = b""
        self._error: RemoteProtocolError | None = None

    @property
    def done(self) -> bool:
        """True once the exit pair was received."""
        return self._state is _ClientState.DONE

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the server; ``b""`` means the server closed."""
        self._decoder.feed(data)

    def next_event(self) -> ClientEvent | _Sentinel:
        return _poisoned_on_error(self, self._next_event)

    def _next_event(self) -> ClientEvent | _Sentinel:
        while True:
            if self._state is _ClientState.DONE:
                if self._decoder.buffered:
                    raise RemoteProtocolError("data received after the exit status")
                return NEED_DATA
            frame = self._decoder.next_frame()
            if frame is NEED_DATA:
                return NEED_DATA
            if frame is END:
                raise RemoteProtocolError("connection closed before the exit status")
            assert isinstance(frame, bytes)
            if self._state is _ClientState.TYPE:
                if frame not in _CLIENT_TYPES:
                    raise RemoteProtocolError(f"unknown frame type {frame[:20]!r}")
                self._type = frame
                self._state = _ClientState.DATA
                continue
            self._state = _ClientState.TYPE
            kind = self._type
            if kind == b"stdout":
                return Output("stdout", frame)
            if kind == b"stderr":
                return Output("stderr", frame)
            if kind == b"unknown":
                continue
            self._state = _ClientState.DONE
            if kind == b"exitcode":
                code = _parse_decimal(frame)
                if code is None:
                    raise RemoteProtocolError(f"exitcode is not a decimal number: {frame[:20]!r}")
                return Exited(exitcode=code)
            try:
                return Exited(termsig=frame.decode("ascii"))
            except UnicodeDecodeError:
                raise RemoteProtocolError(f"termsig is not ASCII: {frame[:20]!r}") from None
