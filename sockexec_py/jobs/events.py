"""Job events: every change of a job (or of a task's step) recorded with an id, and
handed live to monitors.

Why events are rows written in the transaction of the change they describe: an
event is then committed exactly when its change is (a crash loses both or
neither), its id (``AUTOINCREMENT``: never reused, even after a purge) orders it
among all events, and a monitor that reconnects with ``since=<id>`` reads what it
missed from the table before it goes live. The store hands each committed group's
events to :meth:`EventHub.publish` in commit order (see :mod:`.store`), so live
events arrive in id order too.

Slow monitors never slow jobs: publishing appends to each subscriber's bounded
queue and returns; a subscriber whose queue is full is dropped (``overflowed``),
and its monitor reconnects with ``since``.
"""

from __future__ import annotations

import json
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from .document import progress_document, rfc3339
from .model import Job
from .steps import Step

__all__ = [
    "EVENT_TYPES",
    "MONITOR_QUEUE",
    "Event",
    "EventHub",
    "Subscription",
    "event_body",
    "events_after",
    "insert_event",
    "last_event_id",
    "purge_events",
]

#: Events a monitor connection may have waiting to be sent before it is dropped.
MONITOR_QUEUE = 4096
#: The types of job events (a monitor may ask for some of them only).
EVENT_TYPES = frozenset({"scheduled", "queued", "started", "progress", "finished"})


@dataclass(frozen=True, slots=True)
class Event:
    """A committed event: ``text`` is the JSON message sent to monitors (with its
    id); ``callback`` is true for a job's end whose callback became due."""

    id: int
    job_id: str
    name: str
    type: str
    text: str
    callback: bool = False


def event_body(kind: str, job: Job, at: float, step: Step | None = None) -> dict[str, Any]:
    """An event's message without its id: ``queued``/``scheduled`` (the job's state),
    ``started``, ``progress`` (the progress) or ``finished`` (the end state, exit,
    duration, reason and last progress) of a job, or with ``step`` of one of a
    task's steps."""
    body: dict[str, Any] = {"type": kind, "job": job.id, "name": job.name, "time": rfc3339(at)}
    if step is not None:
        body["step"] = step.name
    record: Job | Step = step if step is not None else job
    if kind == "progress":
        body["progress"] = progress_document(record.progress)
        return body
    body["state"] = record.state.value
    if kind == "finished":  # with the last progress: progress events are rate-limited
        body.update(
            exitcode=record.exitcode,
            termsig=record.termsig,
            duration=record.duration,
            reason=record.reason,
            progress=progress_document(record.progress),
        )
    return body


def _text(event_id: int, body: str) -> str:
    return f'{{"id":{event_id},{body[1:]}'


def insert_event(
    conn: sqlite3.Connection,
    at: float,
    job: Job,
    body: dict[str, Any],
    *,
    callback: bool = False,
) -> Event:
    """Record one event (inside the caller's transaction); returns it with its id."""
    encoded = json.dumps(body, separators=(",", ":"))
    row = conn.execute(
        "INSERT INTO job_events (at, job_id, name, body) VALUES (?, ?, ?, ?) RETURNING id",
        (at, job.id, job.name, encoded),
    ).fetchone()
    return Event(row[0], job.id, job.name, body["type"], _text(row[0], encoded), callback)


def events_after(
    conn: sqlite3.Connection, after: int, limit: int, name: str | None = None
) -> list[Event]:
    """Up to ``limit`` events with an id above ``after``, oldest first."""
    if name is None:
        rows = conn.execute(
            "SELECT id, job_id, name, body FROM job_events WHERE id > ? ORDER BY id LIMIT ?",
            (after, limit),
        )
    else:
        rows = conn.execute(
            """SELECT id, job_id, name, body FROM job_events WHERE name = ? AND id > ?
                ORDER BY id LIMIT ?""",
            (name, after, limit),
        )
    return [
        Event(event_id, job_id, job_name, json.loads(body)["type"], _text(event_id, body))
        for event_id, job_id, job_name, body in rows
    ]


