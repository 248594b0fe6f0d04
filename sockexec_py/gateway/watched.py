"""A file read again when it changes (the token file, the callback secret), so
an operator rotates a secret by writing the file, without a restart.

The file is checked with one ``stat`` at each :meth:`WatchedFile.current` and,
when its identity (device, inode, size, mtime) changed, read whole and parsed, and
only then swapped in: a reader never sees a mix of two versions. A read that the
file changed under (size or mtime differ before and after, or fewer bytes came
than its size said), an unreadable file, or one the parser refuses (an empty file
from a writer that truncated and has not written yet, say) keeps the last good
value: it fails closed, never "no secret". A read that raced a writer is tried
again at the next check; a refused version, once it changes again.

A new version that does not end with a newline and is younger than
:data:`SETTLE` seconds is not taken yet either: it may be a write in progress cut
mid-line (for the token file, ``tok actions=status`` cut after ``tok`` would read
as a full-access token), in place or in a new file (an editor's backup-then-write,
a file deleted and written again: a new inode says nothing). Once it is that old,
it is taken; a version that ends with a newline is taken at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["SETTLE", "WatchedFile"]

#: Seconds a new version without a final newline waits before it is taken.
SETTLE = 2.0

log = logging.getLogger("sockexec_py.gateway")
T = TypeVar("T")


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class WatchedFile(Generic[T]):
    """``parse(data, path)`` of the file at ``path``, kept current (see the module
    docstring). ``parse`` raises ``error`` (a ValueError by default) for a file it
    refuses.

    Error handling: the first read raises ``error`` (one line) when the file cannot
    be read or parsed, or changed while it was read; later ones keep the last value
    and log the reason once per version of the file.
    """

    def __init__(
        self,
        path: str,
        parse: Callable[[bytes, str], T],
        what: str,
        error: type[Exception] = ValueError,
    ) -> None:
        self.path = path
        self._parse = parse
        self._what = what
        self._error = error
        loaded = self._load(settled=True)
        if loaded is None:
            raise error(f"{what} {path} changed while it was read: try again")
        self._identity, self.value = loaded
        #: The version last refused (or "missing"): said once in the log, not read again.
        self._refused: object = None

    def _load(self, settled: bool = False) -> tuple[tuple[int, int, int, int], T] | None:
        """The file's identity and value, or None when it changed while it was read
        (or, unless ``settled``, may still be being written: see the module's)."""
        try:
            with open(self.path, "rb") as f:
                before = os.fstat(f.fileno())
                data = f.read()
            after = os.stat(self.path)
        except OSError as exc:
            raise self._error(f"cannot read {self._what} {self.path}: {exc.strerror}") from None
        if _identity(before) != _identity(after) or len(data) != before.st_size:
            return None
        if not settled and data and not data.endswith(b"\n"):
            age = time.time() - after.st_mtime_ns / 1e9
            if -60 < age < SETTLE:  # (a clock a little behind the file's too)
                return None
        return _identity(after), self._parse(data, self.path)

    def current(self) -> T:
        """The value of the file as it is now (or the last good one)."""
        try:
            identity = _identity(os.stat(self.path))
        except OSError as exc:
            self._refuse("missing", exc)
            return self.value
        if identity == self._identity or identity == self._refused:
            return self.value
        try:
            loaded = self._load()
        except self._error as exc:
            self._refuse(identity, exc)
            return self.value
        if loaded is not None:  # else it changed while read: the next call reads again
            self._identity, self.value = loaded
            self._refused = None
        return self.value

    def _refuse(self, version: object, reason: Exception) -> None:
        if version != self._refused:
            self._refused = version
            log.warning("%s: keeping the last good version (%s)", self.path, reason)
