"""What a start finds of the previous run: jobs it was running are ``lost``; a task
loses its running steps instead and runs again if steps remain (rules of
:mod:`.model` and :mod:`.steps`). Plain functions over an open connection, like
:mod:`.queries`."""

from __future__ import annotations

import sqlite3
from dataclasses import replace

from . import callbacks, task_queries
from .events import Event
from .model import Job, JobState, check_transition
from .queries import Events, finish, get_job, record, requeue
from .steps import StepState, dependents_closure, dependents_of, task_end

__all__ = ["LOST_STEP_REASON", "mark_lost"]


def mark_lost(
    conn: sqlite3.Connection, now: float, reason: str, events: Events = None
) -> list[str]:
    """Every ``running`` job becomes ``lost`` with ``reason`` (at startup: nobody
    runs them any more). A task loses its running steps instead (their dependents
    are skipped) and goes back to the queue if steps remain to run, else it ends
    as its steps say (rule 4 of :mod:`.steps`). Returns the jobs that ended."""
    rows = conn.execute("SELECT seq, id FROM jobs WHERE state = 'running'").fetchall()
    ended: list[str] = []
    for seq, job_id in rows:
        job = get_job(conn, job_id)
        if job.is_task:
            if _lose_steps(conn, seq, job, now, events):
                requeue(conn, job_id, now, events)
                continue
            steps = task_queries.steps_of(conn, seq)
            state, task_reason, exitcode, termsig = task_end(steps, cancel_requested=False)
            finished = replace(
                job,
                state=state,
                ended_at=now,
                reason=task_reason,
                exitcode=exitcode,
                termsig=termsig,
            )
            finish(conn, finished, remove=False, events=events)
            ended.append(job_id)
            continue
        check_transition(job_id, JobState.RUNNING, JobState.LOST)
        conn.execute(
            "UPDATE jobs SET state = 'lost', ended_at = ?, reason = ? WHERE seq = ?",
            (now, reason, seq),
        )
        conn.execute("DELETE FROM job_stdin WHERE seq = ?", (seq,))
        lost = get_job(conn, job_id)
        pending = callbacks.job_ended(conn, lost, None, now)
        record(conn, events, "finished", lost, now, callback=pending)
        ended.append(job_id)
    return ended


#: The reason of a step found running at start-up.
LOST_STEP_REASON = "lost: the gateway stopped while it ran"


def _lose_steps(conn: sqlite3.Connection, seq: int, job: Job, now: float, events: Events) -> bool:
    """A task's running steps become ``lost`` and their dependents ``skipped``;
    True if steps remain queued (the task runs again)."""
    steps = task_queries.steps_of(conn, seq)
    states = {step.index: step.state for step in steps}
    dependents = dependents_of([step.depends_on for step in steps])
    changed = []
    for step in steps:
        if step.state is StepState.RUNNING:
            states[step.index] = StepState.LOST
            changed.append(
                replace(step, state=StepState.LOST, ended_at=now, reason=LOST_STEP_REASON)
            )
            for index in dependents_closure(dependents, step.index, states):
                states[index] = StepState.SKIPPED
                changed.append(
                    replace(
                        steps[index],
                        state=StepState.SKIPPED,
                        ended_at=now,
                        reason=f"skipped: step {step.name!r} was lost",
                    )
                )
    sink: list[Event] = []
    task_queries.end_steps(conn, job, changed, now, sink)
    if events is not None:
        events.extend(sink)
    return any(state is StepState.QUEUED for state in states.values())
