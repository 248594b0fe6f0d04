"""Progress lines in a job's output, sans-IO: chunks in, a :class:`Progress` out.

The forms are those of the /scripts extension of Cloud Storage Server, plus a bare
percent line that progress bars print:

- ``[n/m] Title`` — task ``n`` of ``m``, called Title; a new task clears the percent;
- ``[n] Title`` — task ``n`` (the count stays what an earlier ``[n/m]`` said);
- ``[NN%] Title`` — the current task's subtask is NN % done, called Title;
- ``NN%`` alone on a line (spaces around allowed) — NN % done.

A line ends at ``\\n`` or ``\\r`` (progress bars redraw with ``\\r``). Every other line
is ignored, and so is a progress-looking line with a percent above 100. Lines are split
per stream: a line cut between two chunks is joined, but stdout and stderr never mix.

Complexity is a security property (the h11 habit): a program may print a 1 GiB line
without a newline. Each byte is scanned once, and a line is buffered only up to
``max_line`` bytes; past that the rest of it is skipped without being kept, since a
line that long is no progress line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

__all__ = ["MAX_LINE", "Progress", "ProgressParser", "parse_line"]

#: Longest line considered (bytes, without its terminator).
MAX_LINE = 4096

_TASK = re.compile(rb"\[(\d{1,9})(?:/(\d{1,9}))?\][ \t]*(.*)", re.DOTALL)
_STEP = re.compile(rb"\[(\d{1,3})%\][ \t]*(.*)", re.DOTALL)
_PERCENT = re.compile(rb"[ \t]*(\d{1,3})%[ \t]*")


@dataclass(frozen=True, slots=True)
class Progress:
    """What the job said about its progress; ``None`` where it said nothing yet.

    ``task`` of ``tasks`` is called ``title``; ``percent`` is the progress within
    it, and ``step`` the title of the subtask that reported the percent.
    """

    task: int | None = None
    tasks: int | None = None
    title: str | None = None
    percent: int | None = None
    step: str | None = None


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").strip()


def parse_line(line: bytes, current: Progress) -> Progress:
    """``current`` updated by one line (without its terminator); unchanged if the
    line is not a progress line."""
    if line.startswith(b"["):
        if match := _TASK.fullmatch(line):
            tasks = current.tasks
            if match[2] is not None:
                tasks = int(match[2])
                if tasks == 0:
                    return current
            return Progress(task=int(match[1]), tasks=tasks, title=_text(match[3]))
        if (match := _STEP.fullmatch(line)) and int(match[1]) <= 100:
            return replace(current, percent=int(match[1]), step=_text(match[2]))
        return current
    if (match := _PERCENT.fullmatch(line)) and int(match[1]) <= 100:
        return replace(current, percent=int(match[1]))
    return current


class _Lines:
    """Splits one stream into lines; keeps at most ``max_line`` bytes of an
    unfinished line."""

    __slots__ = ("_buffer", "_max_line", "_overlong")

    def __init__(self, max_line: int) -> None:
        self._max_line = max_line
        self._buffer = bytearray()
        # The current line already passed max_line: skip it up to its end.
        self._overlong = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _finish(self, data: bytes, start: int, end: int) -> bytes | None:
        """The line made of the buffer and ``data[start:end]``, or ``None`` if too long."""
        if self._overlong:
            self._overlong = False
            return None
        if len(self._buffer) + (end - start) > self._max_line:
            self._buffer.clear()
            return None
        if not self._buffer:
            return data[start:end]
        self._buffer += data[start:end]
        line = bytes(self._buffer)
        self._buffer.clear()
        return line

    def feed(self, data: bytes) -> list[bytes]:
        """Complete lines in ``data`` (joined with what was buffered)."""
        lines: list[bytes] = []
        start = 0
        # The next \n and \r, each searched again only once passed (memchr-fast,
        # and each byte looked at once per terminator: O(bytes) per chunk).
        newline = data.find(b"\n")
        carriage = data.find(b"\r")
        while newline >= 0 or carriage >= 0:
            end = (
                min(newline, carriage) if newline >= 0 and carriage >= 0 else max(newline, carriage)
            )
            line = self._finish(data, start, end)
            if line is not None:
                lines.append(line)
            start = end + 1
            if newline == end:
                newline = data.find(b"\n", start)
            if carriage == end:
                carriage = data.find(b"\r", start)
        rest = len(data) - start
        if rest and not self._overlong:
            if len(self._buffer) + rest > self._max_line:
                self._overlong = True
                self._buffer.clear()
            else:
                self._buffer += data[start:]
        return lines

    def end(self) -> bytes | None:
        """The unterminated last line, at the end of the stream."""
        line = None if self._overlong else bytes(self._buffer)
        self._overlong = False
        self._buffer.clear()
        return line or None


class ProgressParser:
    """Follows a job's progress over its output chunks.

    Feed each chunk with its stream (:meth:`feed`), and call :meth:`end` once the
    streams ended (an unterminated last line counts). :attr:`progress` is the current
    :class:`Progress`. Memory stays below ``2 * max_line`` bytes whatever the output.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.progress = Progress()
        self._streams = {"stdout": _Lines(max_line), "stderr": _Lines(max_line)}

    @property
    def buffered(self) -> int:
        """Bytes held for unfinished lines (for tests of the bound)."""
        return sum(lines.buffered for lines in self._streams.values())

    def feed(self, data: bytes, stream: Literal["stdout", "stderr"] = "stdout") -> bool:
        """Take one chunk; True if the progress changed."""
        before = self.progress
        for line in self._streams[stream].feed(data):
            self.progress = parse_line(line, self.progress)
        return self.progress != before

    def end(self) -> bool:
        """The streams ended; True if an unterminated last line changed the progress."""
        before = self.progress
        for lines in self._streams.values():
            line = lines.end()
            if line is not None:
                self.progress = parse_line(line, self.progress)
        return self.progress != before
