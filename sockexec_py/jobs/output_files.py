"""The files of one job's output and their layout (see :mod:`.output`): the paths,
the index records, and what a reader gets back."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import trio

Stream = Literal["stdout", "stderr"]
View = Literal["stdout", "stderr", "both"]
#: The largest chunk a reader yields: a few to_thread hops per MiB, bounded memory.
READ_CHUNK = 256 << 10
RECORD = struct.Struct("<BQQ")
KINDS: tuple[Stream, Stream] = ("stdout", "stderr")
MARK_TRUNCATED = 2


@dataclass(frozen=True, slots=True)
class Chunk:
    """Stored output: ``data`` from ``stream``, at ``offset`` in the view read."""

    stream: Stream
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Truncated:
    """The output was cut at the cap here; the rest was dropped (the last item)."""


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except (FileNotFoundError, NotADirectoryError):
        return 0


def pread(path: Path, size: int, offset: int) -> bytes:
    try:
        with open(path, "rb", buffering=0) as f:
            return os.pread(f.fileno(), size, offset)
    except (FileNotFoundError, NotADirectoryError):
        return b""


def output_key(job_id: str, step: int | None = None) -> str:
    """Whose output: a job's (its id), or a task's step (``<id>.<index>``)."""
    return job_id if step is None else f"{job_id}.{step}"


class Files:
    """The paths of one output (a job's, or a step's: :func:`output_key`), beside
    its job's: ``OUTPUT/<last two id characters>/<key>.stdout``..."""

    def __init__(self, root: Path, key: str) -> None:
        job_id = key.partition(".")[0]
        directory = root / job_id[-2:]
        self.stdout = directory / f"{key}.stdout"
        self.stderr = directory / f"{key}.stderr"
        self.index = directory / f"{key}.index"

    def stream(self, stream: Stream) -> Path:
        return self.stdout if stream == "stdout" else self.stderr

    def records(self) -> int:
        return file_size(self.index) // RECORD.size

    def record(self, number: int) -> tuple[int, int, int]:
        kind, both, offset = RECORD.unpack(pread(self.index, RECORD.size, number * RECORD.size))
        return kind, both, offset

    def truncated(self) -> bool:
        count = self.records()
        return count > 0 and self.record(count - 1)[0] == MARK_TRUNCATED

    def remove(self) -> None:
        for path in (self.stdout, self.stderr, self.index):
            path.unlink(missing_ok=True)


class LiveOutput(Protocol):
    """What a reader needs of a running job's output (:class:`~.output.RunOutput`)."""

    closed: bool
    truncated: bool

    @property
    def changed(self) -> trio.Event: ...
    def size(self, view: View) -> int: ...
    def recent(self, view: View, offset: int, limit: int) -> Chunk | None: ...
