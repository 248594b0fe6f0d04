"""Callbacks as records: what is to be POSTed when a job ends, and every attempt.

The life of a callback, each change in the transaction of its cause:

1. ``waiting`` from the submit on (the URL was checked by the gateway).
2. ``pending`` in the transaction that ends the job (:func:`job_ended`): the body
   is the job's status as it ended (:func:`~.document.job_document`), stored, so
   every attempt, before or after a restart, sends the same bytes; ``next_at`` is
   now.
3. Each attempt appends to ``attempts`` (:func:`record_attempt`) and sets the next
   time, or ends it ``delivered`` or ``failed``. A restart finds pending rows and
   resumes them (:func:`due_callbacks`); one delivered is never sent again.

The HTTP side (signatures, SSRF checks, retries) is the gateway's
(:mod:`sockexec_py.gateway.callbacks`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from . import task_queries
from .document import Callback, CallbackAttempt, job_document
from .model import Job
from .steps import Step

__all__ = [
    "Delivery",
    "due_callbacks",
    "get_callback",
    "insert_callback",
    "job_ended",
    "record_attempt",
]


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one attempt needs: where, the exact body, the attempts so far and when
    the first was made."""

    job_id: str
    url: str
    body: bytes
    attempts: int
    first_at: float | None


def insert_callback(conn: sqlite3.Connection, job_id: str, url: str) -> None:
    conn.execute(
        "INSERT INTO job_callbacks (job_id, url, state) VALUES (?, ?, 'waiting')", (job_id, url)
    )


def job_ended(conn: sqlite3.Connection, job: Job, steps: Sequence[Step] | None, now: float) -> bool:
    """The job ended: its waiting callback becomes pending (rule 2), with the job's
    status (a task's steps read here unless given). True if it had one."""
    row = conn.execute(
        "SELECT 1 FROM job_callbacks WHERE job_id = ? AND state = 'waiting'", (job.id,)
    ).fetchone()
    if row is None:
        return False
    if steps is None and job.is_task:
        steps = task_queries.get_steps(conn, job.id)
    body = json.dumps(job_document(job, steps=steps), separators=(",", ":")).encode()
    conn.execute(
        "UPDATE job_callbacks SET state = 'pending', body = ?, next_at = ? WHERE job_id = ?",
        (body, now, job.id),
    )
    return True


def _attempts(text: str) -> tuple[CallbackAttempt, ...]:
    return tuple(
        CallbackAttempt(item["at"], item["status"], item["error"], item["duration"])
        for item in json.loads(text)
    )


def get_callback(conn: sqlite3.Connection, job_id: str) -> Callback | None:
    row = conn.execute(
        "SELECT url, state, attempts, next_at, delivered_at FROM job_callbacks WHERE job_id = ?",
        (job_id,),
    ).fetchone()
    if row is None:
        return None
    url, state, attempts, next_at, delivered_at = row
    return Callback(job_id, url, state, _attempts(attempts), next_at, delivered_at)


def due_callbacks(conn: sqlite3.Connection) -> list[tuple[str, float]]:
    """Every pending callback: (job id, next attempt time), soonest first."""
    rows = conn.execute(
        "SELECT job_id, next_at FROM job_callbacks WHERE state = 'pending' ORDER BY next_at"
    )
    return [(job_id, float(next_at)) for job_id, next_at in rows]


def delivery(conn: sqlite3.Connection, job_id: str) -> Delivery | None:
    """A pending callback's delivery, or None if it is not pending (any more)."""
    row = conn.execute(
        """SELECT url, body, json_array_length(attempts), json_extract(attempts, '$[0].at')
            FROM job_callbacks WHERE job_id = ? AND state = 'pending'""",
        (job_id,),
    ).fetchone()
    if row is None:
        return None
    return Delivery(job_id, row[0], bytes(row[1]), int(row[2]), row[3])


def record_attempt(
    conn: sqlite3.Connection,
    job_id: str,
    attempt: CallbackAttempt,
    *,
    next_at: float | None,
    delivered: bool,
) -> None:
    """Append an attempt; then ``delivered``, another try at ``next_at``, or (neither)
    ``failed``. A callback whose job is gone meanwhile is deleted once it ends."""
    row = conn.execute(
        "SELECT attempts FROM job_callbacks WHERE job_id = ? AND state = 'pending'", (job_id,)
    ).fetchone()
    if row is None:
        return
    attempts = json.loads(row[0])
    attempts.append(
        {
            "at": attempt.at,
            "status": attempt.status,
            "error": attempt.error,
            "duration": attempt.duration,
        }
    )
    state = "delivered" if delivered else "pending" if next_at is not None else "failed"
    conn.execute(
        """UPDATE job_callbacks SET state = ?, attempts = ?, next_at = ?, delivered_at = ?
            WHERE job_id = ?""",
        (state, json.dumps(attempts), next_at, attempt.at if delivered else None, job_id),
    )
    if state != "pending":
        exists = conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if exists is None:
            conn.execute("DELETE FROM job_callbacks WHERE job_id = ?", (job_id,))
