"""What the exec lane (:mod:`.exec_lane`) reads and writes, without I/O: the request
heads it takes (a strict subset of what h11 reads alike, checked against h11 in
``tests/test_gateway_exec_lane.py``) and the answer heads it writes (only what h11
would write)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["EXEC_REQUEST", "MAX_HEAD", "Request", "answer_head", "parse_head"]

#: The request line's start that picks the lane (then ``?`` or a space).
EXEC_REQUEST = b"POST /v1/exec"
#: The longest request head the lane reads (h11's default limit, Hypercorn's).
MAX_HEAD = 16384
_REQUEST_LINE = re.compile(rb"POST /v1/exec(?:\?([A-Za-z0-9._~%=&+\-]*))? HTTP/1\.1")
_HEADER = re.compile(
    rb"([!#$%&'*+.^_`|~0-9A-Za-z\-]+):[ \t]*([!-~\x80-\xff]+(?:[ \t]+[!-~\x80-\xff]+)*)?[ \t]*"
)
#: Headers whose presence sends the connection to Hypercorn.
_NOT_OURS = frozenset((b"transfer-encoding", b"expect", b"upgrade"))
_STREAMS = (b"application/x-ndjson", b"text/event-stream")
#: An answer's header line as h11 writes it (it refuses anything else).
_ANSWER_HEADER = re.compile(
    rb"[!#$%&'*+.^_`|~0-9A-Za-z\-]+: (?:[!-~\x80-\xff]+(?:[ \t]+[!-~\x80-\xff]+)*)?"
)


@dataclass(frozen=True, slots=True)
class Request:
    """A request head the lane takes: its query, its headers (names lowercased, as
    h11 gives them), its body's length and where the body starts."""

    query: bytes
    headers: list[tuple[bytes, bytes]]
    length: int  # of the body
    start: int  # where the body starts in the buffer


def _plain(name: bytes, value: bytes) -> bool:
    """False for a keep-alive other than the default or an Accept of a stream."""
    if name == b"connection":
        return value == b"keep-alive"
    return name != b"accept" or not any(stream in value for stream in _STREAMS)


def parse_head(buffer: bytes | bytearray, max_body: int) -> Request | None:
    """The request at the start of ``buffer`` if the lane serves it, None if not
    (its head must be complete: the caller checks for the blank line)."""
    end = buffer.find(b"\r\n\r\n")
    lines = bytes(buffer[:end]).split(b"\r\n")
    matched = _REQUEST_LINE.fullmatch(lines[0])
    if matched is None:
        return None
    headers: list[tuple[bytes, bytes]] = []
    length: bytes | None = None
    hosts = 0
    for line in lines[1:]:
        header = _HEADER.fullmatch(line)
        if header is None:
            return None
        name, value = header[1].lower(), header[2] or b""
        if name in _NOT_OURS:
            return None
        if name == b"content-length":
            if length is not None or not value.isdigit() or len(value) > 12:
                return None
            length = value
        elif name == b"host":
            hosts += 1
        elif not _plain(name, value.lower()):
            return None
        headers.append((name, value))
    if length is None or int(length) > max_body or hosts != 1:
        return None  # h11 refuses HTTP/1.1 without one Host; the app answers 413
    return Request(matched[1] or b"", headers, int(length), end + 4)


def answer_head(status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> bytes | None:
    """The status line and the app's headers (a ``content-length`` added if it gave
    none), each ending in CRLF; None if h11 would refuse to write them (a malformed
    header, a length other than the body's)."""
    lines = [b"HTTP/1.1 %d \r\n" % status]
    length = None
    for name, value in headers:
        line = b"%s: %s" % (name, value)
        if not _ANSWER_HEADER.fullmatch(line):
            return None
        if name.lower() == b"content-length":
            length = value
        lines.append(line + b"\r\n")
    if length is None:
        lines.append(b"content-length: %d\r\n" % len(body))
    elif length != b"%d" % len(body):
        return None
    return b"".join(lines)
