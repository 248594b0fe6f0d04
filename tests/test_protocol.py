"""Tests of the sans-IO session state machines (sockexec_py.protocol).

Requests and replies are fed whole, one byte at a time and split at arbitrary points
(hypothesis); a stateful hypothesis machine drives ServerSession with valid pieces,
stdin, close, end of input and garbage in any order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
from chunking import chunkings, run_client
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sockexec_py.errors import LocalProtocolError, RemoteProtocolError
from sockexec_py.events import (
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
from sockexec_py.netstring import encode
from sockexec_py.protocol import (
    NEED_DATA,
    TERMINATE,
    ClientSession,
    ServerLimits,
    ServerSession,
    encode_exit_pair,
    encode_output_pair,
    encode_request,
)

DIGITS = b"0123456789"

# -- helpers ------------------------------------------------------------------------


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


@dataclass
class ServerRun:
    events: list[ServerEvent] = field(default_factory=list)
    error: RemoteProtocolError | None = None

    @property
    def stdin(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, StdinData))

    def merged(self) -> list[ServerEvent]:
        """Events with consecutive StdinData joined (their split depends on chunking)."""
        out: list[ServerEvent] = []
        for event in self.events:
            if isinstance(event, StdinData) and out and isinstance(out[-1], StdinData):
                out[-1] = StdinData(out[-1].data + event.data)
            else:
                out.append(event)
        return out


def drain_server(session: ServerSession, run: ServerRun) -> None:
    while True:
        event = session.next_event()
        if event is NEED_DATA:
            return
        assert not isinstance(event, StdinData) or event.data, "empty StdinData"
        run.events.append(event)  # type: ignore[arg-type]


def run_server(
    pieces: list[bytes], *, eof: bool = True, limits: ServerLimits | None = None
) -> ServerRun:
    """Feed pieces (then end of input), draining after each; stops at the first error."""
    session = ServerSession(limits)
    run = ServerRun()
    try:
        for piece in [*pieces, b""] if eof else pieces:
            session.receive_data(piece)
            drain_server(session, run)
    except RemoteProtocolError as error:
        run.error = error
        # Poisoned: nothing but the same error afterwards.
        for _ in range(2):
            with pytest.raises(RemoteProtocolError) as again:
                session.next_event()
            assert again.value is error
    return run


def merge_outputs(events: list[ClientEvent]) -> list[ClientEvent]:
    out: list[ClientEvent] = []
    for event in events:
        if (
            isinstance(event, Output)
            and out
            and isinstance(out[-1], Output)
            and out[-1].kind == event.kind
        ):
            out[-1] = Output(event.kind, out[-1].data + event.data)
        else:
            out.append(event)
    return out


# -- server: the SPEC examples -------------------------------------------------------

SPEC_EXAMPLES = [
    (b"1:2,5:uname,2:-a,0:,", (b"uname", b"-a"), b""),
    (b"1:1,3:cat,5:hello,0:,", (b"cat",), b"hello"),
    (b"1:1,3:cat,5:hello,1: ,6:world\n,0:,", (b"cat",), b"hello world\n"),
]


@pytest.mark.parametrize(("stream", "argv", "stdin"), SPEC_EXAMPLES)
@given(data=st.data())
def test_spec_examples_any_chunking(
    data: st.DataObject, stream: bytes, argv: tuple[bytes, ...], stdin: bytes
) -> None:
    run = run_server(data.draw(chunkings(stream)))
    assert run.error is None
    expected: list[ServerEvent] = [ArgvReady(argv)]
    if stdin:
        expected.append(StdinData(stdin))
    expected += [StdinClosed(), InputEnded()]
    assert run.merged() == expected


@pytest.mark.parametrize(("stream", "argv", "stdin"), SPEC_EXAMPLES)
def test_spec_examples_bytewise_before_end_of_input(
    stream: bytes, argv: tuple[bytes, ...], stdin: bytes
) -> None:
    run = run_server(bytewise(stream), eof=False)
    assert run.error is None
    assert run.events[0] == ArgvReady(argv)
    assert run.stdin == stdin
    assert run.events[-1] == StdinClosed()  # InputEnded only comes with end of input


def test_argv_ready_before_stdin_and_stdin_streamed() -> None:
    """The program starts as soon as argv is complete, and a stdin netstring is
    handed out as it arrives, before the frame is complete."""
    session = ServerSession()
    run = ServerRun()
    session.receive_data(b"1:1,3:cat,")
    drain_server(session, run)
    assert run.events == [ArgvReady((b"cat",))]
    session.receive_data(b"10:hello")
    drain_server(session, run)
    assert run.events[1:] == [StdinData(b"hello")]
    session.receive_data(b"world,")
    drain_server(session, run)
    assert run.events[2:] == [StdinData(b"world")]
    assert session.state == "stdin"
    session.receive_data(b"0:,")
    drain_server(session, run)
    assert run.events[3:] == [StdinClosed()]
    assert session.next_event() is NEED_DATA
    session.receive_data(b"")
    assert session.next_event() == InputEnded()
    assert session.next_event() is NEED_DATA
    assert session.state == "ended"


# -- server: request errors ---------------------------------------------------------

SMALL = ServerLimits(max_frame=16, max_args=3, max_argv_bytes=12)

# (stream, limits, expected events before the error, regex the error must match)
SERVER_ERRORS = [
    pytest.param(b"1:0,", None, [], "argc must be at least 1", id="argc-zero"),
    pytest.param(b"1:x,", None, [], "argc", id="argc-not-number"),
    pytest.param(b"0:,", None, [], "argc", id="argc-empty"),
    pytest.param(b"2:01,3:cat,", None, [], "argc", id="argc-leading-zero"),
    pytest.param(b"2:00,", None, [], "argc", id="argc-zeros"),
    pytest.param(b"2:+1,3:cat,", None, [], "argc", id="argc-plus"),
    pytest.param(b"2:-1,", None, [], "argc", id="argc-minus"),
    pytest.param(b"2: 1,3:cat,", None, [], "argc", id="argc-space"),
    pytest.param(b"2:1 ,3:cat,", None, [], "argc", id="argc-trailing-space"),
    pytest.param(b"3:1_0,", None, [], "argc", id="argc-underscore"),
    pytest.param(b"2:\xd9\xa1,3:cat,", None, [], "argc", id="argc-arabic-indic-digit"),
    pytest.param(b"3:\xef\xbc\x91,3:cat,", None, [], "argc", id="argc-fullwidth-digit"),
    pytest.param(b"1:4,", SMALL, [], "limit of 3 arguments", id="argc-over-max-args"),
    pytest.param(b"5:10001,", None, [], "limit of 10000 arguments", id="argc-over-default"),
    pytest.param(b"20:" + b"9" * 20 + b",", None, [], "argc", id="argc-20-digits"),
    pytest.param(b"5000:" + b"1" * 5000 + b",", None, [], "argc", id="argc-5000-digits"),
    pytest.param(b"01:1,3:cat,", None, [], "leading zero", id="netstring-leading-zero"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", None, [], "invalid character", id="http"),
    pytest.param(b"1:2,3:cat,3:a\0b,", None, [], "NUL", id="nul-in-argument"),
    pytest.param(b"1:1,1:\0,", None, [], "NUL", id="nul-argument"),
    pytest.param(b"1:2,6:abcdef,6:ghijkl,", SMALL, [], "argv exceeds", id="argv-bytes"),
    pytest.param(b"1:1,13:abcdefghijklm,", SMALL, [], "argv exceeds", id="argv-one-big-arg"),
    pytest.param(b"1:1,17:abcdefghijklmnopq,", SMALL, [], "limit of 16", id="argv-frame-too-long"),
    pytest.param(b"17:", SMALL, [], "limit of 16", id="argc-frame-too-long"),
    pytest.param(
        b"1:1,3:cat,17:", SMALL, [ArgvReady((b"cat",))], "limit of 16", id="stdin-frame-too-long"
    ),
    pytest.param(b"2:1", None, [], "ended", id="eof-in-argc"),
    pytest.param(b"1:2,5:uname,", None, [], "argv was complete", id="eof-missing-arg"),
    pytest.param(b"1:2,5:uname,2:-", None, [], "ended", id="eof-in-arg"),
    pytest.param(b"1:1", None, [], "ended", id="eof-in-argc-frame"),
    pytest.param(b"1:1,", None, [], "argv was complete", id="eof-after-argc"),
    pytest.param(
        b"1:1,3:cat,5:hel",
        None,
        [ArgvReady((b"cat",)), StdinData(b"hel")],
        "ended",
        id="eof-in-stdin-frame",
    ),
    pytest.param(
        b"1:1,3:cat,5:hello",
        None,
        [ArgvReady((b"cat",)), StdinData(b"hello")],
        "ended",
        id="eof-before-stdin-comma",
    ),
    pytest.param(b"1:1,3:cat,0:", None, [ArgvReady((b"cat",))], "ended", id="eof-in-close-frame"),
    pytest.param(
        b"1:1,3:cat,0:,x",
        None,
        [ArgvReady((b"cat",)), StdinClosed()],
        "after stdin was closed",
        id="byte-after-close",
    ),
    pytest.param(
        b"1:1,3:cat,0:,1:a,",
        None,
        [ArgvReady((b"cat",)), StdinClosed()],
        "after stdin was closed",
        id="frame-after-close",
    ),
    pytest.param(
        b"1:1,3:cat,0:,0:,0:,1:a,",
        None,
        [ArgvReady((b"cat",)), StdinClosed()],
        "after stdin was closed",
        id="frame-after-repeated-closes",
    ),
    pytest.param(
        b"1:1,3:cat,0:,0:x",
        None,
        [ArgvReady((b"cat",)), StdinClosed()],
        "after stdin was closed",
        id="broken-second-close",
    ),
    pytest.param(
        b"1:1,3:cat,2:hi,01:a,",
        None,
        [ArgvReady((b"cat",)), StdinData(b"hi")],
        "leading zero",
        id="stdin-leading-zero",
    ),
    pytest.param(
        b"1:1,3:cat,2:hi,0:x",
        None,
        [ArgvReady((b"cat",)), StdinData(b"hi")],
        "terminated",
        id="close-frame-missing-comma",
    ),
]


@pytest.mark.parametrize("how", ["whole", "bytewise"])
@pytest.mark.parametrize(("stream", "limits", "before", "message"), SERVER_ERRORS)
def test_server_refuses(
    stream: bytes,
    limits: ServerLimits | None,
    before: list[ServerEvent],
    message: str,
    how: str,
) -> None:
    pieces = [stream] if how == "whole" else bytewise(stream)
    run = run_server(pieces, limits=limits)
    assert run.error is not None, f"accepted: {run.events}"
    assert type(run.error) is RemoteProtocolError
    assert run.error.args[0].count("\n") == 0
    assert run.merged() == before
    assert re.search(message, str(run.error)), str(run.error)


@given(data=st.data(), payload=st.binary(min_size=1, max_size=50), bad=st.integers(0, 255))
def test_stdin_frame_with_wrong_terminator(data: st.DataObject, payload: bytes, bad: int) -> None:
    """Streamed stdin may already have been handed out when the bad terminator
    arrives: what was delivered is a prefix of the payload, then the error."""
    if bad == ord(","):
        bad = ord(";")
    stream = b"1:1,3:cat," + encode(payload)[:-1] + bytes([bad])
    run = run_server(data.draw(chunkings(stream)))
    assert run.error is not None
    assert "terminated" in str(run.error)
    assert run.events[0] == ArgvReady((b"cat",))
    assert all(isinstance(e, StdinData) for e in run.events[1:])
    assert payload.startswith(run.stdin)


@pytest.mark.parametrize(
    ("argv", "limits"),
    [
        ((b"abcd", b"efgh"), ServerLimits(max_argv_bytes=10)),  # 4+1 + 4+1 = 10
        ((b"a", b"b", b"c"), ServerLimits(max_args=3)),
        ((b"x" * 16,), ServerLimits(max_frame=16)),
        ((b"",), ServerLimits()),  # an empty argument is still an argument
        ((b"-a", b"", b"\xff\xfe"), ServerLimits()),
    ],
)
def test_server_accepts_within_limits(argv: tuple[bytes, ...], limits: ServerLimits) -> None:
    run = run_server([encode_request(argv) + b"0:,"], limits=limits)
    assert run.error is None
    assert run.events == [ArgvReady(argv), StdinClosed(), InputEnded()]


@given(
    argv=st.lists(st.binary(max_size=20).filter(lambda a: b"\0" not in a), min_size=1, max_size=5),
    budget=st.integers(0, 120),
)
def test_argv_bytes_limit(argv: list[bytes], budget: int) -> None:
    """Refused when the arguments alone exceed the budget; accepted when even the
    arguments with a NUL terminator each (as execve counts them) fit."""
    run = run_server([encode_request(argv) + b"0:,"], limits=ServerLimits(max_argv_bytes=budget))
    if sum(map(len, argv)) > budget:
        assert run.error is not None
        assert "argv exceeds" in str(run.error)
    if sum(len(a) + 1 for a in argv) <= budget:
        assert run.error is None
        assert run.events[0] == ArgvReady(tuple(argv))


def test_end_of_input_before_any_byte() -> None:
    run = run_server([])
    assert run.error is None
    assert run.events == [InputEnded()]


@pytest.mark.parametrize(
    ("stream", "stdin"),
    [(b"1:1,3:cat,", b""), (b"1:1,3:cat,5:hello,", b"hello"), (b"1:1,3:cat,1:a,1:b,", b"ab")],
)
@given(data=st.data())
def test_half_close_in_stdin_phase(data: st.DataObject, stream: bytes, stdin: bytes) -> None:
    """End of input at a frame boundary after argv closes stdin (socat's half-close)."""
    run = run_server(data.draw(chunkings(stream)))
    assert run.error is None
    expected: list[ServerEvent] = [ArgvReady((b"cat",))]
    if stdin:
        expected.append(StdinData(stdin))
    assert run.merged() == [*expected, StdinClosed(), InputEnded()]


def test_receive_after_end_of_input_is_local_error() -> None:
    session = ServerSession()
    session.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        session.receive_data(b"1:1,")


# -- server: stateful -------------------------------------------------------------

argv_items = st.binary(max_size=12).filter(lambda a: b"\0" not in a)
# Neither a netstring's first byte nor the terminate request (``!``).
garbage_bytes = st.binary(min_size=1, max_size=12).filter(
    lambda b: b[0] not in DIGITS and b[:1] != TERMINATE
)


class ServerSessionMachine(RuleBasedStateMachine):
    """Queues a byte stream (the request frame by frame, stdin frames, close, garbage,
    bad request frames), feeds it to a ServerSession in arbitrary pieces, and after
    every step checks the events against what the bytes fed so far must produce.

    Model: ``pending`` is everything queued, ``fed`` how much of it was fed.
    ``error_at`` is the offset of the byte whose arrival must raise: the first byte of
    garbage or of anything after ``0:,``, the last byte of a well-formed but invalid
    request frame. Stdin payloads are streamed, so the stdin delivered is exactly
    the payload bytes fed so far.
    """

    def __init__(self) -> None:
        super().__init__()
        self.session = ServerSession()
        self.pending = bytearray()
        self.fed = 0
        self.eof = False
        self.events: list[ServerEvent] = []
        self.error: RemoteProtocolError | None = None
        self.argv: tuple[bytes, ...] = ()
        self.request_frames: list[bytes] = []  # still to queue
        self.request_end: int | None = None  # set once the whole request is queued, valid
        self.stdin_spans: list[tuple[int, int]] = []  # payload [start, end) in the stream
        self.boundaries: set[int] = {0}  # where end of input is clean
        self.frame_ends: list[int] = []  # every frame end, inside the request too
        self.close_end: int | None = None
        self.terminate_end: int | None = None
        self.error_at: int | None = None

    @initialize(
        argv=st.lists(argv_items, min_size=1, max_size=4),
        queued=st.integers(0, 5),
        stdin=st.lists(st.binary(min_size=1, max_size=40), max_size=3),
    )
    def choose_argv(self, argv: list[bytes], queued: int, stdin: list[bytes]) -> None:
        """Pick the argv; queue the first ``queued`` frames of the request (and some
        stdin, if that is all of it)."""
        self.argv = tuple(argv)
        self.request_frames = [b"%d" % len(argv), *argv]
        assert b"".join(map(encode, self.request_frames)) == encode_request(argv)
        for _ in range(min(queued, len(self.request_frames))):
            self.queue_request_frame()
        if not self.request_frames:
            for chunk in stdin:
                self.queue_stdin(chunk)

    @precondition(lambda self: not self.eof and self.request_frames)
    @rule()
    def queue_request_frame(self) -> None:
        self.pending += encode(self.request_frames.pop(0))
        self.frame_ends.append(len(self.pending))
        if not self.request_frames and self.error_at is None:
            self.request_end = len(self.pending)
            self.boundaries.add(self.request_end)

    @precondition(lambda self: not self.eof and self.request_frames and self.error_at is None)
    @rule(bad_argc=st.sampled_from([b"0", b"01", b"+1", b"-1", b" 1", b"x", b"", b"10001"]))
    def queue_bad_request_frame(self, bad_argc: bytes) -> None:
        """A well-formed netstring that is not a valid argc (or argument) here."""
        at_argc = len(self.request_frames) == len(self.argv) + 1
        self.pending += encode(bad_argc if at_argc else b"a\0b")
        self.frame_ends.append(len(self.pending))
        self.error_at = len(self.pending) - 1  # refused when the frame is complete

    def _queue_frame(self, payload: bytes) -> None:
        start = len(self.pending) + len(b"%d:" % len(payload))
        # After 0:, only more 0:, may come (ignored); after ! nothing.
        repeated_close = not payload and self.close_end is not None
        ended = self.close_end is not None or self.terminate_end is not None
        tolerated = repeated_close and self.terminate_end is None
        if ended and not tolerated and self.error_at is None:
            self.error_at = len(self.pending)
        self.pending += encode(payload)
        self.frame_ends.append(len(self.pending))
        if self.error_at is None:
            self.boundaries.add(len(self.pending))
            if payload:
                self.stdin_spans.append((start, start + len(payload)))
            elif self.close_end is None:
                self.close_end = len(self.pending)

    @precondition(lambda self: not self.eof and not self.request_frames)
    @rule(data=st.binary(min_size=1, max_size=300))
    def queue_stdin(self, data: bytes) -> None:
        self._queue_frame(data)

    @precondition(lambda self: not self.eof and not self.request_frames)
    @rule()
    def queue_close(self) -> None:
        self._queue_frame(b"")

    @precondition(
        lambda self: (
            not self.eof
            and not self.request_frames
            and self.error_at is None
            and self.terminate_end is None
        )
    )
    @rule()
    def queue_terminate(self) -> None:
        """``!`` between frames after the argv: the client asks for termination."""
        self.pending += TERMINATE
        self.terminate_end = len(self.pending)
        self.frame_ends.append(self.terminate_end)
        self.boundaries.add(self.terminate_end)

    @precondition(lambda self: not self.eof and self.error_at is None)
    @rule(garbage=garbage_bytes)
    def queue_garbage(self, garbage: bytes) -> None:
        if self.error_at is None:
            self.error_at = len(self.pending)
        self.pending += garbage

    @precondition(lambda self: not self.eof)
    @rule()
    def feed_byte(self) -> None:
        self._feed(bytes(self.pending[self.fed : self.fed + 1]))

    @precondition(lambda self: not self.eof)
    @rule(size=st.integers(1, 20))
    def feed_piece(self, size: int) -> None:
        self._feed(bytes(self.pending[self.fed : self.fed + size]))

    def _next_frame_end(self) -> int:
        return next((e for e in self.frame_ends if e > self.fed), len(self.pending))

    @precondition(lambda self: not self.eof)
    @rule()
    def feed_to_frame_end(self) -> None:
        """What most clients do: whole frames, up to the next one's end."""
        self._feed(bytes(self.pending[self.fed : self._next_frame_end()]))

    @precondition(lambda self: not self.eof)
    @rule(offset=st.integers(0, 1000))
    def feed_into_frame(self, offset: int) -> None:
        """Stop somewhere strictly inside the next frame (header or payload)."""
        inside = self._next_frame_end() - self.fed - 1
        self._feed(bytes(self.pending[self.fed : self.fed + 1 + offset % max(inside, 1)]))

    @precondition(lambda self: not self.eof)
    @rule()
    def feed_rest(self) -> None:
        self._feed(bytes(self.pending[self.fed :]))

    @precondition(lambda self: not self.eof)
    @rule()
    def shutdown_write(self) -> None:
        """The client half-closes (or disconnects): end of input."""
        self.eof = True
        self._feed(b"")

    @rule(times=st.integers(1, 3))
    def pull_again(self, times: int) -> None:
        """Pulling without feeding yields nothing new (or the same error again)."""
        count = len(self.events)
        for _ in range(times):
            self._drain()
        assert len(self.events) == count

    def _feed(self, data: bytes) -> None:
        if not data and not self.eof:
            return  # nothing queued to send (b"" would mean end of input)
        self.session.receive_data(data)
        self.fed += len(data)
        self._drain()

    def _drain(self) -> None:
        if self.error is not None:
            with pytest.raises(RemoteProtocolError) as again:
                self.session.next_event()
            assert again.value is self.error
            return
        try:
            while (event := self.session.next_event()) is not NEED_DATA:
                self.events.append(event)  # type: ignore[arg-type]
        except RemoteProtocolError as error:
            self.error = error

    # -- invariants --

    @invariant()
    def events_in_documented_order(self) -> None:
        kinds = [type(e) for e in self.events]
        if kinds and kinds[0] is not InputEnded:
            assert kinds[0] is ArgvReady
        assert kinds.count(ArgvReady) <= 1
        assert kinds.count(StdinClosed) <= 1
        assert kinds.count(TerminateRequested) <= 1
        if TerminateRequested in kinds:
            after = kinds[kinds.index(TerminateRequested) + 1 :]
            assert after in ([], [InputEnded])
        assert kinds.count(InputEnded) <= 1
        if InputEnded in kinds:
            assert kinds[-1] is InputEnded
            assert self.error is None
        if StdinClosed in kinds:
            assert StdinData not in kinds[kinds.index(StdinClosed) :]
        for event in self.events:
            if isinstance(event, ArgvReady):
                assert event.argv == self.argv
            if isinstance(event, StdinData):
                assert event.data

    @invariant()
    def events_match_the_bytes_fed(self) -> None:
        fed = self.fed
        error_expected = False
        if self.error_at is not None and fed > self.error_at:
            error_expected = True
            fed = self.error_at  # what came before the first bad byte
        elif self.eof and fed not in self.boundaries:
            error_expected = True  # end of input inside a frame or inside the argv
        assert (self.error is not None) == error_expected, (self.error, self.fed)
        argv_ready = self.request_end is not None and fed >= self.request_end
        assert (ArgvReady(self.argv) in self.events) == argv_ready
        stdin = b"".join(
            bytes(self.pending[a : min(b, fed)]) for a, b in self.stdin_spans if fed >= a
        )
        assert b"".join(e.data for e in self.events if isinstance(e, StdinData)) == stdin
        terminated = self.terminate_end is not None and fed >= self.terminate_end
        assert (TerminateRequested() in self.events) == terminated
        closed = (self.close_end is not None and fed >= self.close_end) or (
            self.eof and not error_expected and argv_ready and not terminated
        )
        assert (StdinClosed() in self.events) == closed
        assert (InputEnded() in self.events) == (self.eof and not error_expected)


ServerSessionMachine.TestCase.settings = settings(
    max_examples=250, stateful_step_count=30, deadline=None
)
TestServerSessionMachine = ServerSessionMachine.TestCase


# -- client ---------------------------------------------------------------------------

outputs = st.lists(
    st.tuples(st.sampled_from(["stdout", "stderr", "unknown"]), st.binary(max_size=200)),
    max_size=6,
)
exits = st.one_of(
    st.integers(0, 255).map(lambda code: Exited(exitcode=code)),
    st.sampled_from(["TERM", "KILL", "SEGV", "HUP", "9", "15"]).map(lambda s: Exited(termsig=s)),
)


def encode_reply(pairs: list[tuple[str, bytes]], exited: Exited) -> bytes:
    out = bytearray()
    for kind, data in pairs:
        if kind == "unknown":
            out += encode(b"unknown") + encode(data)
        else:
            out += b"".join(encode_output_pair(kind, data))  # type: ignore[arg-type]
    if exited.exitcode is not None:
        out += encode_exit_pair(exitcode=exited.exitcode)
    else:
        assert exited.termsig is not None
        out += encode_exit_pair(termsig=exited.termsig.encode())
    return bytes(out)


@given(data=st.data(), pairs=outputs, exited=exits)
def test_client_parses_pairs_any_chunking(
    data: st.DataObject, pairs: list[tuple[str, bytes]], exited: Exited
) -> None:
    stream = encode_reply(pairs, exited)
    events, error = run_client(data.draw(chunkings(stream)))
    assert error is None
    expected = [Output(kind, payload) for kind, payload in pairs if kind != "unknown"]  # type: ignore[arg-type]
    assert events == [*expected, exited]


def test_client_literal_reply() -> None:
    stream = b"6:stdout,6:Linux\n,6:stderr,4:oops,7:unknown,3:xyz,8:exitcode,1:0,"
    events, error = run_client([stream])
    assert error is None
    assert events == [Output("stdout", b"Linux\n"), Output("stderr", b"oops"), Exited(exitcode=0)]
    events, error = run_client([b"7:termsig,4:TERM,"])
    assert (events, error) == ([Exited(termsig="TERM")], None)


def test_client_done_and_silent_close_after_exit() -> None:
    session = ClientSession()
    session.receive_data(b"8:exitcode,2:")
    assert session.next_event() is NEED_DATA
    assert not session.done
    session.receive_data(b"42,")
    assert session.next_event() == Exited(exitcode=42)
    assert session.done
    session.receive_data(b"")
    assert session.next_event() is NEED_DATA


CLIENT_ERRORS = [
    pytest.param(b"3:foo,1:x,8:exitcode,1:0,", [], "unknown frame type", id="unknown-type"),
    pytest.param(b"6:STDOUT,1:x,", [], "unknown frame type", id="upper-case-type"),
    pytest.param(b"", [], "closed before the exit status", id="eof-at-once"),
    pytest.param(
        b"6:stdout,2:hi,", [Output("stdout", b"hi")], "closed before", id="eof-after-output"
    ),
    pytest.param(b"6:stdout,", [], "closed before", id="eof-after-type"),
    pytest.param(b"6:stdout,5:hi", [], "ended", id="eof-mid-frame"),
    pytest.param(b"8:exitcode,1:0,x", [Exited(exitcode=0)], "after the exit", id="byte-after"),
    pytest.param(
        b"8:exitcode,1:0,6:stdout,1:x,", [Exited(exitcode=0)], "after the exit", id="pair-after"
    ),
    pytest.param(b"8:exitcode,2:-1,", [], "exitcode", id="exitcode-negative"),
    pytest.param(b"8:exitcode,2:01,", [], "exitcode", id="exitcode-leading-zero"),
    pytest.param(b"8:exitcode,0:,", [], "exitcode", id="exitcode-empty"),
    pytest.param(b"8:exitcode,2: 1,", [], "exitcode", id="exitcode-space"),
    pytest.param(b"8:exitcode,3:1.0,", [], "exitcode", id="exitcode-float"),
    pytest.param(b"8:exitcode,4:TERM,", [], "exitcode", id="exitcode-name"),
    pytest.param(b"8:exitcode,2:\xd9\xa1,", [], "exitcode", id="exitcode-arabic-digit"),
    pytest.param(b"8:exitcode,5000:" + b"1" * 5000 + b",", [], "exitcode", id="exitcode-huge"),
    pytest.param(b"7:termsig,2:\xff\xfe,", [], "termsig", id="termsig-not-ascii"),
    pytest.param(b"06:stdout,", [], "leading zero", id="malformed-netstring"),
]


@pytest.mark.parametrize("how", ["whole", "bytewise"])
@pytest.mark.parametrize(("stream", "before", "message"), CLIENT_ERRORS)
def test_client_refuses(stream: bytes, before: list[ClientEvent], message: str, how: str) -> None:
    events, error = run_client([stream] if how == "whole" else bytewise(stream))
    assert isinstance(error, RemoteProtocolError), events
    assert merge_outputs(events) == before
    assert message in str(error)


def test_client_oversized_frame_refused() -> None:
    session = ClientSession(max_frame=10)
    session.receive_data(b"6:stdout,11:")
    with pytest.raises(RemoteProtocolError, match="limit"):
        session.next_event()


# -- encode_request round trip ------------------------------------------------------

request_args = st.one_of(
    st.binary(max_size=30).filter(lambda a: b"\0" not in a),
    st.text(max_size=10).filter(lambda a: "\0" not in a),
)


@settings(max_examples=150)
@given(
    data=st.data(),
    argv=st.lists(request_args, min_size=1, max_size=6),
    stdin=st.lists(st.binary(max_size=100), max_size=5),
    close=st.booleans(),
)
def test_encode_request_round_trip(
    data: st.DataObject, argv: list[bytes | str], stdin: list[bytes], close: bool
) -> None:
    stream = encode_request(argv, stdin) + (b"0:," if close else b"")
    run = run_server(data.draw(chunkings(stream)))
    assert run.error is None
    argv_bytes = tuple(a.encode() if isinstance(a, str) else a for a in argv)
    expected: list[ServerEvent] = [ArgvReady(argv_bytes)]
    if b"".join(stdin):
        expected.append(StdinData(b"".join(stdin)))
    assert run.merged() == [*expected, StdinClosed(), InputEnded()]


def test_encode_request_skips_empty_stdin_chunks() -> None:
    """An empty chunk would be ``0:,`` and close stdin early."""
    stream = encode_request([b"cat"], [b"", b"a", b""])
    assert stream == b"1:1,3:cat,1:a,"
    run = run_server([stream], eof=False)
    assert run.events == [ArgvReady((b"cat",)), StdinData(b"a")]


def test_encode_request_refuses_bad_argv() -> None:
    with pytest.raises(LocalProtocolError):
        encode_request([])
    with pytest.raises(LocalProtocolError):
        encode_request([b"a\0b"])
    with pytest.raises(LocalProtocolError):
        encode_request(["cat", "x\0"])


def test_argument_longer_than_the_argv_budget_is_refused_on_its_digits() -> None:
    """An argument is buffered whole, so its length is checked against what is left of
    the argv budget before any payload byte is held (SPEC §7: memory is a constant
    plus the argv)."""
    session = ServerSession(ServerLimits(max_frame=64 << 20, max_argv_bytes=1000))
    session.receive_data(b"1:2,3:cat,")
    assert session.next_event() is NEED_DATA
    session.receive_data(b"997:")  # 4 bytes used by "cat\0": 996 left
    with pytest.raises(RemoteProtocolError, match="argv exceeds the limit of 1000 bytes"):
        session.next_event()


def test_terminate_request_is_the_last_thing_the_client_sends() -> None:
    session = ServerSession()
    session.receive_data(encode_request(["sleep", "9"]) + b"5:hello,!")
    assert session.next_event() == ArgvReady((b"sleep", b"9"))
    assert session.next_event() == StdinData(b"hello")
    assert session.next_event() == TerminateRequested()
    assert session.next_event() is NEED_DATA
    session.receive_data(b"")
    assert session.next_event() == InputEnded()
    after = ServerSession()
    after.receive_data(encode_request(["cat"]) + b"0:,!1:x,")
    assert [after.next_event() for _ in range(3)] == [
        ArgvReady((b"cat",)),
        StdinClosed(),
        TerminateRequested(),
    ]
    with pytest.raises(RemoteProtocolError, match="after the request to terminate"):
        after.next_event()


def test_an_exclamation_mark_inside_stdin_is_stdin() -> None:
    session = ServerSession()
    session.receive_data(encode_request(["cat"]) + b"3:!!!,!")
    assert session.next_event() == ArgvReady((b"cat",))
    assert session.next_event() == StdinData(b"!!!")
    assert session.next_event() == TerminateRequested()


def test_before_the_argv_it_is_a_protocol_error() -> None:
    session = ServerSession()
    session.receive_data(b"1:1,!")
    with pytest.raises(RemoteProtocolError, match="invalid character"):
        session.next_event()


def test_repeated_closes_are_ignored() -> None:
    """lua-resty-exec sends ``0:,`` twice for an empty stdin; the C takes it."""
    session = ServerSession()
    session.receive_data(encode_request(["cat"]) + b"3:abc,0:,0:")
    assert [session.next_event() for _ in range(3)] == [
        ArgvReady((b"cat",)),
        StdinData(b"abc"),
        StdinClosed(),
    ]
    assert session.next_event() is NEED_DATA  # half of a second 0:,
    session.receive_data(b",0:,")
    assert session.next_event() is NEED_DATA
    session.receive_data(b"")
    assert session.next_event() == InputEnded()
