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

Error handling: SQLite and OS errors that mean the disk cannot take the write (full,
read-only, I/O error, unwritable directory) become :class:`StoreUnavailable` with one
line, after a rollback, so nothing is half-written. Job errors (:class:`JobNotFound`,
:class:`IllegalTransition`, :class:`QueueFull`) pass through unchanged.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import outcome
import trio

from . import callbacks, events, queries, task_queries
from .document import Callback, CallbackAttempt
from .errors import DataDirLocked, JobError, StoreUnavailable
from .events import Event
from .listing import ListQuery, Page, list_jobs
from .model import LOST_REASON, Job, JobState, new_job_id
from .request import SubmitRequest
from .schema import connect, migrate
from .steps import Step

__all__ = ["DATABASE", "LOCK_FILE", "Store", "open_store"]

DATABASE = "jobs.db"
LOCK_FILE = "gateway.lock"
#: Changes committed together at most (bounds a group's transaction time).
MAX_GROUP = 64
#: Finished jobs deleted per purge transaction (bounds how long it holds the writer).
PURGE_BATCH = 500

T = TypeVar("T")
log = logging.getLogger("sockexec_py.jobs")


def unavailable(exc: BaseException, what: str) -> StoreUnavailable:
    """One line for an error that means the data dir cannot serve us."""
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "SQLITE_ERROR")
        return StoreUnavailable(f"{what}: {exc} ({name})")
    if isinstance(exc, OSError):
        return StoreUnavailable(f"{what}: {exc.strerror or exc}")
    return StoreUnavailable(f"{what}: {exc}")


@dataclass(eq=False)
class _Call(Generic[T]):
    fn: Callable[[sqlite3.Connection, list[Event]], T]
    token: trio.lowlevel.TrioToken
    publish: Callable[[Sequence[Event]], object] | None = None
    done: trio.Event = field(default_factory=trio.Event)
    result: outcome.Outcome[T] | None = None
    #: The events the change recorded (kept only if it committed).
    events: list[Event] = field(default_factory=list)

    def deliver(self, result: outcome.Outcome[T]) -> None:
        """In the trio thread: publish the events of a committed change, hand the
        result over and wake the caller. Calls are delivered in commit order
        (``run_sync_soon`` runs its callbacks in order), so events are published
        in id order."""
        if self.publish is not None and self.events and isinstance(result, outcome.Value):
            try:
                self.publish(self.events)
            except Exception:
                log.exception("publishing job events failed")
        self.result = result
        self.done.set()


class _Writer:
    """The thread that owns the write connection and commits groups of changes."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._calls: queue.SimpleQueue[_Call[Any] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="jobs-store-writer", daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the next group; return its result once the group committed."""
        return await self.record(lambda conn, _: fn(conn))

    async def record(
        self,
        fn: Callable[[sqlite3.Connection, list[Event]], T],
        publish: Callable[[Sequence[Event]], object] | None = None,
    ) -> T:
        """:meth:`run` for ``fn(conn, events)``: once the group committed, the
        events it recorded go to ``publish`` before the result to the caller."""
        if self._closed:
            raise StoreUnavailable("the job store is closed")
        call: _Call[T] = _Call(fn, trio.lowlevel.current_trio_token(), publish)
        self._calls.put(call)
        # Shielded: the change happens or not, and the caller must learn which (a
        # submit cancelled here could still be committed; its caller decides).
        with trio.CancelScope(shield=True):
            await call.done.wait()
        assert call.result is not None
        return call.result.unwrap()

    async def aclose(self) -> None:
        self._closed = True
        self._calls.put(None)
        await trio.to_thread.run_sync(self._thread.join)

    def _serve(self) -> None:
        try:
            while (call := self._calls.get()) is not None:
                group = [call]
                while len(group) < MAX_GROUP:
                    try:
                        more = self._calls.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        self._calls.put(None)  # stop after this group
                        break
                    group.append(more)
                results = self._commit(group)
                for each, result in zip(group, results, strict=True):
                    with suppress(trio.RunFinishedError):
                        each.token.run_sync_soon(each.deliver, result)
        finally:
            self._conn.close()

    def _commit(self, group: list[_Call[Any]]) -> list[outcome.Outcome[Any]]:
        conn = self._conn
        results: list[outcome.Outcome[Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for call in group:
                conn.execute("SAVEPOINT change")
                try:
                    value = call.fn(conn, call.events)
                except Exception as exc:
                    call.events.clear()
                    # SQLite rolls a whole transaction back on some errors (full disk,
                    # I/O): then the group is lost, not just this change.
                    if not conn.in_transaction:
                        raise
                    conn.execute("ROLLBACK TO change")
                    conn.execute("RELEASE change")
                    if isinstance(exc, sqlite3.Error | OSError):
                        exc = unavailable(exc, "cannot write the job store")
                    results.append(outcome.Error(exc))
                else:
                    conn.execute("RELEASE change")
                    results.append(outcome.Value(value))
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            error = (
                exc if isinstance(exc, JobError) else unavailable(exc, "cannot write the job store")
            )
            for call in group:
                call.events.clear()
            return [outcome.Error(error) for _ in group]
        return results


class _Readers:
    """Read-only connections used by trio's worker threads, one thread each at a time."""

    def __init__(self, path: Path, size: int) -> None:
        self._path = path
        self._idle: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        # At most ``size`` reads at once, so at most ``size`` connections exist.
        self._limiter = trio.CapacityLimiter(size)
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await trio.to_thread.run_sync(self._read, fn, limiter=self._limiter)

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            try:
                conn = connect(self._path, readonly=True)
            except sqlite3.Error as exc:
                raise unavailable(exc, "cannot read the job store") from None
            with self._lock:
                self._opened.append(conn)
        try:
            conn.execute("BEGIN")  # one snapshot for every statement of fn
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise unavailable(exc, "cannot read the job store") from None
        finally:
            self._idle.put(conn)

    def close(self) -> None:
        with self._lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()


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
        self._writer = _Writer(writer_conn)
        self._readers = _Readers(self.path, readers)

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
        return await self._write(lambda conn, ev: queries.mark_lost(conn, now, reason, ev))

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
        return await self._write(lambda conn, ev: queries.delete_job(conn, job_id))

    # ---- steps ----

    async def start_step(self, job: Job, step: Step) -> Step:
        now = self.clock()
        return await self._write(lambda conn, ev: task_queries.start_step(conn, job, step, now, ev))

    async def end_steps(self, job: Job, ended: Sequence[Step]) -> None:
        now = self.clock()
        ended = list(ended)
        await self._write(lambda conn, ev: task_queries.end_steps(conn, job, ended, now, ev))

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
                lambda conn, ev: queries.purge_counted(conn, ended_before, keep_max, PURGE_BATCH)
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
