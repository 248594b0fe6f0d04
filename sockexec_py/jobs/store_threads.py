"""The job store's threads: one writer that commits groups of changes, and a pool of
read-only connections used from trio's worker threads (the why is :mod:`.store`'s).

Error handling: SQLite and OS errors that mean the disk cannot take the write become
:class:`~.errors.StoreUnavailable` with one line, after a rollback.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import outcome
import trio

from .errors import JobError, StoreUnavailable
from .events import Event
from .schema import connect

__all__ = ["MAX_GROUP", "Readers", "Writer", "unavailable"]

#: Changes committed together at most (bounds a group's transaction time).
MAX_GROUP = 64

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


class Writer:
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


class Readers:
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
