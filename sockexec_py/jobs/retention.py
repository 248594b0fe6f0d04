"""Deleting finished jobs: one asked for, and the retention passes. Plain functions
over an open connection, like :mod:`.queries`; the callers remove the output files
(of the job and of each of its steps)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from .errors import IllegalTransition
from .model import END_STATES
from .queries import _END_STATES_SQL, _locate

__all__ = ["delete_job", "purge", "purge_counted"]


def delete_job(conn: sqlite3.Connection, job_id: str) -> int:
    """Delete a finished job's record; returns how many steps it had (their output
    files go too). Error handling: :class:`IllegalTransition` for a job that has not
    finished."""
    seq, state = _locate(conn, job_id)
    if state not in END_STATES:
        raise IllegalTransition(job_id, state.value, "deleted")
    steps = conn.execute("SELECT steps FROM jobs WHERE seq = ?", (seq,)).fetchone()[0]
    conn.execute("DELETE FROM jobs WHERE seq = ?", (seq,))
    return int(steps)


def purge(
    conn: sqlite3.Connection, ended_before: float | None, keep_max: int | None, batch: int
) -> list[str]:
    """Delete at most ``batch`` finished jobs: those that ended before
    ``ended_before``, then the oldest beyond ``keep_max`` finished ones. Returns
    their ids (the caller removes their output files)."""
    return [job_id for job_id, _ in purge_counted(conn, ended_before, keep_max, batch)]


def purge_counted(
    conn: sqlite3.Connection, ended_before: float | None, keep_max: int | None, batch: int
) -> list[tuple[str, int]]:
    """:func:`purge`, each id with the number of steps the job had."""
    deleted: list[tuple[str, int]] = []

    def delete(rows: Iterable[tuple[int, str, int]]) -> None:
        for seq, job_id, steps in rows:
            conn.execute("DELETE FROM jobs WHERE seq = ?", (seq,))
            deleted.append((job_id, steps))

    if ended_before is not None:
        delete(
            conn.execute(
                f"""SELECT seq, id, steps FROM jobs
                    WHERE ended_at < ? AND state IN ({_END_STATES_SQL})
                    ORDER BY ended_at LIMIT ?""",
                (ended_before, batch),
            ).fetchall()
        )
    if keep_max is not None and len(deleted) < batch:
        finished = conn.execute(
            f"SELECT total(n) FROM state_counts WHERE state IN ({_END_STATES_SQL})"
        ).fetchone()[0]
        excess = min(int(finished) - keep_max, batch - len(deleted))
        if excess > 0:
            delete(
                conn.execute(
                    f"""SELECT seq, id, steps FROM jobs
                        WHERE ended_at IS NOT NULL AND state IN ({_END_STATES_SQL})
                        ORDER BY ended_at, id LIMIT ?""",
                    (excess,),
                ).fetchall()
            )
    return deleted
