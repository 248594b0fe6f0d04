"""Spilling output a client does not read yet to an unlinked temporary file.

lua-resty-exec sends all of stdin before it reads anything: a program that echoes a
large stdin (``cat``, ``gzip``) would block on its full stdout pipe, stop reading its
stdin, and the request would stall until ``-t``. So output the client does not take
goes to a file of the connection (nginx does the same for proxied responses,
``proxy_temp_path``), up to a per-connection and a total cap; only past them does
backpressure reach the program. Memory stays bounded: the bytes are in the file (the
kernel's page cache), never in the broker's heap.

The file holds whole encoded pairs, appended in order and read back in order; an
append is all or nothing (a failed write is truncated away), so a full disk loses no
byte: the pairs stay with the caller, which falls back to backpressure.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
from collections.abc import Sequence

from ._io import advance

log = logging.getLogger("sockexec_py")
# Appends of more buffers than this go out in several pwritev calls.
_IOV_MAX = 1024


class SpoolBudget:
    """What every connection's spool may hold together (``--max-spool-total``)."""

    def __init__(self, directory: str | None, per_connection: int, total: int) -> None:
        self.directory = directory or tempfile.gettempdir()
        self.per_connection = per_connection
        self.total = total
        self.used = 0

    @property
    def enabled(self) -> bool:
        return self.per_connection > 0 and self.total > 0


class Spool:
    """One connection's spool: an append-only file read back from the front.

    Resource handling: the file is created (already unlinked) at the first append and
    emptied whenever it has been read to its end; :meth:`close` frees it and gives its
    bytes back to the budget.
    """

    __slots__ = (  # many live at once: no __dict__ each
        "_budget", "_connection", "_end", "_fd", "_read", "failed"
    )  # fmt: skip

    def __init__(self, budget: SpoolBudget, connection: int) -> None:
        self._budget = budget
        self._connection = connection
        self._fd = -1
        self._read = 0
        self._end = 0
        #: Set once a write failed: no more appends on this connection.
        self.failed = False

    @property
    def pending(self) -> int:
        """Bytes appended and not yet consumed."""
        return self._end - self._read

    def append(self, buffers: Sequence[bytes | memoryview]) -> bool:
        """Append ``buffers`` (whole pairs) at the end, all or nothing.

        False when they do not fit the per-connection or the total cap, or the file
        cannot be written (logged once): the caller keeps them.
        """
        size = sum(len(b) for b in buffers)
        budget = self._budget
        if (
            self.failed
            or not budget.enabled
            or self.pending + size > budget.per_connection
            or budget.used + size > budget.total
        ):
            return False
        if self._fd < 0 and not self._open():
            return False
        start = self._end
        try:
            pending = [memoryview(b) for b in buffers if b]
            offset = start
            while pending:
                written = os.pwritev(self._fd, pending[:_IOV_MAX], offset)
                offset += written
                advance(pending, written)
        except OSError as exc:
            # All or nothing: what part of the pairs reached the file goes again.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            self._fail(f"cannot write to the spool: {exc.strerror}")
            return False
        self._end = start + size
        budget.used += size
        return True

    def read_into(self, buffer: bytearray) -> memoryview:
        """The next spooled bytes (as many as fit ``buffer``), not yet consumed."""
        count = min(len(buffer), self.pending)
        if count == 0:
            return memoryview(buffer)[:0]
        view = memoryview(buffer)[:count]
        got = os.preadv(self._fd, [view], self._read)
        return view[:got]

    def consume(self, count: int) -> None:
        """``count`` bytes from the front were sent: forget them."""
        self._read += count
        self._budget.used -= count
        if self._read == self._end:  # all sent: the file's disk space goes back now
            self._read = self._end = 0
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)

    def close(self) -> None:
        self._budget.used -= self.pending
        self._read = self._end = 0
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _open(self) -> bool:
        directory = self._budget.directory
        try:
            try:  # Linux: a file that never has a name
                self._fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            except (AttributeError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR):
                    raise
                fd, name = tempfile.mkstemp(prefix="sockexec-spool-", dir=directory)
                os.unlink(name)
                self._fd = fd
        except OSError as exc:
            self._fail(f"cannot create a spool file in {directory}: {exc.strerror}")
            return False
        return True

    def _fail(self, reason: str) -> None:
        self.failed = True
        log.warning(
            "spool conn=%d: %s; the program now waits for the client instead",
            self._connection,
            reason,
        )
