"""Reading a job's output back, stored or live (see :mod:`.output`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from .output_files import (
    KINDS,
    READ_CHUNK,
    Chunk,
    Files,
    LiveOutput,
    Truncated,
    View,
    file_size,
    pread,
)


class OutputReader:
    """Iterates a job's stored (and, following, live) output. A plain async
    iterator, not a generator: leaving a loop early leaves nothing to finalise."""

    def __init__(
        self,
        root: Path,
        live: Callable[[str], LiveOutput | None],
        job_id: str,
        view: View,
        offset: int,
        follow: bool,
    ) -> None:
        self._live = live
        self._files = Files(root, job_id)
        self._job_id = job_id
        self._view: View = view
        self._offset = offset
        self._follow = follow
        self._segment = 0  # index record where the last "both" read was found
        self._done = False
        self._stored: tuple[int, bool] | None = None

    def __aiter__(self) -> OutputReader:
        return self

    async def __anext__(self) -> Chunk | Truncated:
        while not self._done:
            live = self._live(self._job_id)
            if live is not None:
                changed = live.changed  # taken before the size: no wakeup is missed
                size, ended, truncated = live.size(self._view), live.closed, live.truncated
            else:
                # Ended: the files do not change any more, so they are measured once.
                changed = None
                if self._stored is None:
                    self._stored = await trio.to_thread.run_sync(self._stored_size)
                size, truncated = self._stored
                ended = True
            if self._offset < size:
                limit = min(READ_CHUNK, size - self._offset)
                chunk = live.recent(self._view, self._offset, limit) if live else None
                if chunk is None:
                    chunk = await trio.to_thread.run_sync(self._read, size)
                if not chunk.data:  # the files were deleted meanwhile (the job was)
                    break
                self._offset += len(chunk.data)
                return chunk
            if not self._follow or ended or changed is None:
                self._done = True
                if truncated:
                    return Truncated()
                break
            await changed.wait()
        raise StopAsyncIteration

    def _stored_size(self) -> tuple[int, bool]:
        files = self._files
        if self._view == "both":
            size = file_size(files.stdout) + file_size(files.stderr)
        else:
            size = file_size(files.stream(self._view))
        return size, files.truncated()

    def _read(self, size: int) -> Chunk:
        """In a worker thread: the next chunk at the current offset, below ``size``."""
        want = min(READ_CHUNK, size - self._offset)
        if self._view != "both":
            data = pread(self._files.stream(self._view), want, self._offset)
            return Chunk(self._view, self._offset, data)
        kind, stream_offset, end = self._locate(size)
        want = min(want, end - self._offset)
        data = pread(self._files.stream(KINDS[kind]), want, stream_offset)
        return Chunk(KINDS[kind], self._offset, data)

    def _locate(self, size: int) -> tuple[int, int, int]:
        """Where the offset is: (kind, offset in that stream's file, end of segment)."""
        files = self._files
        count = files.records()
        position = self._offset
        if count == 0:  # deleted meanwhile: nothing to read here
            return 0, 0, position

        def start_of(number: int) -> int:
            return files.record(number)[1] if number < count else size

        # Reading on sequentially, the offset is in the same or the next segment.
        number = self._segment
        if not (number < count and files.record(number)[1] <= position < start_of(number + 1)):
            low, high = 0, count - 1
            while low < high:  # the last record starting at or before the offset
                middle = (low + high + 1) // 2
                if files.record(middle)[1] <= position:
                    low = middle
                else:
                    high = middle - 1
            number = low
            while start_of(number + 1) <= position:  # skip empty segments
                number += 1
        self._segment = number
        kind, start, offset = files.record(number)
        end = min(start_of(number + 1), size)
        return kind, offset + (position - start), end
