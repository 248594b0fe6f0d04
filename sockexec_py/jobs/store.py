"""The job store: SQLite under the data dir, reached from trio without blocking it.

Threading model, and why:

- **One writer.** A dedicated thread owns the only connection that writes and runs
  every change, in submission order. SQLite allows one writer at a time anyway; with
  a single writer path nothing ever waits on SQLite's write lock, so nobody sees
  "database is locked". The thread commits *groups*: it takes every change queued
  meanwhile, runs each in its own savepoint (a failing one is rolled back alone) and
  commits them together, so one WAL sync (``synchronous=FULL``, ~0.6 ms here) serves
  many submits under load. A caller is answered only after its group committed:
  a 202 means the job is on disk.
- **Many readers.** Reads run in trio's worker threads on a small pool of read-only
  connections (one thread per connection at a time, hence ``check_same_thread=False``
  is safe). In WAL mode readers see the last commit and never wait for the writer.
- **One gateway per data dir.** ``flock`` on ``DATA_DIR/gateway.lock`` for the life of
  the store: a second process fails at once with :class:`DataDirLocked`. The kernel
  drops the lock when the process dies, even by ``kill -9``.

The writer and the readers live in :mod:`.store_threads`; the writer also hands
each committed change's events to :attr:`Store.publish`, in commit (id) order.

Error handling: SQLite and OS errors that mean the disk cannot take the write (full,
read-only, I/O error, unwritable directory) become :class:`StoreUnavailable` with one
line, after a rollback, so nothing is half-written. Job errors (:class:`JobNotFound`,
:class:`IllegalTransition`, :class:`QueueFull`) pass through unchanged.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import trio

from . import callbacks, events, queries, recovery, retention, task_queries
from .document import Callback, CallbackAttempt
from .errors import DataDirLocked
from .events import Event
from .listing import ListQuery, Page, list_jobs
from .model import LOST_REASON, Job, JobState, new_job_id
from .request import SubmitRequest
from .schema import connect, migrate
from .steps import Step
from .store_threads import Readers, Writer, unavailable

__all__ = ["DATABASE", "LOCK_FILE", "Store", "open_store"]

DATABASE = "jobs.db"
LOCK_FILE = "gateway.lock"
#: Finished jobs deleted per purge transaction (bounds how long it holds the writer).
PURGE_BATCH = 500

T = TypeVar("T")


def _lock_data_dir(data_dir: Path) -> int:
    """Take the data dir's lock; returns the lock file's descriptor (keep it open)."""
    path = data_dir / LOCK_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise unavailable(exc, f"cannot use the data dir {data_dir}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise DataDirLocked(
            f"the data dir {data_dir} is in use by another gateway (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Store:
    """The async facade: every method runs its statements off the trio thread.

    Build it with :func:`open_store`. ``clock`` gives the Unix time recorded on jobs
    (tests pass one tied to trio's clock); it is read in the trio thread.
    """

    def __init__(
        self,
        data_dir: Path,
        writer_conn: sqlite3.Connection,
        lock_fd: int,
        *,
        readers: int,
        clock: Callable[[], float],
    ) -> None:
        self.data_dir = data_dir
        self.path = data_dir / DATABASE
        self.clock = clock
        self._lock_fd = lock_fd
        #: Where committed events go (the runner sets its hub's publish here).
        self.publish: Callable[[Sequence[Event]], object] | None = None
        self._writer = Writer(writer_conn)
        self._readers = Readers(self.path, readers)

    @classmethod
    def _open(
        cls, data_dir: Path, readers: int, clock: Callable[[], float]
    ) -> Store:  # in a thread: opening may recover a WAL
        lock_fd = _lock_data_dir(data_dir)
        path = data_dir / DATABASE
        try:
            conn = connect(path)
            try:
                migrate(conn, path)
            except BaseException:
                conn.close()
                raise
        except BaseException as exc:
            os.close(lock_fd)
            if isinstance(exc, sqlite3.Error | OSError):
                raise unavailable(exc, f"cannot open {path}") from None
            raise
        return cls(data_dir, conn, lock_fd, readers=readers, clock=clock)

    async def aclose(self) -> None:
        await self._writer.aclose()
        self._readers.close()
        os.close(self._lock_fd)  # releases the data dir's lock

    # ---- reads ----

    async def get(self, job_id: str) -> Job:
        return await self._readers.run(lambda conn: queries.get_job(conn, job_id))

    async def stdin(self, job_id: str) -> bytes:
        return await self._readers.run(lambda conn: queries.get_stdin(conn, job_id))

    async def position(self, job_id: str) -> int | None:
        return await self._readers.run(lambda conn: queries.queue_position(conn, job_id))

    async def list_jobs(self, query: ListQuery) -> Page:
        return await self._readers.run(lambda conn: list_jobs(conn, query))

    async def counts(self) -> dict[JobState, int]:
        return await self._readers.run(queries.state_counts)

    async def queue_lengths(self) -> dict[str, int]:
        return await self._readers.run(queries.queue_lengths)

    async def next_start(self) -> float | None:
        return await self._readers.run(queries.next_start)

    async def steps(self, job_id: str) -> list[Step]:
        """A task's steps, in order ([] for a job of one program)."""
        return await self._readers.run(lambda conn: task_queries.get_steps(conn, job_id))

    async def step_stdin(self, job_id: str, index: int) -> bytes:
        return await self._readers.run(lambda conn: task_queries.step_stdin(conn, job_id, index))

    async def callback(self, job_id: str) -> Callback | None:
        return await self._readers.run(lambda conn: callbacks.get_callback(conn, job_id))

    async def due_callbacks(self) -> list[tuple[str, float]]:
        return await self._readers.run(callbacks.due_callbacks)

    async def delivery(self, job_id: str) -> callbacks.Delivery | None:
        return await self._readers.run(lambda conn: callbacks.delivery(conn, job_id))

    async def events_after(
        self, after: int, limit: int, name: str | None = None
    ) -> tuple[list[Event], int, int | None]:
        """Up to ``limit`` events after the id ``after`` (of ``name``), with the
        latest id ever recorded and the oldest one still kept (None: none kept)."""

        def read(conn: sqlite3.Connection) -> tuple[list[Event], int, int | None]:
            found = events.events_after(conn, after, limit, name)
            return found, events.last_event_id(conn), events.first_event_id(conn)

        return await self._readers.run(read)

    # ---- writes ----

    def _write(self, fn: Callable[[sqlite3.Connection, list[Event]], T]) -> Awaitable[T]:
        """Run a change in the writer; its events are published once committed."""
        return self._writer.record(fn, self.publish)

    async def submit(self, request: SubmitRequest, *, max_waiting: int | None = None) -> Job:
        """Record a new job; returns once it is committed (it survives ``kill -9``).

        Error handling: :class:`QueueFull`, :class:`StoreUnavailable`.
        """
        job, _ = await self.submit_positioned(request, max_waiting=max_waiting)
        return job

    async def submit_positioned(
        self, request: SubmitRequest, *, max_waiting: int | None = None
    ) -> tuple[Job, int | None]:
        """:meth:`submit`, with the job's queue position read in its transaction."""
        now = self.clock()
        job_id = new_job_id(now)

        def insert(conn: sqlite3.Connection, recorded: list[Event]) -> tuple[Job, int | None]:
            job = queries.insert_job(conn, job_id, request, now, max_waiting, recorded)
            return job, queries.queue_position(conn, job_id)

        return await self._write(insert)

    async def claim(
        self,
        slots: int,
        running: Mapping[str, int],
        limits: Mapping[str, int],
        default_limit: int,
    ) -> list[Job]:
        now = self.clock()
        running, limits = dict(running), dict(limits)  # snapshots for the writer thread
        return await self._write(
            lambda conn, ev: queries.claim(conn, now, slots, running, limits, default_limit, ev)
        )

    async def claim_with_stdin(
        self,
        slots: int,
        running: Mapping[str, int],
        limits: Mapping[str, int],
        default_limit: int,
    ) -> list[tuple[Job, bytes]]:
        """:meth:`claim`, each job with its stdin."""
        now = self.clock()
        running, limits = dict(running), dict(limits)
        return await self._write(
            lambda conn, ev: queries.claim_with_stdin(
                conn, now, slots, running, limits, default_limit, ev
            )
        )

    async def requeue(self, job_id: str) -> None:
        now = self.clock()
        await self._write(lambda conn, ev: queries.requeue(conn, job_id, now, ev))

    async def promote_due(self) -> list[str]:
        now = self.clock()
        return await self._write(lambda conn, ev: queries.promote_due(conn, now, ev))

    async def mark_lost(self, reason: str = LOST_REASON) -> list[str]:
        now = self.clock()
        return await self._write(lambda conn, ev: recovery.mark_lost(conn, now, reason, ev))

    async def cancel_waiting(self, job_id: str, reason: str) -> Job:
        now = self.clock()
        return await self._write(
            lambda conn, ev: queries.cancel_waiting(conn, job_id, now, reason, ev)
        )

    async def save_progress(self, job: Job, *, event: bool = False) -> None:
        """A running job's sizes and progress; with ``event``, a progress event."""
        now = self.clock() if event else None
        await self._write(lambda conn, ev: queries.save_progress(conn, job, now, ev))

    async def finish(self, job: Job, *, remove: bool = False) -> None:
        await self._write(lambda conn, ev: queries.finish(conn, job, remove=remove, events=ev))

    async def delete(self, job_id: str) -> int:
        """Delete a finished job; returns how many steps it had."""
        return await self._write(lambda conn, ev: retention.delete_job(conn, job_id))

    # ---- steps ----

    async def start_step(self, job: Job, step: Step) -> Step:
        now = self.clock()
        return await self._write(lambda conn, ev: task_queries.start_step(conn, job, step, now, ev))

    async def end_steps(self, job: Job, ended: Sequence[Step], *, waiting: bool = False) -> None:
        now = self.clock()
        ended = list(ended)
        await self._write(
            lambda conn, ev: task_queries.end_steps(conn, job, ended, now, ev, waiting=waiting)
        )

    async def save_step_progress(self, job: Job, step: Step, *, event: bool = False) -> None:
        now = self.clock()
        await self._write(
            lambda conn, ev: task_queries.save_step_progress(
                conn, job, step, now, ev if event else None
            )
        )

    # ---- callbacks ----

    async def record_attempt(
        self, job_id: str, attempt: CallbackAttempt, *, next_at: float | None, delivered: bool
    ) -> None:
        await self._write(
            lambda conn, ev: callbacks.record_attempt(
                conn, job_id, attempt, next_at=next_at, delivered=delivered
            )
        )

    # ---- retention ----

    async def purge(
        self, *, older_than: float | None = None, keep_max: int | None = None
    ) -> list[str]:
        """Delete finished jobs that ended more than ``older_than`` seconds ago, then
        the oldest beyond ``keep_max``; in batches of :data:`PURGE_BATCH`, each its
        own transaction, so submits are never held up for long. Returns the ids."""
        return [job_id for job_id, _ in await self.purge_counted(older_than, keep_max)]

    async def purge_counted(
        self, older_than: float | None = None, keep_max: int | None = None
    ) -> list[tuple[str, int]]:
        """:meth:`purge`, each id with the number of steps the job had."""
        ended_before = None if older_than is None else self.clock() - older_than
        deleted: list[tuple[str, int]] = []
        while True:
            batch = await self._write(
                lambda conn, ev: retention.purge_counted(conn, ended_before, keep_max, PURGE_BATCH)
            )
            deleted.extend(batch)
            if len(batch) < PURGE_BATCH:
                return deleted

    async def purge_events(self, older_than: float) -> int:
        """Delete the events recorded more than ``older_than`` seconds ago."""
        before = self.clock() - older_than
        total = 0
        while True:
            count = await self._write(
                lambda conn, ev: events.purge_events(conn, before, PURGE_BATCH * 10)
            )
            total += count
            if count < PURGE_BATCH * 10:
                return total


@asynccontextmanager
async def open_store(
    data_dir: Path | str,
    *,
    readers: int = 4,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Store]:
    """Open (creating or upgrading) the store of ``data_dir`` and lock the dir.

    Resource handling: leaving the block stops the writer, closes every connection
    and releases the lock. Error handling: :class:`DataDirLocked` (another process
    holds it), :class:`StoreUnavailable` (cannot create or open it),
    :class:`~.errors.SchemaError` (a newer or foreign file).
    """
    store = await trio.to_thread.run_sync(Store._open, Path(data_dir), readers, clock)
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
