"""The statements of a task's steps (see :mod:`.steps` for their rules), as plain
functions over an open connection, like :mod:`.queries`. Each change records its
event (:mod:`.events`) in the same transaction, appended to ``events``."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .errors import IllegalTransition, JobNotFound
from .events import Event, event_body, insert_event
from .model import Job
from .progress import Progress
from .steps import Step, StepRequest, StepState

_STEP_COLUMNS = (
    "idx, name, argv, depends_on, timeout, state, started_at, ended_at, exitcode, termsig, "
    "reason, stdout_bytes, stderr_bytes, dropped_bytes, truncated, progress_task, "
    "progress_tasks, progress_title, progress_percent, progress_step"
)


def step_from_row(row: Sequence[Any]) -> Step:
    return Step(
        index=row[0],
        name=row[1],
        argv=tuple(json.loads(row[2])),
        depends_on=tuple(json.loads(row[3])),
        timeout=row[4],
        state=StepState(row[5]),
        started_at=row[6],
        ended_at=row[7],
        exitcode=row[8],
        termsig=row[9],
        reason=row[10],
        stdout_bytes=row[11],
        stderr_bytes=row[12],
        dropped_bytes=row[13],
        truncated=bool(row[14]),
        progress=Progress(row[15], row[16], row[17], row[18], row[19]),
    )


def insert_steps(conn: sqlite3.Connection, seq: int, steps: Sequence[StepRequest]) -> None:
    conn.executemany(
        """INSERT INTO job_steps (seq, idx, name, argv, depends_on, timeout, state)
            VALUES (?, ?, ?, ?, ?, ?, 'queued')""",
        [
            (seq, i, step.name, json.dumps(step.argv), json.dumps(step.depends_on), step.timeout)
            for i, step in enumerate(steps)
        ],
    )
    conn.executemany(
        "INSERT INTO step_stdin (seq, idx, data) VALUES (?, ?, ?)",
        [(seq, i, step.stdin) for i, step in enumerate(steps) if step.stdin],
    )


def _seq(conn: sqlite3.Connection, job_id: str) -> int:
    row = conn.execute("SELECT seq FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise JobNotFound(job_id)
    return int(row[0])


def steps_of(conn: sqlite3.Connection, seq: int) -> list[Step]:
    rows = conn.execute(
        f"SELECT {_STEP_COLUMNS} FROM job_steps WHERE seq = ? ORDER BY idx", (seq,)
    ).fetchall()
    return [step_from_row(row) for row in rows]


def get_steps(conn: sqlite3.Connection, job_id: str) -> list[Step]:
    return steps_of(conn, _seq(conn, job_id))


def step_stdin(conn: sqlite3.Connection, job_id: str, index: int) -> bytes:
    row = conn.execute(
        """SELECT data FROM step_stdin JOIN jobs USING (seq)
            WHERE jobs.id = ? AND step_stdin.idx = ?""",
        (job_id, index),
    ).fetchone()
    return bytes(row[0]) if row is not None else b""


def _write_step(conn: sqlite3.Connection, seq: int, step: Step) -> None:
    progress = step.progress
    conn.execute(
        """UPDATE job_steps SET state = ?, started_at = ?, ended_at = ?, exitcode = ?,
            termsig = ?, reason = ?, stdout_bytes = ?, stderr_bytes = ?, dropped_bytes = ?,
            truncated = ?, progress_task = ?, progress_tasks = ?, progress_title = ?,
            progress_percent = ?, progress_step = ? WHERE seq = ? AND idx = ?""",
        (
            step.state.value,
            step.started_at,
            step.ended_at,
            step.exitcode,
            step.termsig,
            step.reason,
            step.stdout_bytes,
            step.stderr_bytes,
            step.dropped_bytes,
            step.truncated,
            progress.task,
            progress.tasks,
            progress.title,
            progress.percent,
            progress.step,
            seq,
            step.index,
        ),
    )


def _current_state(conn: sqlite3.Connection, seq: int, index: int, job_id: str) -> StepState:
    row = conn.execute(
        "SELECT state FROM job_steps WHERE seq = ? AND idx = ?", (seq, index)
    ).fetchone()
    if row is None:
        raise JobNotFound(f"{job_id} step {index}")
    return StepState(row[0])


def start_step(
    conn: sqlite3.Connection, job: Job, step: Step, now: float, events: list[Event]
) -> Step:
    """``queued → running`` for one step of a running task."""
    seq = _seq(conn, job.id)
    current = _current_state(conn, seq, step.index, job.id)
    if current is not StepState.QUEUED:
        raise IllegalTransition(f"{job.id} step {step.name!r}", current.value, "running")
    started = replace(step, state=StepState.RUNNING, started_at=now)
    _write_step(conn, seq, started)
    events.append(insert_event(conn, now, job, event_body("started", job, now, started)))
    return started


def end_steps(
    conn: sqlite3.Connection,
    job: Job,
    ended: Sequence[Step],
    now: float,
    events: list[Event],
    *,
    waiting: bool = False,
) -> None:
    """Record steps' ends (each carries its end state, exit, reason, sizes): a step
    that ran, and those skipped or cancelled with it. A step already ended is left
    as it is (a cancel that raced its end). With ``waiting`` (a step of a task that
    waits, cancelled), :class:`IllegalTransition` if the task runs by now: the
    runner claimed it meanwhile, and the cancel goes to the running task."""
    seq = _seq(conn, job.id)
    if waiting:
        row = conn.execute("SELECT state FROM jobs WHERE seq = ?", (seq,)).fetchone()
        if row[0] == "running":
            raise IllegalTransition(job.id, "running", "cancelled")
    for step in ended:
        current = _current_state(conn, seq, step.index, job.id)
        if current not in (StepState.QUEUED, StepState.RUNNING):
            continue
        _write_step(conn, seq, step)
        conn.execute("DELETE FROM step_stdin WHERE seq = ? AND idx = ?", (seq, step.index))
        events.append(insert_event(conn, now, job, event_body("finished", job, now, step)))


def save_step_progress(
    conn: sqlite3.Connection, job: Job, step: Step, now: float, events: list[Event] | None
) -> None:
    """A running step's sizes and progress; with ``events``, a progress event too."""
    seq = _seq(conn, job.id)
    if _current_state(conn, seq, step.index, job.id) is not StepState.RUNNING:
        return
    _write_step(conn, seq, step)
    if events is not None:
        events.append(insert_event(conn, now, job, event_body("progress", job, now, step)))
