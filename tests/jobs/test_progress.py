"""The progress-line parser: forms, and properties over arbitrary chunkings and
garbage (hypothesis)."""

from __future__ import annotations

import re

import pytest
from chunking import chunkings
from hypothesis import given
from hypothesis import strategies as st

from sockexec_py.jobs.progress import Progress, ProgressParser, parse_line


def parse_all(*lines: bytes) -> Progress:
    parser = ProgressParser()
    parser.feed(b"\n".join(lines) + b"\n")
    return parser.progress


def test_the_forms() -> None:
    assert parse_all(b"[1/3] Task 1") == Progress(task=1, tasks=3, title="Task 1")
    assert parse_all(b"[1/3] Task 1", b"[50%] Subtask") == Progress(1, 3, "Task 1", 50, "Subtask")
    assert parse_all(b"[1/3] Task 1", b"[50%] Sub", b"[2] Task 2") == Progress(2, 3, "Task 2")
    assert parse_all(b"[7] Alone") == Progress(task=7, title="Alone")
    assert parse_all(b"[1/3] A", b"  42% ") == Progress(1, 3, "A", 42)
    assert parse_all(b"[1/3] A", b"[5%] step", b"60%") == Progress(1, 3, "A", 60, "step")
    assert parse_all(b"[2/2]") == Progress(task=2, tasks=2, title="")


@pytest.mark.parametrize(
    "line",
    [
        b"hello",
        b" [1/3] indented",
        b"[a/3] x",
        b"[1/0] zero tasks",
        b"[101%] too much",
        b"101%",
        b"50 %",
        b"[2024-01-01] log line",
        b"[1/3",
        b"progress 50%",
        b"[-1] x",
        b"[1234567890] too many digits",
    ],
)
def test_other_lines_are_ignored(line: bytes) -> None:
    assert parse_line(line, Progress(1, 2, "t", 3, "s")) == Progress(1, 2, "t", 3, "s")


def test_carriage_returns_end_lines_and_streams_do_not_mix() -> None:
    parser = ProgressParser()
    parser.feed(b"10%\r20%\r3", "stdout")
    parser.feed(b"[1/2] from stderr", "stderr")  # no newline yet on stderr
    assert parser.progress == Progress(percent=20)
    parser.feed(b"0%\n", "stdout")
    assert parser.progress == Progress(percent=30)
    assert parser.end()  # stderr's unterminated line counts at the end
    assert parser.progress == Progress(1, 2, "from stderr")


def test_invalid_utf8_title() -> None:
    assert parse_all(b"[1/2] caf\xe9").title == "caf\ufffd"


def test_a_huge_line_without_newline_stays_bounded() -> None:
    parser = ProgressParser(max_line=100)
    chunk = b"x" * 65536
    for _ in range(256):  # 16 MiB of one line
        parser.feed(chunk)
        assert parser.buffered <= 100
    parser.feed(b"\n[1/1] after\n")
    assert parser.progress == Progress(1, 1, "after")


def reference(data: bytes, max_line: int) -> Progress:
    """The whole input at once: split on every terminator, skip long lines."""
    progress = Progress()
    for line in re.split(rb"[\r\n]", data):
        if len(line) <= max_line:
            progress = parse_line(line, progress)
    return progress


PIECES = st.sampled_from(
    [b"[1/3] one", b"[2] two", b"[50%] half", b"75%", b" 9% ", b"[0/0] x", b"junk", b"[", b"%"]
)
LINES = st.lists(st.one_of(PIECES, st.binary(max_size=30)), max_size=20)
ENDS = st.sampled_from([b"\n", b"\r", b"\r\n"])


@st.composite
def outputs(draw: st.DrawFn) -> bytes:
    lines = draw(LINES)
    return b"".join(line + draw(ENDS) for line in lines) + draw(st.binary(max_size=10))


@given(st.data(), outputs(), st.integers(4, 40))
def test_any_chunking_gives_the_whole_input_result(
    data: st.DataObject, output: bytes, max_line: int
) -> None:
    parser = ProgressParser(max_line=max_line)
    for chunk in data.draw(chunkings(output)):
        parser.feed(chunk)
        assert parser.buffered <= max_line
    parser.end()
    assert parser.progress == reference(output, max_line)


@given(st.lists(st.tuples(st.sampled_from(["stdout", "stderr"]), st.binary()), max_size=30))
def test_garbage_never_raises(chunks: list[tuple[str, bytes]]) -> None:
    parser = ProgressParser(max_line=64)
    for stream, chunk in chunks:
        parser.feed(chunk, stream)  # type: ignore[arg-type]
        assert parser.buffered <= 2 * 64
    parser.end()
    assert parser.buffered == 0
    percent = parser.progress.percent
    assert percent is None or 0 <= percent <= 100
