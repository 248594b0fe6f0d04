"""Strict, bounded, incremental netstring codec (sans-IO).

A netstring is ``<length>:<bytes>,``. The length is decimal ASCII with no sign, no
spaces, no ``_`` and no leading zero (except ``0`` itself); anything else is a
:class:`RemoteProtocolError`.

Complexity is a security property here: every operation is O(bytes processed). The
length is checked against ``max_length`` while its digits arrive, so a peer announcing
``99999999999999:`` is refused after a dozen bytes, not after buffering. Consumed
bytes are dropped by advancing an offset (compacted in place now and then), never by
``buf = buf[n:]``, which would copy the rest of the buffer for every frame.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = ["END", "NEED_DATA", "Chunk", "Decoder", "encode", "encode_parts"]


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    END = "END"


#: More bytes must be fed before anything can be returned.
NEED_DATA: Final = _Sentinel.NEED_DATA
#: The input ended cleanly, on a frame boundary.
END: Final = _Sentinel.END

# Compact the buffer once this many consumed bytes sit before the read offset.
_COMPACT_AT = 64 * 1024


def encode_parts(payload: bytes | memoryview) -> tuple[bytes, bytes | memoryview, bytes]:
    """Return ``(header, payload, b",")`` so a caller can ``sendmsg`` without a copy."""
    return b"%d:" % len(payload), payload, b","


def encode(payload: bytes) -> bytes:
    """Return ``payload`` as one netstring."""
    return b"%d:%b," % (len(payload), payload)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a frame's payload, returned by :meth:`Decoder.next_chunk`.

    ``frame_length`` is the length announced by the frame's header; ``end`` is true on
    the last piece of the frame (which may carry no data, e.g. for ``0:,``).
    """

    data: bytes
    frame_length: int
    end: bool


class Decoder:
    """Incremental decoder for a stream of netstrings.

    Feed bytes with :meth:`feed` (``b""`` marks the end of input), then pull whole
    payloads with :meth:`next_frame` or pieces of payloads as they arrive with
    :meth:`next_chunk`; both may be mixed at frame boundaries.

    Error handling: a malformed frame raises :class:`RemoteProtocolError`, and every
    later call raises it again (the stream cannot be resynchronised).
    """

    __slots__ = (  # many live at once: no __dict__ each
        "_buf", "_eof", "_error", "_frame_length", "_max_digits", "_pos", "_remaining",
        "max_length"
    )  # fmt: skip

    def __init__(self, max_length: int) -> None:
        if max_length < 0:
            raise ValueError("max_length must be >= 0")
        self.max_length = max_length
        self._max_digits = len(str(max_length))
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._error: RemoteProtocolError | None = None
        # Streaming state (next_chunk): length of the frame being streamed and how many
        # of its payload bytes are still to come; None when between frames.
        self._frame_length: int | None = None
        self._remaining = 0

    # -- input ------------------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> None:
        """Add bytes received from the peer; ``b""`` means the peer's input ended."""
        if self._eof:
            raise LocalProtocolError("feed() after the end of input")
        if not data:
            self._eof = True
            return
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= _COMPACT_AT:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned (for bounds and diagnostics)."""
        return len(self._buf) - self._pos

    def take_prefix(self, prefix: bytes) -> bool | None:
        """At a frame boundary, consume ``prefix`` if the buffered bytes start with it.

        True when consumed; None when what is buffered is a proper beginning of it (the
        caller waits for more); False otherwise, or when not at a frame boundary.
        """
        self._check_usable()
        if self._frame_length is not None:
            return False
        pos, end = self._pos, self._pos + len(prefix)
        if self._buf[pos:end] == prefix:
            self._pos = end
            return True
        if len(self._buf) < end and prefix.startswith(self._buf[pos:]) and not self._eof:
            return None
        return False

    # -- output -----------------------------------------------------------------

    def next_frame(
        self, limit: int | None = None, too_long: str = "frame too long"
    ) -> bytes | _Sentinel:
        """Return the next whole payload, :data:`NEED_DATA` or :data:`END`.

        The frame is buffered until complete, which ``max_length`` bounds, and the
        caller's ``limit`` too: a longer frame is refused on its length digits, with
        the ``too_long`` message.
        """
        self._check_usable()
        if self._frame_length is not None:
            raise LocalProtocolError("next_frame() in the middle of a streamed frame")
        header = self._parse_header(limit, too_long)
        if header is NEED_DATA or header is END:
            return header
        length, start = header
        end = start + length
        if len(self._buf) <= end:
            return self._need_more()
        if self._buf[end] != 0x2C:  # ","
            self._fail("netstring not terminated by ','")
        with memoryview(self._buf) as view:  # one copy, not a bytearray slice + bytes()
            payload = bytes(view[start:end])
        self._pos = end + 1
        return payload

    def next_chunk(self) -> Chunk | _Sentinel:
        """Return the next piece of payload as soon as any is available.

        Memory stays bounded by what was fed, whatever the announced length: the
        caller consumes each piece as it comes.
        """
        self._check_usable()
        if self._frame_length is None:
            header = self._parse_header()
            if header is NEED_DATA or header is END:
                return header
            self._frame_length, self._pos = header
            self._remaining = self._frame_length
        length = self._frame_length
        available = len(self._buf) - self._pos
        take = min(available, self._remaining)
        data = b""
        if take:
            with memoryview(self._buf) as view:  # one copy, not a bytearray slice + bytes()
                data = bytes(view[self._pos : self._pos + take])
        self._pos += take
        self._remaining -= take
        if self._remaining == 0 and self._pos < len(self._buf):
            if self._buf[self._pos] != 0x2C:
                self._fail("netstring not terminated by ','")
            self._pos += 1
            self._frame_length = None
            return Chunk(data, length, True)
        if not data:
            return self._need_more()
        return Chunk(data, length, False)

    # -- internals ----------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error

    def _fail(self, reason: str) -> None:
        self._error = RemoteProtocolError(reason)
        raise self._error

    def _need_more(self) -> _Sentinel:
        if self._eof:
            self._fail("input ended in the middle of a netstring")
        return NEED_DATA

    def _parse_header(
        self, limit: int | None = None, too_long: str = ""
    ) -> tuple[int, int] | _Sentinel:
        """Parse ``<digits>:`` at the read offset without consuming it.

        Returns ``(length, payload_start)``; scans at most ``max_digits + 1`` bytes,
        so a header split across many feeds costs O(1) per feed.
        """
        buf, pos = self._buf, self._pos
        if pos == len(buf):
            return END if self._eof else NEED_DATA
        scan_end = min(len(buf), pos + self._max_digits + 1)
        colon = buf.find(b":", pos, scan_end)
        digits = buf[pos : colon if colon >= 0 else scan_end]
        if digits and not digits.isdigit():  # bytes.isdigit() is ASCII-only
            self._fail("invalid character in netstring length")
        if len(digits) > 1 and digits[0] == 0x30:
            self._fail("netstring length has a leading zero")
        length = int(digits) if digits and len(digits) <= self._max_digits else None
        if digits and (length is None or length > self.max_length):
            self._fail(f"netstring longer than the limit of {self.max_length} bytes")
        if limit is not None and length is not None and length > limit:
            self._fail(too_long)
        if colon < 0:
            return self._need_more()
        if not digits:
            self._fail("netstring length is empty")
        return int(digits), colon + 1
