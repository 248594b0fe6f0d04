"""How jobs look on the wire: the answer models built from the jobs layer's records,
times as RFC 3339, the exit frame of a finished job, the list filters of the query, and
the jobs layer's errors mapped onto HTTP answers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
from sockexec_py.jobs.document import Callback, job_document, job_url, rfc3339
from sockexec_py.jobs.steps import Step

from .models import JobView
from .request import HTTPError

__all__ = [
    "exit_frame",
    "job_errors",
    "job_url",
    "job_view",
    "label_filter",
    "rfc3339",
    "time_filter",
]


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


def job_view(
    job: Job,
    position: int | None = None,
    *,
    steps: Sequence[Step] | None = None,
    callback: Callback | None = None,
) -> JobView:
    """The answer model of a job (built from the jobs layer's document, the one a
    callback POSTs, so both say the same)."""
    return JobView.model_validate(
        job_document(job, position=position, steps=steps, callback=callback)
    )


def exit_frame(job: Job | Step) -> dict[str, Any]:
    """The last frame of a finished job's (or step's) output: the exit, with its end."""
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
