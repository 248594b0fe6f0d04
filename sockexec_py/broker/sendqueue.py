"""What a pair costs in a Unix stream socket's send queue, and how much fits.

A Unix stream send takes a new kernel buffer (at most ~36 KiB of data) only while the
queue's kernel footprint is below SO_SNDBUF: a pair sent past that point is cut, and
lua-resty-exec fails a request whose pair arrives in two pieces (SPEC §3). The queue
is measured with SIOCOUTQ, which counts whole buffers: a short pair weighs far more
than its bytes. Pure arithmetic, one ioctl and one last-resort loop; the writer that
uses them is :mod:`.pairs`.
"""

from __future__ import annotations

import fcntl
import os
import select
import sys
import termios

from sockexec_py.events import OutputKind
from sockexec_py.replies import encode_output_pair, pair_at

__all__ = [
    "MEASURABLE",
    "PAIR_OVERHEAD",
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


def send_rest(fd: int, pending: list[memoryview]) -> None:
    """Finish sending pairs already cut short (not expected: the room was measured)
    as fast as we can, without a scheduling point: a pair must arrive whole."""
    for view in pending:
        while view:
            select.select([], [fd], [], 1.0)
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
