"""What a pair costs in a Unix stream socket's send queue, and how much fits.

A Unix stream send takes a new kernel buffer (at most ~36 KiB of data) only while the
queue's kernel footprint is below SO_SNDBUF: a pair sent past that point is cut, and
lua-resty-exec fails a request whose pair arrives in two pieces (SPEC §3). The queue
is measured with SIOCOUTQ, which counts whole buffers: a short pair weighs far more
than its bytes. Pure arithmetic, one ioctl and one bounded last-resort loop; the writer that
uses them is :mod:`.pairs`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import sys
import termios
import time

from sockexec_py.events import OutputKind
from sockexec_py.replies import MAX_OUTPUT_CHUNK, encode_output_pair, pair_at

__all__ = [
    "MEASURABLE",
    "PAIR_OVERHEAD",
    "RoomMeter",
    "footprint",
    "pairs_within",
    "queued_bytes",
    "send_rest",
    "whole_pairs",
]

#: Bytes of an output pair besides its data ("6:stdout," "65536:" ","), rounded up.
PAIR_OVERHEAD = 32
# The ioctl giving a socket's send queue in kernel memory (Linux: SIOCOUTQ).
_SIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None
_INT_ZERO = bytes(4)
#: Whether send queues can be measured here at all.
MEASURABLE = _SIOCOUTQ is not None


def queued_bytes(fd: int) -> int:
    """The kernel memory ``fd``'s send queue takes (OSError where it cannot be read)."""
    if _SIOCOUTQ is None:
        raise OSError("SIOCOUTQ is Linux's")
    return int.from_bytes(fcntl.ioctl(fd, _SIOCOUTQ, _INT_ZERO), sys.byteorder)


def footprint(data_length: int) -> int:
    """An upper bound of the kernel memory one output pair takes in a send queue:
    its bytes plus a quarter, plus the buffers' own overhead (a short pair costs ~1 KiB)."""
    return (data_length + PAIR_OVERHEAD) * 5 // 4 + 2560


def whole_pairs(data: memoryview, room: int | None) -> int:
    """How many bytes at the front of ``data`` (encoded pairs, as the writer spools
    them) to send once the socket said POLLOUT: the first whole pair (POLLOUT alone
    guarantees it fits), then more whole pairs while their kernel footprint fits the
    measured ``room`` (None: unmeasured, one pair only). 0 when no pair is whole."""
    offset = 0
    while offset < len(data):
        pair = pair_at(data, offset)
        if pair is None:
            break
        end, data_length = pair
        if offset and (room is None or footprint(data_length) > room):
            break
        if room is not None:
            room -= footprint(data_length)
        offset = end
    return offset


def send_rest(fd: int, pending: list[memoryview], within: float = 0.1) -> None:
    """Finish the last pair of a session, cut short (not expected: its room was made
    sure of), without a scheduling point, as the socket closes right after; raises
    TimeoutError if the client takes no more of it within ``within`` seconds."""
    end = time.monotonic() + within
    poll = select.poll()  # (not select.select: fd numbers past 1023 are common here)
    poll.register(fd, select.POLLOUT)
    for view in pending:
        while view:
            left = end - time.monotonic()
            if left <= 0 or not poll.poll(left * 1000):
                raise TimeoutError("the client stopped reading in the last pair")
            with contextlib.suppress(BlockingIOError):
                view = view[os.write(fd, view) :]


def pairs_within(
    kind: OutputKind, data: bytes | memoryview, chunk: int, room: int
) -> list[bytes | memoryview] | None:
    """``data`` as output pairs of at most ``chunk`` bytes each, if their kernel
    footprint fits ``room`` all together; None if it does not."""
    view = memoryview(data)
    batch: list[bytes | memoryview] = []
    for offset in range(0, len(view), chunk):
        piece = view[offset : offset + chunk]
        room -= footprint(len(piece))
        if room < 0:
            return None
        batch += encode_output_pair(kind, piece)
    return batch


class RoomMeter:
    """How much one client socket's send queue may still take, as cheaply as it can be
    known: SIOCOUTQ against SO_SNDBUF (read once), or where the queue cannot be
    measured, only whether POLLOUT holds (polled without a scheduling round)."""

    __slots__ = ("_poll", "_send_buffer", "fd", "measurable", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLOUT)
        self._send_buffer = 0
        self.measurable = MEASURABLE

    def room(self) -> int | None:
        """Kernel memory the send queue may still grow by, or None where unknown."""
        if not self.measurable:
            return None
        try:
            queued = queued_bytes(self.fd)
        except OSError:
            self.measurable = False  # no SIOCOUTQ here: one pair per POLLOUT
            return None
        return self._buffer_size() - queued - 1

    def writable(self) -> bool:
        """POLLOUT now: room for at least one pair within :meth:`chunk_limit`."""
        return bool(self._poll.poll(0))

    def fits(self, size: int) -> bool:
        """Whether ``size`` bytes (one short pair) go into the send queue now."""
        room = self.room()
        if room is not None:
            return footprint(size) <= room
        return self.writable()

    def chunk_limit(self) -> int:
        """The most data per pair: 64 KiB, less where SO_SNDBUF is so small (under
        ~128 KiB, a tiny net.core.wmem_max) that a 64 KiB pair could be cut even from
        a queue at the POLLOUT mark. A pair within half of SO_SNDBUF never can."""
        return max(min(MAX_OUTPUT_CHUNK, self._buffer_size() // 2 - 64 - PAIR_OVERHEAD), 512)

    def _buffer_size(self) -> int:
        """SO_SNDBUF, read once."""
        if not self._send_buffer:
            try:
                self._send_buffer = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            except OSError:
                self._send_buffer = 4 * MAX_OUTPUT_CHUNK  # unknown: assume a usual one
        return self._send_buffer
