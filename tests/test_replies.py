"""Tests of the broker's replies, built (sockexec_py.replies): the in-band error
reply, output and exit pairs, the termsig text; each read back by a client session
fed in arbitrary pieces."""

from __future__ import annotations

import signal

import pytest
from chunking import chunkings, run_client
from hypothesis import given
from hypothesis import strategies as st

from sockexec_py.errors import EXIT_REFUSED, LocalProtocolError
from sockexec_py.events import Exited, Output
from sockexec_py.replies import (
    MAX_OUTPUT_CHUNK,
    encode_error_reply,
    encode_exit_pair,
    encode_output_pair,
    pair_at,
    termsig_text,
)


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("argc must be at least 1", EXIT_REFUSED),
        ("program not found: nope", 127),
        ("cannot execute: /etc/passwd", 126),
        ("caf\u00e9 \u2603", EXIT_REFUSED),
    ],
)
@given(data=st.data())
def test_error_reply_round_trip(data: st.DataObject, reason: str, code: int) -> None:
    stream = encode_error_reply(reason, code)
    events, error = run_client(data.draw(chunkings(stream)))
    assert error is None
    line = f"sockexec_py: {reason}\n".encode()
    assert events == [Output("stderr", line), Exited(exitcode=code)]


def test_error_reply_defaults_to_125() -> None:
    events, error = run_client([encode_error_reply("argc must be at least 1")])
    assert error is None
    assert events == [
        Output("stderr", b"sockexec_py: argc must be at least 1\n"),
        Exited(exitcode=125),
    ]
    assert EXIT_REFUSED == 125


def test_output_pair_is_buffers_of_one_pair() -> None:
    parts = encode_output_pair("stdout", b"hello")
    assert parts == (b"6:stdout,", b"5:", b"hello", b",")
    assert b"".join(encode_output_pair("stderr", b"")) == b"6:stderr,0:,"


def test_output_pair_chunk_limit() -> None:
    assert MAX_OUTPUT_CHUNK == 64 * 1024
    biggest = b"x" * MAX_OUTPUT_CHUNK
    events, error = run_client(
        [b"".join(encode_output_pair("stdout", biggest)), b"8:exitcode,1:0,"]
    )
    assert error is None
    assert events[0] == Output("stdout", biggest)
    with pytest.raises(LocalProtocolError):
        encode_output_pair("stdout", biggest + b"x")
    with pytest.raises(LocalProtocolError):
        encode_output_pair("stderr", biggest + b"x")


def test_exit_pair() -> None:
    assert encode_exit_pair(exitcode=0) == b"8:exitcode,1:0,"
    assert encode_exit_pair(exitcode=127) == b"8:exitcode,3:127,"
    assert encode_exit_pair(termsig=b"TERM") == b"7:termsig,4:TERM,"
    with pytest.raises(LocalProtocolError):
        encode_exit_pair()
    with pytest.raises(LocalProtocolError):
        encode_exit_pair(exitcode=0, termsig=b"TERM")


@pytest.mark.parametrize(
    ("signum", "name"),
    [
        (signal.SIGTERM, b"TERM"),
        (signal.SIGKILL, b"KILL"),
        (signal.SIGSEGV, b"SEGV"),
        (signal.SIGHUP, b"HUP"),
        (signal.SIGINT, b"INT"),
        (signal.SIGPIPE, b"PIPE"),
        (signal.SIGABRT, b"ABRT"),
    ],
)
def test_termsig_text(signum: signal.Signals, name: bytes) -> None:
    assert termsig_text(signum) == name
    assert termsig_text(int(signum), "name") == name
    assert termsig_text(signum, fmt="number") == str(int(signum)).encode()
    assert termsig_text(int(signum), "number").isdigit()


def test_termsig_text_unnamed_signal_falls_back_to_number() -> None:
    assert termsig_text(200) == b"200"
    assert termsig_text(200, fmt="number") == b"200"


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5), st.data())
def test_pair_at_finds_each_whole_pair_and_no_cut_one(
    payloads: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(b"".join(encode_output_pair("stdout", p)) for p in payloads)
    start = 0
    for payload in payloads:
        found = pair_at(stream, start)
        assert found is not None and found[1] == len(payload)
        end = found[0]
        assert stream[end - len(payload) - 1 : end - 1] == payload
        cut = data.draw(st.integers(start, end - 1))
        assert pair_at(stream[:cut], start) is None
        start = end
    assert start == len(stream) and pair_at(stream, start) is None
