"""How jobs look on the wire: the answer models built from the jobs layer's records,
times as RFC 3339, the exit frame of a finished job, the list filters of the query,
and the jobs layer's errors mapped onto HTTP answers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sockexec_py.jobs import (
    IllegalTransition,
    InvalidField,
    Job,
    JobNotFound,
    QueueFull,
    StoreUnavailable,
    parse_start_at,
)

from .models import JobView, ProgressView
from .request import HTTPError


@contextmanager
def job_errors() -> Iterator[None]:
    """The jobs layer's errors as HTTP answers (each message is already one line)."""
    try:
        yield
    except InvalidField as exc:
        raise HTTPError(400, "bad_request", f"{exc.field}: {exc.detail}") from None
    except JobNotFound as exc:
        raise HTTPError(404, "not_found", str(exc)) from None
    except IllegalTransition as exc:
        raise HTTPError(409, "conflict", str(exc)) from None
    except QueueFull as exc:
        raise HTTPError(429, "queue_full", str(exc)) from None
    except StoreUnavailable as exc:
        raise HTTPError(503, "store_unavailable", str(exc)) from None


def rfc3339(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return (
        datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def job_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


def job_view(job: Job, position: int | None = None) -> JobView:
    progress = job.progress
    return JobView(
        id=job.id,
        name=job.name,
        argv=list(job.argv),
        labels=dict(job.labels),
        state=job.state.value,
        position=position,
        created_at=rfc3339(job.created_at) or "",
        start_at=rfc3339(job.start_at),
        started_at=rfc3339(job.started_at),
        ended_at=rfc3339(job.ended_at),
        duration=job.duration,
        timeout=job.timeout,
        keep=job.keep,
        exitcode=job.exitcode,
        termsig=job.termsig,
        reason=job.reason,
        stdout_bytes=job.stdout_bytes,
        stderr_bytes=job.stderr_bytes,
        dropped_bytes=job.dropped_bytes,
        truncated=job.truncated,
        progress=ProgressView(
            task=progress.task,
            tasks=progress.tasks,
            title=progress.title,
            percent=progress.percent,
            step=progress.step,
        ),
        url=job_url(job.id),
    )


def exit_frame(job: Job) -> dict[str, Any]:
    """The last frame of a finished job's output: the exit, with the job's end."""
    return {
        "type": "exit",
        "exitcode": job.exitcode,
        "termsig": job.termsig,
        "state": job.state.value,
        "reason": job.reason,
    }


def time_filter(text: str | None, field: str) -> float | None:
    if text is None:
        return None
    try:
        number: object = float(text)
    except ValueError:
        number = text
    return parse_start_at(number, field)


def label_filter(pairs: list[str]) -> dict[str, str] | None:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidField("label", f"expected KEY=VALUE, got {pair[:70]!r}")
        labels[key] = value
    return labels or None
