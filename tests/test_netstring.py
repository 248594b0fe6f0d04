"""Tests of the strict incremental netstring codec (sockexec_py.netstring).

Every input is fed whole, one byte at a time and split at arbitrary points
(hypothesis); the PyPI package ``python-netstring`` is an independent oracle for
valid input.
"""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Callable, Iterator

import netstring as oracle  # type: ignore[import-untyped]
import pytest
from chunking import chunkings, split
from hypothesis import given, settings
from hypothesis import strategies as st

from sockexec_py.errors import LocalProtocolError, RemoteProtocolError
from sockexec_py.netstring import END, NEED_DATA, Chunk, Decoder, encode, encode_parts

MIB = 1 << 20
DIGITS = b"0123456789"

# -- helpers ------------------------------------------------------------------------


payload_lists = st.lists(st.binary(max_size=300), max_size=8)


def drain_frames(decoder: Decoder) -> Iterator[bytes]:
    while True:
        frame = decoder.next_frame()
        if frame is NEED_DATA or frame is END:
            return
        assert isinstance(frame, bytes)
        yield frame


def decode_whole(pieces: list[bytes], max_length: int = MIB) -> list[bytes]:
    """Decode with next_frame, draining after every piece, then at end of input."""
    decoder = Decoder(max_length)
    frames: list[bytes] = []
    for piece in pieces:
        decoder.feed(piece)
        frames.extend(drain_frames(decoder))
    decoder.feed(b"")
    frames.extend(drain_frames(decoder))
    assert decoder.next_frame() is END
    assert decoder.buffered == 0
    return frames


