"""The store's statements (all but the listing, :mod:`.listing`), as plain functions
over an open connection.

No threads and no trio here: :mod:`.store` decides where each function runs (the
writer thread inside a transaction, or a reader connection), these only say what
is read and written. A function that changes a job's state calls
:func:`~.model.check_transition` between reading the row and writing it, inside the
caller's transaction, so the state machine's rules hold under any interleaving.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from . import callbacks, task_queries
from .errors import IllegalTransition, JobNotFound, QueueFull
from .events import Event, event_body, insert_event
from .model import END_STATES, WAITING_STATES, Job, JobState, check_transition
from .progress import Progress
from .request import SubmitRequest
from .steps import StepState

#: Where each change's events go: the caller's list (the store publishes them
#: once committed), or nowhere (the events are recorded all the same).
Events = list[Event] | None

_NAMES = (
    "id name argv labels state created_at start_at started_at ended_at timeout keep "
    "exitcode termsig reason stdout_bytes stderr_bytes dropped_bytes truncated "
    "progress_task progress_tasks progress_title progress_percent progress_step mode steps"
)
#: Qualified: the listing joins job_labels, which has some of these names too.
COLUMNS = ", ".join(f"jobs.{column}" for column in _NAMES.split())
_END_STATES_SQL = ", ".join(f"'{state.value}'" for state in sorted(END_STATES))


def job_from_row(row: Sequence[Any]) -> Job:
    return Job(
        id=row[0],
        name=row[1],
        argv=tuple(json.loads(row[2])),
        labels=json.loads(row[3]),
        state=JobState(row[4]),
        created_at=row[5],
        start_at=row[6],
        started_at=row[7],
        ended_at=row[8],
        timeout=row[9],
        keep=bool(row[10]),
        exitcode=row[11],
        termsig=row[12],
        reason=row[13],
        stdout_bytes=row[14],
        stderr_bytes=row[15],
        dropped_bytes=row[16],
        truncated=bool(row[17]),
        progress=Progress(row[18], row[19], row[20], row[21], row[22]),
        mode=row[23],
        steps=row[24],
    )


def record(
    conn: sqlite3.Connection,
    events: Events,
    kind: str,
    job: Job,
    now: float,
    *,
    callback: bool = False,
) -> None:
    """Record the job's event ``kind`` (and hand it to ``events``)."""
    event = insert_event(conn, now, job, event_body(kind, job, now), callback=callback)
    if events is not None:
        events.append(event)


