"""Job output in files under the data dir, appended as it arrives, read back from any
offset, and followed live by any number of readers.

File layout, per job (``OUTPUT/<last two id characters>/<id>.*``, so no directory
grows past 1/1024 of the history; files appear with the first byte of output):

- ``<id>.stdout`` and ``<id>.stderr``: the bytes as the program wrote them, so one
  stream reads back with plain ``pread`` at its own offset;
- ``<id>.index``: fixed 17-byte records ``(kind u8, both_offset u64, stream_offset
  u64)``, one each time the output switches stream. The ``both`` view (arrival order)
  is the concatenation of the segments; a reader finds its offset by binary search.
  Kind 2 is the truncation marker, written where storage stopped.

Per-job cap (default 64 MiB) counts stored bytes plus index records (a program that
alternates one-byte writes on stdout and stderr must not grow the index without
bound either). Past the cap, output is dropped and counted, the marker is recorded,
and the program keeps running: only the broker's flow control may slow it down.

Followers: while a job runs, its :class:`RunOutput` is registered here; it replaces
a :class:`trio.Event` after every write, so readers wait for new bytes without
polling, and any number of them read the files (the page cache) at no extra broker
cost. Nothing is ever held whole in memory: reads are chunks of 256 KiB at most,
and at most 1 MiB of accepted output waits to be written. File I/O runs in worker
threads (a write stalled by the kernel's dirty-page throttling must not stall the
trio loop), in batches: one thread hop per chunk would cap a job at ~100 MiB/s.
"""

from __future__ import annotations

import bisect
import itertools
import os
from pathlib import Path
from typing import BinaryIO

import trio

from .output_files import (
    KINDS,
    MARK_TRUNCATED,
    RECORD,
    Chunk,
    Files,
    Stream,
    Truncated,
    View,
    file_size,
    output_key,
)
from .output_read import OutputReader

__all__ = [
    "DEFAULT_CAP",
    "Chunk",
    "OutputReader",
    "OutputStore",
    "RunOutput",
    "Truncated",
    "View",
    "output_key",
]

DEFAULT_CAP = 64 << 20
#: Accepted bytes not yet written past which a write waits for the files.
MAX_PENDING = 1 << 20
#: Bytes of the latest stored output a running job keeps in memory for followers.
RECENT = 2 << 20
#: Buffers per writev (the kernel's IOV_MAX is 1024).
_IOV_MAX = 1024