def last_event_id(conn: sqlite3.Connection) -> int:
    """The id of the latest event ever recorded (0 if none), purged ones included."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'job_events'").fetchone()
    return int(row[0]) if row else 0


def first_event_id(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT min(id) FROM job_events").fetchone()
    return None if row[0] is None else int(row[0])


def purge_events(conn: sqlite3.Connection, before: float, batch: int) -> int:
    """Delete up to ``batch`` of the oldest events recorded before ``before``."""
    cursor = conn.execute(
        """DELETE FROM job_events WHERE id IN
            (SELECT id FROM job_events WHERE at < ? ORDER BY id LIMIT ?)""",
        (before, batch),
    )
    return cursor.rowcount


class Subscription:
    """One monitor's live events: a bounded queue the hub fills and the monitor
    drains. ``overflowed`` is set (and the hub forgets it) when the queue was full.

    ``name`` keeps only that job name's events; ``allowed`` (a predicate on names,
    a token's scope) and ``types`` (event types) filter the rest, before they take
    room in the queue.
    """

    def __init__(
        self,
        hub: EventHub,
        name: str | None,
        allowed: Callable[[str], bool] | None,
        limit: int,
        types: frozenset[str] | None = None,
    ) -> None:
        self._hub = hub
        self.name = name
        self.allowed = allowed
        self.types = types
        self.limit = limit
        self.queue: deque[Event] = deque()
        self.overflowed = False
        #: Set when it overflowed (the hub forgot it then).
        self.overflow = trio.Event()
        self._wake = trio.Event()

    def _offer(self, event: Event) -> bool:
        """In the hub (which offers only the types it asked for): queue ``event``;
        False when the queue was full."""
        if self.allowed is not None and not self.allowed(event.name):
            return True
        if len(self.queue) >= self.limit:
            self.overflowed = True
            self.queue.clear()
            self.overflow.set()
            self._wake.set()
            return False
        self.queue.append(event)
        self._wake.set()
        return True

    async def wait(self) -> None:
        """Until something is queued (or the subscription overflowed)."""
        if not self.queue and not self.overflowed:
            self._wake = trio.Event()
            await self._wake.wait()

    def take(self) -> list[Event]:
        events = list(self.queue)
        self.queue.clear()
        return events

    def close(self) -> None:
        self._hub._drop(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    """Hands committed events to live subscribers (monitors) and listeners (the
    callback deliverer). Everything runs in the trio thread; :meth:`publish` never
    waits."""

    def __init__(self, limit: int = MONITOR_QUEUE) -> None:
        self.limit = limit
        #: Subscribers by (name or None for every name, event type): an event is
        #: offered only to those that asked for its type (a thousand monitors of
        #: ``finished`` events cost nothing when a job is queued or starts).
        self._index: dict[tuple[str | None, str], set[Subscription]] = {}
        self._all: set[Subscription] = set()
        self._listeners: list[Callable[[Event], object]] = []
        #: Called when a subscriber is dropped for a full queue.
        self.on_overflow: Callable[[], object] = lambda: None

    def subscribe(
        self,
        name: str | None = None,
        allowed: Callable[[str], bool] | None = None,
        types: frozenset[str] | None = None,
    ) -> Subscription:
        subscription = Subscription(self, name, allowed, self.limit, types)
        for kind in types or EVENT_TYPES:
            self._index.setdefault((name, kind), set()).add(subscription)
        self._all.add(subscription)
        return subscription

    def add_listener(self, listener: Callable[[Event], object]) -> None:
        self._listeners.append(listener)

    @property
    def subscribers(self) -> int:
        return len(self._all)

    def _drop(self, subscription: Subscription) -> None:
        if subscription not in self._all:
            return
        self._all.discard(subscription)
        for kind in subscription.types or EVENT_TYPES:
            key = (subscription.name, kind)
            subs = self._index.get(key)
            if subs is not None:
                subs.discard(subscription)
                if not subs:
                    del self._index[key]

    def publish(self, events: Sequence[Event]) -> None:
        for event in events:
            for listener in self._listeners:
                listener(event)
            targets: Iterable[Subscription] = self._index.get((None, event.type), ())
            named = self._index.get((event.name, event.type))
            if named:
                targets = [*targets, *named]
            full = [sub for sub in targets if not sub._offer(event)]
            for subscription in full:
                self._drop(subscription)
                self.on_overflow()