class ChunkCollector:
    """Reassembles next_chunk output into frames, checking each Chunk's invariants."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.current = bytearray()
        self.length: int | None = None

    def add(self, chunk: Chunk) -> None:
        if self.length is None:
            self.length = chunk.frame_length
        # Every chunk of a frame carries the same announced length.
        assert chunk.frame_length == self.length
        # Only the final chunk may be empty: otherwise a caller's loop would spin.
        assert chunk.data or chunk.end
        self.current += chunk.data
        assert len(self.current) <= self.length
        if chunk.end:
            assert len(self.current) == self.length
            self.frames.append(bytes(self.current))
            self.current.clear()
            self.length = None

    def drain(self, decoder: Decoder) -> None:
        while True:
            chunk = decoder.next_chunk()
            if chunk is NEED_DATA or chunk is END:
                return
            assert isinstance(chunk, Chunk)
            self.add(chunk)


def decode_streaming(pieces: list[bytes], max_length: int = MIB) -> list[bytes]:
    """Decode with next_chunk, draining after every piece, then at end of input."""
    decoder = Decoder(max_length)
    collector = ChunkCollector()
    for piece in pieces:
        decoder.feed(piece)
        collector.drain(decoder)
    decoder.feed(b"")
    collector.drain(decoder)
    assert decoder.next_chunk() is END
    assert collector.length is None
    return collector.frames


DECODERS: list[Callable[[list[bytes]], list[bytes]]] = [decode_whole, decode_streaming]


def next_any(decoder: Decoder, streaming: bool) -> object:
    return decoder.next_chunk() if streaming else decoder.next_frame()


def drain_any(decoder: Decoder, streaming: bool) -> None:
    """Pull until NEED_DATA/END; raises what the decoder raises."""
    while True:
        result = next_any(decoder, streaming)
        if result is NEED_DATA or result is END:
            return


# -- encoding -------------------------------------------------------------------------


def test_encode_examples() -> None:
    assert encode(b"") == b"0:,"
    assert encode(b"hello") == b"5:hello,"
    assert encode(b"a,b:c") == b"5:a,b:c,"
    assert encode(b"x" * 10) == b"10:" + b"x" * 10 + b","
    assert encode_parts(b"hello") == (b"5:", b"hello", b",")


@given(st.binary(max_size=2000))
def test_encode_parts_join_to_encode(payload: bytes) -> None:
    header, body, comma = encode_parts(payload)
    assert body is payload  # no copy: the caller can sendmsg the three buffers
    assert header + body + comma == encode(payload)


# -- round trips under every chunking --------------------------------------------------


@pytest.mark.parametrize("decode", DECODERS, ids=["next_frame", "next_chunk"])
@given(data=st.data(), payloads=payload_lists)
def test_round_trip_any_chunking(
    decode: Callable[[list[bytes]], list[bytes]], data: st.DataObject, payloads: list[bytes]
) -> None:
    stream = b"".join(map(encode, payloads))
    pieces = data.draw(chunkings(stream))
    assert decode(pieces) == payloads


@pytest.mark.parametrize("decode", DECODERS, ids=["next_frame", "next_chunk"])
def test_round_trip_bytewise_and_whole(decode: Callable[[list[bytes]], list[bytes]]) -> None:
    payloads = [b"", b"a", b"hello", b"0:,", b",", b":" * 12, bytes(range(256)), b""]
    stream = b"".join(map(encode, payloads))
    assert decode([stream]) == payloads
    assert decode([stream[i : i + 1] for i in range(len(stream))]) == payloads
    assert decode([]) == []


@given(data=st.data(), payloads=st.lists(st.binary(max_size=200), min_size=1, max_size=8))
def test_streaming_delivers_payload_as_soon_as_fed(
    data: st.DataObject, payloads: list[bytes]
) -> None:
    """next_chunk hands out every payload byte that has been fed, without waiting for
    the rest of the frame, and ``end`` comes once, with the terminating comma."""
    stream = b"".join(map(encode, payloads))
    # Where each frame's payload lies in the stream.
    spans = []
    offset = 0
    for payload in payloads:
        start = offset + len(b"%d:" % len(payload))
        spans.append((start, start + len(payload)))
        offset = start + len(payload) + 1
    decoder = Decoder(MIB)
    collector = ChunkCollector()
    fed = 0
    ends = 0
    for piece in data.draw(chunkings(stream)):
        decoder.feed(piece)
        fed += len(piece)
        while True:
            chunk = decoder.next_chunk()
            if chunk is NEED_DATA:
                break
            assert isinstance(chunk, Chunk)
            ends += chunk.end
            collector.add(chunk)
        expected = b"".join(stream[start : min(end, fed)] for start, end in spans if fed >= start)
        delivered = b"".join(collector.frames) + collector.current
        assert delivered == expected
        # A frame is reported ended exactly when its comma has been fed.
        assert ends == sum(1 for _, end in spans if fed > end)
    assert collector.frames == payloads


@given(
    data=st.data(),
    payloads=payload_lists,
    modes=st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_mixed_frame_and_chunk_at_boundaries(
    data: st.DataObject, payloads: list[bytes], modes: list[bool]
) -> None:
    """next_frame and next_chunk may alternate frame by frame."""
    stream = b"".join(map(encode, payloads))
    pieces = iter(data.draw(chunkings(stream)))
    decoder = Decoder(MIB)

    def feed_more() -> None:
        decoder.feed(next(pieces, b""))

    for payload, streaming in zip(payloads, modes, strict=False):
        if streaming:
            collector = ChunkCollector()
            while not collector.frames:
                chunk = decoder.next_chunk()
                if chunk is NEED_DATA:
                    feed_more()
                else:
                    assert isinstance(chunk, Chunk)
                    collector.add(chunk)
            assert collector.frames == [payload]
        else:
            while (frame := decoder.next_frame()) is NEED_DATA:
                feed_more()
            assert frame == payload
    for piece in pieces:
        decoder.feed(piece)
    decoder.feed(b"")
    assert decoder.next_frame() is END
    assert decoder.next_chunk() is END


def test_next_frame_inside_a_streamed_frame_is_local_error() -> None:
    decoder = Decoder(100)
    decoder.feed(b"5:he")
    chunk = decoder.next_chunk()
    assert chunk == Chunk(b"he", 5, False)
    with pytest.raises(LocalProtocolError):
        decoder.next_frame()
    # Misuse is not the peer's fault: the stream stays usable.
    decoder.feed(b"llo,")
    assert decoder.next_chunk() == Chunk(b"llo", 5, True)
    assert decoder.next_frame() is NEED_DATA  # at a frame boundary again


def test_empty_frame_streams_as_one_empty_end_chunk() -> None:
    decoder = Decoder(10)
    decoder.feed(b"0:")
    assert decoder.next_chunk() is NEED_DATA
    decoder.feed(b",")
    assert decoder.next_chunk() == Chunk(b"", 0, True)
    assert decoder.next_chunk() is NEED_DATA


def test_comma_arriving_late_gives_an_empty_end_chunk() -> None:
    decoder = Decoder(10)
    decoder.feed(b"3:abc")
    assert decoder.next_chunk() == Chunk(b"abc", 3, False)
    assert decoder.next_chunk() is NEED_DATA
    decoder.feed(b",")
    assert decoder.next_chunk() == Chunk(b"", 3, True)


# -- malformed lengths -----------------------------------------------------------------

ARABIC_ONE = "\u0661".encode()  # ARABIC-INDIC DIGIT ONE, 2 bytes in UTF-8
FULLWIDTH_ONE = "\uff11".encode()  # FULLWIDTH DIGIT ONE, 3 bytes in UTF-8

# (stream, index of the first byte that makes it invalid)
MALFORMED = [
    pytest.param(b"01:a,", 1, id="leading-zero"),
    pytest.param(b"00:,", 1, id="double-zero"),
    pytest.param(b"0001:a,", 1, id="many-zeros"),
    pytest.param(b"+1:a,", 0, id="plus-sign"),
    pytest.param(b"-1:a,", 0, id="minus-sign"),
    pytest.param(b"-0:,", 0, id="minus-zero"),
    pytest.param(b" 1:a,", 0, id="leading-space"),
    pytest.param(b"1 :a,", 1, id="trailing-space"),
    pytest.param(b"\t1:a,", 0, id="tab"),
    pytest.param(b"1\n:a,", 1, id="newline"),
    pytest.param(b"1_0:aaaaaaaaaa,", 1, id="underscore"),
    pytest.param(b":,", 0, id="empty-length"),
    pytest.param(b",", 0, id="bare-comma"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0, id="http"),
    pytest.param(b"1:ab", 3, id="missing-comma"),
    pytest.param(b"3:abc;", 5, id="wrong-terminator"),
    pytest.param(b"0:x", 2, id="empty-frame-no-comma"),
    pytest.param(b"1:a,,", 4, id="comma-after-frame"),
    pytest.param(b"1:a,01:b,", 5, id="leading-zero-second-frame"),
    pytest.param(b"2:ab,x", 5, id="garbage-after-frame"),
    pytest.param(ARABIC_ONE + b":a,", 0, id="arabic-indic-digit"),
    pytest.param(b"1" + ARABIC_ONE + b":a,", 1, id="arabic-indic-second-digit"),
    pytest.param(FULLWIDTH_ONE + b":a,", 0, id="fullwidth-digit"),
    pytest.param(b"1" + FULLWIDTH_ONE + b":" + b"a" * 11 + b",", 1, id="fullwidth-second"),
    pytest.param(b"\xb9:a,", 0, id="latin1-superscript-one"),
    pytest.param(b"1e1:aaaaaaaaaa,", 1, id="exponent"),
    pytest.param(b"0x1:a,", 1, id="hex"),
]


@pytest.mark.parametrize("streaming", [False, True], ids=["next_frame", "next_chunk"])
@pytest.mark.parametrize(("stream", "bad_index"), MALFORMED)
def test_malformed_rejected_at_the_offending_byte(
    stream: bytes, bad_index: int, streaming: bool
) -> None:
    decoder = Decoder(MIB)
    for index in range(len(stream)):
        decoder.feed(stream[index : index + 1])
        if index < bad_index:
            drain_any(decoder, streaming)  # must not raise before the bad byte
            continue
        with pytest.raises(RemoteProtocolError) as first:
            drain_any(decoder, streaming)
        break
    else:
        pytest.fail("the malformed stream was accepted")
    assert index == bad_index
    # Poisoned: every later call, in either mode, raises the same error again,
    # whatever is fed afterwards, including a clean end of input.
    decoder.feed(b"1:a,")
    for again in (decoder.next_frame, decoder.next_chunk, decoder.next_frame):
        with pytest.raises(RemoteProtocolError) as later:
            again()
        assert later.value is first.value
    decoder.feed(b"")
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()


@pytest.mark.parametrize("streaming", [False, True], ids=["next_frame", "next_chunk"])
@pytest.mark.parametrize(("stream", "bad_index"), MALFORMED)
def test_malformed_rejected_when_fed_whole(stream: bytes, bad_index: int, streaming: bool) -> None:
    decoder = Decoder(MIB)
    decoder.feed(stream)
    with pytest.raises(RemoteProtocolError) as info:
        drain_any(decoder, streaming)
    assert "\n" not in str(info.value)  # one line, fit to send back in-band


bad_headers = st.one_of(
    # Any non-digit where a length must start (sign, space, ':', garbage, UTF-8...).
    st.binary(min_size=1, max_size=20).filter(lambda b: b[0] not in DIGITS).map(lambda b: (b, 0)),
    # A leading zero followed by anything but ':'.
    st.binary(min_size=1, max_size=5)
    .filter(lambda b: b[0] != ord(":"))
    .map(lambda b: (b"0" + b, 1)),
    # Valid digits, then a byte that is neither a digit nor ':'.
    st.tuples(
        st.integers(1, 99999),
        st.integers(0, 255).filter(lambda c: c not in DIGITS and c != ord(":")),
    ).map(lambda t: (b"%d%c" % t, len(str(t[0])))),
    # A well-formed header and payload, then the wrong terminator.
    st.tuples(st.binary(max_size=20), st.integers(0, 255).filter(lambda c: c != ord(","))).map(
        lambda t: (b"%d:%b%c" % (len(t[0]), t[0], t[1]), len(b"%d:" % len(t[0])) + len(t[0]))
    ),
)


@settings(max_examples=100)
@given(data=st.data(), payloads=payload_lists, bad=bad_headers, streaming=st.booleans())
def test_valid_frames_then_garbage(
    data: st.DataObject, payloads: list[bytes], bad: tuple[bytes, int], streaming: bool
) -> None:
    """Valid frames come out, then the error is raised on the first pull after the
    offending byte is fed: not before, not later."""
    tail, tail_bad_index = bad
    prefix = b"".join(map(encode, payloads))
    bad_index = len(prefix) + tail_bad_index
    stream = prefix + tail
    decoder = Decoder(MIB)
    frames: list[bytes] = []
    collector = ChunkCollector()
    fed = 0
    for piece in data.draw(chunkings(stream)):
        decoder.feed(piece)
        fed += len(piece)
        try:
            if streaming:
                collector.drain(decoder)
            else:
                frames.extend(drain_frames(decoder))
        except RemoteProtocolError:
            assert fed > bad_index
            break
        assert fed <= bad_index
    else:
        pytest.fail("garbage accepted")
    assert (collector.frames if streaming else frames) == payloads


# -- limits -------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["next_frame", "next_chunk"])
def test_huge_announced_length_rejected_while_reading_digits(streaming: bool) -> None:
    max_length = MIB
    decoder = Decoder(max_length)
    header = b"99999999999999:"
    for count in range(1, len(header) + 1):
        decoder.feed(header[count - 1 : count])
        try:
            drain_any(decoder, streaming)
        except RemoteProtocolError:
            break
        assert decoder.buffered == count  # only the digits, nothing else buffered
    else:
        pytest.fail("a 14-digit length was accepted")
    assert count <= len(str(max_length)) + 1
    assert decoder.buffered <= len(str(max_length)) + 1


@settings(max_examples=100)
@given(max_length=st.integers(0, 10**12), excess=st.integers(1, 10**15), streaming=st.booleans())
def test_length_over_limit_rejected_at_the_earliest_byte(
    max_length: int, excess: int, streaming: bool
) -> None:
    """The error comes with the first digit after which no valid length can follow."""
    digits = str(max_length + excess).encode()
    earliest = next(i for i in range(len(digits)) if int(digits[: i + 1]) > max_length)
    assert earliest <= len(str(max_length))
    decoder = Decoder(max_length)
    for index in range(len(digits)):
        decoder.feed(digits[index : index + 1])
        if index < earliest:
            assert next_any(decoder, streaming) is NEED_DATA
        else:
            with pytest.raises(RemoteProtocolError, match="limit"):
                next_any(decoder, streaming)
            break


@pytest.mark.parametrize("streaming", [False, True], ids=["next_frame", "next_chunk"])
@pytest.mark.parametrize("max_length", [0, 1, 9, 10, 99, 100, 1000, MIB])
def test_length_exactly_max_accepted_one_more_rejected(max_length: int, streaming: bool) -> None:
    decode = decode_streaming if streaming else decode_whole
    payload = random.Random(max_length).randbytes(max_length)
    assert decode([encode(payload)], max_length) == [payload]
    decoder = Decoder(max_length)
    decoder.feed(encode(payload + b"x"))
    with pytest.raises(RemoteProtocolError, match="limit"):
        next_any(decoder, streaming)


def test_negative_max_length_is_refused() -> None:
    with pytest.raises(ValueError, match="max_length"):
        Decoder(-1)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    length=st.integers(0, 300_000),
    cuts=st.lists(st.integers(1, 300_000), max_size=60),
)
def test_streaming_buffers_no_more_than_the_last_piece(
    seed: int, length: int, cuts: list[int]
) -> None:
    """A large allowed frame streamed in pieces never accumulates in the decoder."""
    max_length = 300_000
    header_max = len(str(max_length)) + 1
    payload = random.Random(seed).randbytes(length)
    decoder = Decoder(max_length)
    collector = ChunkCollector()
    for piece in split(encode(payload) + encode(b"next"), cuts):
        decoder.feed(piece)
        assert decoder.buffered <= len(piece) + header_max
        collector.drain(decoder)
        # What is left is at most an incomplete header.
        assert decoder.buffered <= header_max
    decoder.feed(b"")
    collector.drain(decoder)
    assert collector.frames == [payload, b"next"]


# -- end of input ---------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["next_frame", "next_chunk"])
def test_end_of_input_at_boundary_is_end(streaming: bool) -> None:
    decoder = Decoder(100)
    decoder.feed(b"")
    assert next_any(decoder, streaming) is END
    decoder = Decoder(100)
    decoder.feed(b"1:a,0:,")
    assert next_any(decoder, streaming) is not END
    assert next_any(decoder, streaming) is not END
    assert next_any(decoder, streaming) is NEED_DATA
    assert decoder.buffered == 0
    decoder.feed(b"")
    assert next_any(decoder, streaming) is END
    assert next_any(decoder, streaming) is END  # and stays so


@settings(max_examples=100)
@given(data=st.data(), payloads=st.lists(st.binary(max_size=50), min_size=1, max_size=5))
def test_end_of_input_mid_frame_is_remote_error(data: st.DataObject, payloads: list[bytes]) -> None:
    stream = b"".join(map(encode, payloads))
    boundaries = {0}
    offset = 0
    for payload in payloads:
        offset += len(encode(payload))
        boundaries.add(offset)
    cut = data.draw(st.integers(1, len(stream) - 1).filter(lambda c: c not in boundaries))
    streaming = data.draw(st.booleans())
    decoder = Decoder(MIB)
    for piece in data.draw(chunkings(stream[:cut])):
        decoder.feed(piece)
        drain_any(decoder, streaming)
    decoder.feed(b"")
    with pytest.raises(RemoteProtocolError, match="ended") as first:
        drain_any(decoder, streaming)
    with pytest.raises(RemoteProtocolError) as again:
        next_any(decoder, not streaming)
    assert again.value is first.value


@pytest.mark.parametrize("partial", [b"1", b"12", b"5:", b"5:abc", b"5:abcde", b"1:a,0:"])
@pytest.mark.parametrize("streaming", [False, True], ids=["next_frame", "next_chunk"])
def test_end_of_input_mid_header_or_payload(partial: bytes, streaming: bool) -> None:
    decoder = Decoder(100)
    decoder.feed(partial)
    drain_any(decoder, streaming)
    decoder.feed(b"")
    with pytest.raises(RemoteProtocolError):
        drain_any(decoder, streaming)


def test_feed_after_end_of_input_is_local_error() -> None:
    decoder = Decoder(100)
    decoder.feed(b"1:a,")
    decoder.feed(b"")
    with pytest.raises(LocalProtocolError):
        decoder.feed(b"1:b,")
    with pytest.raises(LocalProtocolError):
        decoder.feed(b"")
    # The data fed before the end is still there.
    assert decoder.next_frame() == b"a"
    assert decoder.next_frame() is END


# -- complexity -----------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("streaming", [False, True], ids=["next_frame", "next_chunk"])
def test_many_tiny_frames_in_one_feed(streaming: bool) -> None:
    count = 100_000
    stream = encode(b"x") * count
    decoder = Decoder(10)
    decoder.feed(stream)
    seen = 0
    while (result := next_any(decoder, streaming)) is not NEED_DATA:
        assert result == (Chunk(b"x", 1, True) if streaming else b"x")
        seen += 1
    assert seen == count
    assert decoder.buffered == 0


@pytest.mark.parametrize("streaming", [False, True], ids=["next_frame", "next_chunk"])
def test_consumed_bytes_are_released(streaming: bool) -> None:
    """Structural check of compaction: every piece ends in the middle of a frame, so a
    partial frame is always left after a drain and the buffer is never simply
    emptied; one that never dropped its consumed prefix would grow with the whole
    stream (1 MB here)."""
    count = 20_000
    stream = encode(b"y" * 46) * count  # 50 bytes a frame
    cuts = range(25, len(stream), 1000)  # 25 + 1000k is never a multiple of 50
    pieces = split(stream, list(cuts))
    decoder = Decoder(100)
    seen = 0
    tracemalloc.start()
    try:
        for piece in pieces:
            decoder.feed(piece)
            while (result := next_any(decoder, streaming)) is not NEED_DATA:
                seen += 1 if isinstance(result, bytes) else isinstance(result, Chunk) and result.end
            assert decoder.buffered < 50  # at most a partial frame
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == count
    assert peak < 256 * 1024


# -- differential tests against python-netstring ----------------------------------------


@given(st.binary(max_size=5000))
def test_encode_agrees_with_oracle(payload: bytes) -> None:
    assert encode(payload) == oracle.encode(payload)
    assert b"".join(encode_parts(payload)) == oracle.encode(payload)


@given(data=st.data(), payloads=payload_lists, streaming=st.booleans())
def test_decoder_reads_what_the_oracle_writes(
    data: st.DataObject, payloads: list[bytes], streaming: bool
) -> None:
    stream = b"".join(map(oracle.encode, payloads))
    pieces = data.draw(chunkings(stream))
    decode = decode_streaming if streaming else decode_whole
    assert decode(pieces) == payloads


@given(st.binary(max_size=5000))
def test_single_frame_decode_agrees_with_oracle(payload: bytes) -> None:
    frame = encode(payload)
    assert decode_whole([frame]) == [oracle.decode(frame)] == [payload]


@given(data=st.data(), payloads=payload_lists)
def test_oracle_connection_reads_what_we_write(data: st.DataObject, payloads: list[bytes]) -> None:
    connection = oracle.Connection()
    received: list[bytes] = []
    for piece in data.draw(chunkings(b"".join(map(encode, payloads)))):
        received.extend(oracle.stream_payload_data(connection, piece))
    assert received == payloads


@pytest.mark.parametrize(
    "frame",
    [b"01:a,", b"00:,", b"+1:a,", b"-0:,", b" 1:a,", b"1 :a,", b"1_0:aaaaaaaaaa,"],
)
def test_oracle_is_lax_where_we_are_strict(frame: bytes) -> None:
    """Evidence of strictness: the oracle's int() parsing accepts signs, spaces,
    underscores and leading zeros that SPEC section 1 calls protocol errors."""
    assert isinstance(oracle.decode(frame), bytes)
    decoder = Decoder(MIB)
    decoder.feed(frame)
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()
