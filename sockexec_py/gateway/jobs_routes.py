"""The jobs endpoints as declared on the typed API: paths, models, statuses and
the lines of the OpenAPI document; the handlers are :class:`~.jobs_api.JobsService`'s."""

from __future__ import annotations

from typing import Protocol

from .api import Api, Handler
from .models import JobAccepted, JobGetQuery, JobListQuery, JobPage, JobSubmit, JobView, OutputQuery
from .streaming import NDJSON, SSE

__all__ = ["JobHandlers", "register"]


class JobHandlers(Protocol):
    """The handlers of the jobs endpoints (:class:`~.jobs_api.JobsService` has them)."""

    @property
    def submit(self) -> Handler: ...
    @property
    def list_jobs(self) -> Handler: ...
    @property
    def show(self) -> Handler: ...
    @property
    def cancel(self) -> Handler: ...
    @property
    def cancel_step(self) -> Handler: ...
    @property
    def delete(self) -> Handler: ...
    @property
    def output(self) -> Handler: ...


def register(service: JobHandlers, api: Api) -> None:
    """Declare the jobs endpoints on ``api``, with their models and answers (the
    OpenAPI document is made from these declarations)."""
    common = (404, 503)
    api.route(
        "POST",
        "/v1/jobs",
        "Submit a job (answered once it is committed)",
        body=JobSubmit,
        answer=JobAccepted,
        status=202,
        errors=(429, 503),
        mode="jobs",
    )(service.submit)
    api.route(
        "GET",
        "/v1/jobs",
        "List jobs: filters, sort, cursor pages, totals per state",
        query=JobListQuery,
        answer=JobPage,
        errors=common,
        mode="jobs",
    )(service.list_jobs)
    api.route(
        "GET",
        "/v1/jobs/{job_id}",
        "A job's state, times, exit, output sizes and progress",
        query=JobGetQuery,
        answer=JobView,
        errors=common,
        mode="jobs",
    )(service.show)
    api.route(
        "POST",
        "/v1/jobs/{job_id}/cancel",
        "Cancel a job: a waiting one never starts, a running one is terminated "
        "through the broker (TERM, then KILL); answered once it is cancelled",
        answer=JobView,
        errors=(*common, 409),
        mode="jobs",
    )(service.cancel)
    api.route(
        "POST",
        "/v1/jobs/{job_id}/steps/{step:path}/cancel",  # a step's name may have a /
        "Cancel one step of a task: a queued one never runs, a running one is "
        "terminated (TERM, then KILL); its dependents are skipped. Answered once "
        "it has ended, with the task",
        answer=JobView,
        errors=(*common, 409),
        mode="jobs",
    )(service.cancel_step)
    api.route(
        "DELETE",
        "/v1/jobs/{job_id}",
        "Delete a finished job's record and output",
        status=204,
        errors=(*common, 409),
        mode="jobs",
    )(service.delete)
    api.route(
        "GET",
        "/v1/jobs/{job_id}/output",
        "A job's stored output; with follow=1 (or Accept: NDJSON/SSE) frames as they "
        "come, ending with the exit frame",
        query=OutputQuery,
        errors=common,
        mode="jobs",
        media={
            "application/octet-stream": "The stored bytes of the stream (not following)",
            NDJSON: 'One JSON frame per line: {"type": "stdout"|"stderr", "data" (or '
            '"data_b64"), "offset"}, {"type": "truncated"}, then {"type": "exit", '
            '"exitcode", "termsig", "state", "reason"} once the job has ended',
            SSE: "The same frames as server-sent events",
        },
    )(service.output)
