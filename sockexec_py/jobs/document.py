"""A job's status as JSON: what ``GET /v1/jobs/{id}`` answers, what a callback
POSTs and what monitor events carry, built in one place from the records (the
gateway validates it against its answer models, so the OpenAPI document describes
exactly this). Times are RFC 3339 in UTC with milliseconds. No I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .model import Job
from .progress import Progress
from .steps import Step

__all__ = [
    "Callback",
    "CallbackAttempt",
    "job_document",
    "job_url",
    "progress_document",
    "rfc3339",
    "step_document",
]


@dataclass(frozen=True, slots=True)
class CallbackAttempt:
    """One POST of a callback: when, the HTTP status (None: no answer), the error
    line (None: delivered) and how long it took (seconds)."""

    at: float
    status: int | None
    error: str | None
    duration: float


@dataclass(frozen=True, slots=True)
class Callback:
    """A job's callback: ``waiting`` (the job has not ended), ``pending`` (to be
    delivered: ``next_at`` is the next attempt), ``delivered`` or ``failed`` (gave
    up: the attempts say why)."""

    job_id: str
    url: str
    state: str
    attempts: tuple[CallbackAttempt, ...] = ()
    next_at: float | None = None
    delivered_at: float | None = None


def rfc3339(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return (
        datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def job_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


def progress_document(progress: Progress) -> dict[str, Any]:
    return {
        "task": progress.task,
        "tasks": progress.tasks,
        "title": progress.title,
        "percent": progress.percent,
        "step": progress.step,
    }


def step_document(step: Step, names: Sequence[str]) -> dict[str, Any]:
    """One step; ``names`` are the task's step names (its dependencies by name)."""
    return {
        "name": step.name,
        "argv": list(step.argv),
        "depends_on": [names[i] for i in step.depends_on],
        "state": step.state.value,
        "started_at": rfc3339(step.started_at),
        "ended_at": rfc3339(step.ended_at),
        "duration": step.duration,
        "timeout": step.timeout,
        "exitcode": step.exitcode,
        "termsig": step.termsig,
        "reason": step.reason,
        "stdout_bytes": step.stdout_bytes,
        "stderr_bytes": step.stderr_bytes,
        "dropped_bytes": step.dropped_bytes,
        "truncated": step.truncated,
        "progress": progress_document(step.progress),
    }


def callback_document(callback: Callback) -> dict[str, Any]:
    return {
        "url": callback.url,
        "state": callback.state,
        "attempts": [
            {
                "at": rfc3339(attempt.at),
                "status": attempt.status,
                "error": attempt.error,
                "duration": attempt.duration,
            }
            for attempt in callback.attempts
        ],
        "next_attempt_at": rfc3339(callback.next_at),
        "delivered_at": rfc3339(callback.delivered_at),
    }


def job_document(
    job: Job,
    *,
    position: int | None = None,
    steps: Sequence[Step] | None = None,
    callback: Callback | None = None,
) -> dict[str, Any]:
    """The job's status. ``steps`` (a task's, in order) and ``callback`` are included
    when given: a listing leaves the steps out, a callback body its own delivery."""
    document: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "argv": list(job.argv),
        "labels": dict(job.labels),
        "state": job.state.value,
        "position": position,
        "created_at": rfc3339(job.created_at) or "",
        "start_at": rfc3339(job.start_at),
        "started_at": rfc3339(job.started_at),
        "ended_at": rfc3339(job.ended_at),
        "duration": job.duration,
        "timeout": job.timeout,
        "keep": job.keep,
        "exitcode": job.exitcode,
        "termsig": job.termsig,
        "reason": job.reason,
        "stdout_bytes": job.stdout_bytes,
        "stderr_bytes": job.stderr_bytes,
        "dropped_bytes": job.dropped_bytes,
        "truncated": job.truncated,
        "progress": progress_document(job.progress),
        "url": job_url(job.id),
        "mode": job.mode,
    }
    if steps is not None:
        names = [step.name for step in steps]
        document["steps"] = [step_document(step, names) for step in steps]
    if callback is not None:
        document["callback"] = callback_document(callback)
    return document