def _locate(conn: sqlite3.Connection, job_id: str) -> tuple[int, JobState]:
    row = conn.execute("SELECT seq, state FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise JobNotFound(job_id)
    return row[0], JobState(row[1])


def get_job(conn: sqlite3.Connection, job_id: str) -> Job:
    row = conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise JobNotFound(job_id)
    return job_from_row(row)


def _waiting(conn: sqlite3.Connection, name: str, limit: int) -> int:
    """Queued and scheduled jobs of ``name``, counted up to ``limit`` (bounded work)."""
    row = conn.execute(
        """SELECT
            (SELECT count(*) FROM (SELECT 1 FROM jobs
                WHERE state = 'queued' AND name = ?1 LIMIT ?2))
          + (SELECT count(*) FROM (SELECT 1 FROM jobs
                WHERE state = 'scheduled' AND name = ?1 LIMIT ?2))""",
        (name, limit),
    ).fetchone()
    return int(row[0])


def insert_job(
    conn: sqlite3.Connection,
    job_id: str,
    request: SubmitRequest,
    now: float,
    max_waiting: int | None,
    events: Events = None,
) -> Job:
    """Record a new job (``scheduled`` or ``queued``) with its labels and stdin, a
    task's steps, a callback, and its first event.

    Error handling: :class:`QueueFull` when ``name`` already has ``max_waiting``
    jobs waiting; nothing is written then.
    """
    if max_waiting is not None and _waiting(conn, request.name, max_waiting) >= max_waiting:
        raise QueueFull(request.name, max_waiting)
    state = request.initial_state(now)
    cursor = conn.execute(
        """INSERT INTO jobs (id, name, argv, labels, state, created_at, start_at, queued_at,
            timeout, keep, mode, steps) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            job_id,
            request.name,
            json.dumps(request.argv),
            json.dumps(dict(request.labels), sort_keys=True),
            state.value,
            now,
            request.start_at,
            now if state is JobState.QUEUED else None,
            request.timeout,
            request.keep,
            request.mode,
            len(request.steps),
        ),
    )
    seq = cursor.lastrowid
    assert seq is not None
    conn.executemany(
        "INSERT INTO job_labels (key, value, created_at, id, seq) VALUES (?, ?, ?, ?, ?)",
        [(key, value, now, job_id, seq) for key, value in request.labels.items()],
    )
    if request.stdin:
        conn.execute("INSERT INTO job_stdin (seq, data) VALUES (?, ?)", (seq, request.stdin))
    if request.steps:
        task_queries.insert_steps(conn, seq, request.steps)
    if request.callback_url is not None:
        callbacks.insert_callback(conn, job_id, request.callback_url)
    job = get_job(conn, job_id)
    record(conn, events, state.value, job, now)
    return job


def get_stdin(conn: sqlite3.Connection, job_id: str) -> bytes:
    row = conn.execute(
        "SELECT data FROM job_stdin JOIN jobs USING (seq) WHERE jobs.id = ?", (job_id,)
    ).fetchone()
    return bytes(row[0]) if row is not None else b""


def queue_position(conn: sqlite3.Connection, job_id: str) -> int | None:
    """How many jobs of its name are ahead of a queued job (0: it starts next);
    ``None`` for a job that is not queued."""
    row = conn.execute(
        "SELECT seq, name, queued_at FROM jobs WHERE id = ? AND state = 'queued'", (job_id,)
    ).fetchone()
    if row is None:
        _locate(conn, job_id)  # JobNotFound for an unknown id
        return None
    seq, name, queued_at = row
    ahead = conn.execute(
        """SELECT count(*) FROM jobs WHERE state = 'queued' AND name = ?
            AND (queued_at, seq) < (?, ?)""",
        (name, queued_at, seq),
    ).fetchone()
    return int(ahead[0])


def state_counts(conn: sqlite3.Connection) -> dict[JobState, int]:
    counts = {state: 0 for state in JobState}
    for state, count in conn.execute("SELECT state, n FROM state_counts"):
        counts[JobState(state)] = count
    return counts


def queue_lengths(conn: sqlite3.Connection) -> dict[str, int]:
    """Queued jobs per name (names with none are absent)."""
    rows = conn.execute("SELECT name, count(*) FROM jobs WHERE state = 'queued' GROUP BY name")
    return {name: count for name, count in rows}


def claim(
    conn: sqlite3.Connection,
    now: float,
    slots: int,
    running: Mapping[str, int],
    limits: Mapping[str, int],
    default_limit: int,
    events: Events = None,
) -> list[Job]:
    """Move up to ``slots`` queued jobs to ``running``, oldest first, without letting
    any name pass its limit (``running`` counts what each name runs already)."""

    def room(name: str) -> int:
        return limits.get(name, default_limit) - running.get(name, 0) - taken.get(name, 0)

    taken: dict[str, int] = {}
    full = sorted(name for name in {*running, *limits} if room(name) <= 0)
    exclude = f"AND name NOT IN ({', '.join('?' * len(full))})" if full else ""
    chosen: list[tuple[int, str]] = []
    rows = conn.execute(
        f"""SELECT seq, id, name FROM jobs WHERE state = 'queued' {exclude}
            ORDER BY queued_at, seq""",
        full,
    )
    for seq, job_id, name in rows:
        if len(chosen) >= slots:
            break
        if room(name) > 0:
            taken[name] = taken.get(name, 0) + 1
            chosen.append((seq, job_id))
    rows.close()
    jobs = []
    for seq, job_id in chosen:
        check_transition(job_id, JobState.QUEUED, JobState.RUNNING)
        conn.execute("UPDATE jobs SET state = 'running', started_at = ? WHERE seq = ?", (now, seq))
        job = get_job(conn, job_id)
        record(conn, events, "started", job, now)
        jobs.append(job)
    return jobs


def claim_with_stdin(
    conn: sqlite3.Connection,
    now: float,
    slots: int,
    running: Mapping[str, int],
    limits: Mapping[str, int],
    default_limit: int,
    events: Events = None,
) -> list[tuple[Job, bytes]]:
    """:func:`claim`, each job with its stdin (read in the same transaction: the
    runner needs it at once, and a read of its own would cost a thread hop)."""
    jobs = claim(conn, now, slots, running, limits, default_limit, events)
    return [(job, get_stdin(conn, job.id)) for job in jobs]


def requeue(
    conn: sqlite3.Connection, job_id: str, now: float | None = None, events: Events = None
) -> None:
    """``running → queued`` (the broker was unreachable); the job keeps its
    ``queued_at``, hence its place in the queue."""
    seq, state = _locate(conn, job_id)
    check_transition(job_id, state, JobState.QUEUED)
    conn.execute("UPDATE jobs SET state = 'queued', started_at = NULL WHERE seq = ?", (seq,))
    job = get_job(conn, job_id)
    record(conn, events, "queued", job, job.created_at if now is None else now)


def promote_due(conn: sqlite3.Connection, now: float, events: Events = None) -> list[str]:
    """``scheduled → queued`` for every job whose start is due; each queues at its
    ``start_at`` (not at the moment this runs), so FIFO order follows the schedule."""
    rows = conn.execute(
        """SELECT seq, id FROM jobs WHERE state = 'scheduled' AND start_at <= ?
            ORDER BY start_at""",
        (now,),
    ).fetchall()
    for seq, job_id in rows:
        check_transition(job_id, JobState.SCHEDULED, JobState.QUEUED)
        conn.execute("UPDATE jobs SET state = 'queued', queued_at = start_at WHERE seq = ?", (seq,))
        record(conn, events, "queued", get_job(conn, job_id), now)
    return [job_id for _, job_id in rows]


def next_start(conn: sqlite3.Connection) -> float | None:
    row = conn.execute("SELECT min(start_at) FROM jobs WHERE state = 'scheduled'").fetchone()
    return None if row[0] is None else float(row[0])


def cancel_waiting(
    conn: sqlite3.Connection, job_id: str, now: float, reason: str, events: Events = None
) -> Job:
    """A ``scheduled`` or ``queued`` job becomes ``cancelled``; it never starts.

    Error handling: :class:`IllegalTransition` for any other state (a running job is
    the runner's to terminate; a finished one is a conflict).
    """
    seq, state = _locate(conn, job_id)
    if state not in WAITING_STATES:
        raise IllegalTransition(job_id, state.value, JobState.CANCELLED.value)
    check_transition(job_id, state, JobState.CANCELLED)
    conn.execute(
        "UPDATE jobs SET state = 'cancelled', ended_at = ?, reason = ? WHERE seq = ?",
        (now, reason, seq),
    )
    conn.execute("DELETE FROM job_stdin WHERE seq = ?", (seq,))
    job = get_job(conn, job_id)
    if job.is_task:
        steps = task_queries.steps_of(conn, seq)
        cancelled = [
            replace(step, state=StepState.CANCELLED, ended_at=now, reason=reason)
            for step in steps
            if step.state is StepState.QUEUED
        ]
        sink: list[Event] = []
        task_queries.end_steps(conn, job, cancelled, now, sink)
        if events is not None:
            events.extend(sink)
    pending = callbacks.job_ended(conn, job, None, now)
    record(conn, events, "finished", job, now, callback=pending)
    return job


def save_progress(
    conn: sqlite3.Connection, job: Job, now: float | None = None, events: Events = None
) -> None:
    """Write a running job's output sizes and progress (a no-op once it ended); with
    ``now``, record a progress event too."""
    progress = job.progress
    cursor = conn.execute(
        """UPDATE jobs SET stdout_bytes = ?, stderr_bytes = ?, dropped_bytes = ?,
            truncated = ?, progress_task = ?, progress_tasks = ?, progress_title = ?,
            progress_percent = ?, progress_step = ?
            WHERE id = ? AND state = 'running'""",
        (
            job.stdout_bytes,
            job.stderr_bytes,
            job.dropped_bytes,
            job.truncated,
            progress.task,
            progress.tasks,
            progress.title,
            progress.percent,
            progress.step,
            job.id,
        ),
    )
    if now is not None and cursor.rowcount:
        record(conn, events, "progress", job, now)


def finish(conn: sqlite3.Connection, job: Job, *, remove: bool, events: Events = None) -> None:
    """Record how a running job ended: ``job`` carries the end state, the exit pair,
    the reason, sizes and progress. ``remove`` deletes the record instead (a
    successful job submitted with ``keep=false``). Its callback becomes due, with
    the job's status as it ended (before a removal)."""
    seq, state = _locate(conn, job.id)
    check_transition(job.id, state, job.state)
    now = job.ended_at if job.ended_at is not None else job.created_at
    pending = callbacks.job_ended(conn, job, None, now)
    record(conn, events, "finished", job, now, callback=pending)
    if remove:
        conn.execute("DELETE FROM jobs WHERE seq = ?", (seq,))
        return
    save_progress(conn, job)
    conn.execute(
        """UPDATE jobs SET state = ?, ended_at = ?, exitcode = ?, termsig = ?, reason = ?
            WHERE seq = ?""",
        (job.state.value, job.ended_at, job.exitcode, job.termsig, job.reason, seq),
    )
    conn.execute("DELETE FROM job_stdin WHERE seq = ?", (seq,))