class RunOutput:
    """The output of a running job: :meth:`write` each chunk, :meth:`close` at the end.

    Only the runner writes, one chunk at a time. The cap is applied as chunks are
    accepted; the bytes reach the files in batches, from :meth:`run_writer` when
    the runner runs it alongside the session (reading the broker and writing the
    files then overlap), else at once. The sizes here are what readers may read:
    they grow only once the bytes are in the files.
    """

    def __init__(self, store: OutputStore, job_id: str, cap: int) -> None:
        self.job_id = job_id
        self.cap = cap
        self.stdout_bytes = 0
        self.stderr_bytes = 0
        self.dropped_bytes = 0
        self.truncated = False
        self.closed = False
        self.error: str | None = None
        self._store = store
        self._files = Files(store.root, job_id)
        self._changed = trio.Event()
        # Accepted so far (written or pending): what the cap and the index count.
        self._accepted = [0, 0]
        self._records = 0
        self._kind: int | None = None
        # Pending writes in order: (target, bytes), target 0/1 a stream, 2 the index.
        self._pending: list[tuple[int, bytes]] = []
        self._pending_bytes = 0
        self._wake = trio.Event()
        self._writer_running = False
        self._flush_lock = trio.Lock()
        # Files stay open for the run (opened at the first byte of each).
        self._handles: dict[int, BinaryIO] = {}
        # The stored chunks of the pending writes, then of the latest batches
        # (kind, offset in both, offset in its stream, bytes), at most RECENT bytes:
        # live followers read the tail here, without a thread hop per read.
        self._pending_chunks: list[tuple[int, int, int, bytes]] = []
        self._recent: list[tuple[int, int, int, bytes]] = []
        self._recent_bytes = 0

    @property
    def both_bytes(self) -> int:
        return self.stdout_bytes + self.stderr_bytes

    @property
    def changed(self) -> trio.Event:
        """Set at the next write (replaced after each): what followers wait on."""
        return self._changed

    def size(self, view: View) -> int:
        if view == "both":
            return self.both_bytes
        return self.stdout_bytes if view == "stdout" else self.stderr_bytes

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _accept(self, kind: int, data: bytes) -> None:
        """Apply the cap to a chunk and queue what is stored (in the trio thread)."""
        both = sum(self._accepted)
        overhead = RECORD.size if kind != self._kind else 0
        room = max(0, self.cap - both - self._records * RECORD.size - overhead)
        stored = data[:room] if room < len(data) else data
        if stored:
            if overhead:
                self._pending.append((2, RECORD.pack(kind, both, self._accepted[kind])))
                self._records += 1
                self._kind = kind
            self._pending.append((kind, stored))
            self._pending_chunks.append((kind, both, self._accepted[kind], stored))
            self._accepted[kind] += len(stored)
            self._pending_bytes += len(stored)
        if len(stored) < len(data):
            self._pending.append((2, RECORD.pack(MARK_TRUNCATED, both + len(stored), 0)))
            self._records += 1
            self.truncated = True
            self.dropped_bytes += len(data) - len(stored)

    async def write(self, stream: Stream, data: bytes) -> None:
        """Store a chunk, or the part of it under the cap; count the rest as dropped.

        Waits for the files only when no writer task runs or past
        :data:`MAX_PENDING` bytes (backpressure: memory stays bounded).
        Error handling: a failed write (disk full) stops storage like the cap does,
        with the reason in :attr:`error`; the job itself goes on.
        """
        if not data:
            return
        if self.truncated or self.closed:
            self.dropped_bytes += len(data)
            return
        self._accept(KINDS.index(stream), data)
        self._wake.set()
        if not self._writer_running or self._pending_bytes >= MAX_PENDING:
            await self.flush()

    async def run_writer(self) -> None:
        """Write accepted chunks to the files as they come, in batches; run it as a
        task while the session is open (cancel it after; :meth:`close` flushes)."""
        self._writer_running = True
        try:
            while True:
                if not self._pending:
                    self._wake = trio.Event()
                    await self._wake.wait()
                await self.flush()
        finally:
            self._writer_running = False

    async def flush(self) -> None:
        """Write every accepted chunk to the files, then let readers see them.

        Resource handling: shielded, a batch is written whole or its failure recorded.
        """
        async with self._flush_lock:
            if not self._pending:
                return
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            chunks, self._pending_chunks = self._pending_chunks, []
            stdout, stderr = self._accepted
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(self._write, pending)
                except OSError as exc:
                    self.error = f"output not stored: {exc.strerror or exc}"
                    self.truncated = True
                    written = await trio.to_thread.run_sync(self._written)
                    self.dropped_bytes += stdout + stderr - sum(written)
                    stdout, stderr = self._accepted = written
                    chunks = self._recent = []  # the files say what was stored
                    self._recent_bytes = 0
            self._remember(chunks)
            self.stdout_bytes, self.stderr_bytes = stdout, stderr
            self._notify()

    def _remember(self, chunks: list[tuple[int, int, int, bytes]]) -> None:
        """Keep the latest stored chunks, at most :data:`RECENT` bytes of them."""
        self._recent.extend(chunks)
        self._recent_bytes += sum(len(chunk[3]) for chunk in chunks)
        drop = 0
        while self._recent_bytes > RECENT and drop < len(self._recent) - 1:
            self._recent_bytes -= len(self._recent[drop][3])
            drop += 1
        if drop:
            del self._recent[:drop]

    def recent(self, view: View, offset: int, limit: int) -> Chunk | None:
        """Up to ``limit`` stored bytes at ``offset`` of ``view`` from memory, or
        None when they are no longer (or not) there: read the files then."""
        chunks = self._recent
        if not chunks or limit <= 0:
            return None
        kind = None if view == "both" else KINDS.index(view)
        start = None
        if kind is None:
            # Offsets in both grow with the list: bisect on them.
            index = bisect.bisect_right(chunks, offset, key=lambda chunk: chunk[1]) - 1
            if index >= 0 and offset < chunks[index][1] + len(chunks[index][3]):
                start = index
        else:
            for index in range(len(chunks) - 1, -1, -1):
                chunk = chunks[index]
                if chunk[0] == kind and chunk[2] <= offset:
                    if offset < chunk[2] + len(chunk[3]):
                        start = index
                    break
        if start is None:
            return None
        stream = chunks[start][0]
        pieces: list[bytes] = []
        size = 0
        for chunk in chunks[start:]:
            if size >= limit:
                break
            if chunk[0] != stream:
                if kind is None:
                    break  # a chunk is of one stream: the next one starts here
                continue
            skip = offset + size - (chunk[1] if kind is None else chunk[2])
            piece = chunk[3][skip : skip + limit - size]
            pieces.append(piece)
            size += len(piece)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return Chunk(KINDS[stream], offset, data)

    def _handle(self, target: int) -> BinaryIO:
        handle = self._handles.get(target)
        if handle is None:
            files = self._files
            path = files.index if target == 2 else files.stream(KINDS[target])
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = self._handles[target] = open(path, "ab", buffering=0)  # noqa: SIM115
        return handle

    def _write(self, pending: list[tuple[int, bytes]]) -> None:
        """In a worker thread: consecutive writes to one file go out as one.
        Unbuffered: once this returns, readers with their own descriptors see it."""
        for target, group in itertools.groupby(pending, key=lambda item: item[0]):
            # writev, not a join: no copy of the batch with the GIL held (the trio
            # thread waits for the GIL while a worker copies).
            fd = self._handle(target).fileno()
            chunks = [memoryview(data) for _, data in group]
            while chunks:
                written = os.writev(fd, chunks[:_IOV_MAX])
                while chunks and written >= len(chunks[0]):
                    written -= len(chunks.pop(0))
                if chunks and written:
                    chunks[0] = chunks[0][written:]

    def _written(self) -> list[int]:
        """In a worker thread: the stream bytes really in the files (after an error)."""
        try:
            return [file_size(self._files.stream(kind)) for kind in KINDS]
        except OSError:
            return [self.stdout_bytes, self.stderr_bytes]

    def _close_files(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    async def close(self) -> None:
        """The job ended: flush, close its files; followers read what is left and stop.

        Resource handling: safe to call more than once; runs even when cancelled.
        """
        if self.closed:
            return
        with trio.CancelScope(shield=True):
            await self.flush()
            self.closed = True
            self._store._live.pop(self.job_id, None)
            self._notify()
            if self._handles:  # a job that printed nothing opened no file
                await trio.to_thread.run_sync(self._close_files)


class OutputStore:
    """Every job's output under ``root``; the registry of running jobs' outputs."""

    def __init__(self, root: Path | str, *, cap: int = DEFAULT_CAP) -> None:
        self.root = Path(root)
        self.cap = cap
        self._live: dict[str, RunOutput] = {}

    def open(self, job_id: str) -> RunOutput:
        """The output of a job about to run, registered for followers until it is
        closed (files appear with its first byte). A job that goes back to the queue
        before it started keeps its (empty) output open, so its followers wait on."""
        output = self._live.get(job_id)
        if output is None:
            output = self._live[job_id] = RunOutput(self, job_id, self.cap)
        return output

    def live(self, job_id: str) -> RunOutput | None:
        return self._live.get(job_id)

    async def remove(self, job_id: str, steps: int = 0) -> None:
        """Delete a finished job's files, and those of its ``steps`` steps (no error
        if there are none)."""

        def remove() -> None:
            Files(self.root, job_id).remove()
            for step in range(steps):
                Files(self.root, output_key(job_id, step)).remove()

        await trio.to_thread.run_sync(remove)

    def read(
        self, job_id: str, view: View = "both", offset: int = 0, *, follow: bool = False
    ) -> OutputReader:
        """Read stored output from ``offset`` of ``view``: ``async for item in ...``
        gives :class:`Chunk` items, then :class:`Truncated` if the output was cut.
        With ``follow``, a running job's new output is read as it arrives, until it
        ends; without, the reader stops at what is stored when it gets there.
        """
        if offset < 0:
            raise ValueError("offset must be >= 0")
        return OutputReader(self.root, self.live, job_id, view, offset, follow)
