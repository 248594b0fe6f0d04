"""Jobs through the gateway (``/v1/jobs``, a gateway started with ``--data-dir``):
submit a program, then check on it, wait for it, follow its output or cancel it,
from this process or any other that knows its id. Blocking and trio flavours.

>>> job = submit("http://127.0.0.1:8080", ["sh", "-c", "echo hi"])   # doctest: +SKIP
>>> job.wait().state, b"".join(f.data for f in job.output() if isinstance(f, Output))
('succeeded', b'hi\\n')

A job is only its id and where its gateway is: :class:`Job` (blocking) and
:class:`AsyncJob` (trio) hold no connection between calls. ``status()`` and ``wait()``
return a :class:`JobStatus`; ``output()`` gives the job's frames as the gateway
stores them, ``Output(kind, data)`` (bytes exact) and, once it has ended with an exit
status, ``Exited`` last; ``follow=True`` goes on until the job ends.

Error handling: the gateway's answers as typed errors, all :class:`GatewayRefused`
(hence :class:`~sockexec_py.errors.ProtocolError`, :class:`SockexecError`):
:class:`JobNotFound` (404), :class:`JobConflict` (409: cancelling a finished job,
deleting an unfinished one), :class:`QueueFull` (429); 400 is a plain
:class:`GatewayRefused` naming the field, 503 :class:`BrokerUnavailable` (the job
store or the broker), and a gateway that cannot be reached :class:`BrokerUnavailable`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

from sockexec_py.errors import Timeout

from ._common import Frame
from ._jobs_trio import AsyncJob, alist_jobs, asubmit
from ._jobs_wire import (
    _ANSWER_GRACE,
    _POLL,
    JobConflict,
    JobNotFound,
    JobPage,
    JobStatus,
    QueueFull,
    StepSpec,
    View,
    _frame,
    _gateway,
    _list_target,
    _output_target,
    _page,
    _refuse,
    _submit_body,
)
from ._monitor import MonitorEvent, amonitor, monitor

__all__ = [
    "AsyncJob",
    "Job",
    "JobConflict",
    "JobNotFound",
    "JobPage",
    "JobStatus",
    "MonitorEvent",
    "QueueFull",
    "StepSpec",
    "alist_jobs",
    "amonitor",
    "asubmit",
    "list_jobs",
    "monitor",
    "submit",
]


class Job:
    """A job of the gateway at ``url`` (blocking calls; see the module docstring)."""

    def __init__(self, url: str, job_id: str, *, token: str | None = None) -> None:
        self.url = _gateway(url)
        self.id = job_id
        self.token = token

    def __repr__(self) -> str:
        return f"Job({self.url!r}, {self.id!r})"

    def _call(self, method: str, target: str, *, timeout: float | None = None) -> Any:
        from . import _rest

        return _rest.call(
            self.url, method, target, token=self.token, timeout=timeout, refuse=_refuse
        )

    def status(self) -> JobStatus:
        return JobStatus.from_json(self._call("GET", f"/v1/jobs/{quote(self.id)}"))

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Until the job has ended (long polls of the gateway, no busy loop).

        Error handling: :class:`~sockexec_py.errors.Timeout` after ``timeout``
        seconds; the job goes on.
        """
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"job {self.id} did not finish within {timeout:g} s")
            poll = min(_POLL, left)
            status = JobStatus.from_json(
                self._call(
                    "GET",
                    f"/v1/jobs/{quote(self.id)}?wait={poll:.3f}",
                    timeout=poll + _ANSWER_GRACE,
                )
            )
            if status.finished:
                return status

    def cancel(self) -> JobStatus:
        """Cancel it (a running job is terminated: TERM, then KILL); its end status.

        Error handling: :class:`JobConflict` if it had already ended."""
        return JobStatus.from_json(self._call("POST", f"/v1/jobs/{quote(self.id)}/cancel"))

    def delete(self) -> None:
        """Delete a finished job's record and output (:class:`JobConflict` otherwise)."""
        self._call("DELETE", f"/v1/jobs/{quote(self.id)}")

    def cancel_step(self, name: str) -> JobStatus:
        """Stop one step of a task (its dependents are skipped); the task's status
        once the step has ended. :class:`JobConflict` if it had ended already."""
        target = f"/v1/jobs/{quote(self.id)}/steps/{quote(name, safe='')}/cancel"
        return JobStatus.from_json(self._call("POST", target))

    def output(
        self,
        follow: bool = True,
        *,
        stream: View = "both",
        offset: int = 0,
        step: str | None = None,
    ) -> Iterator[Frame]:
        """The job's (or one ``step``'s) output frames from ``offset`` of ``stream``;
        with ``follow``, until it ends (a waiting one is waited for). Leaving the
        loop early closes the connection (use the generator in a ``with
        contextlib.closing`` to be sure it happens at once)."""
        from . import _rest

        target = _output_target(self.id, follow, stream, offset, step)
        for message in _rest.lines(self.url, target, token=self.token, refuse=_refuse):
            frame = _frame(message)
            if frame is not None:
                yield frame


def submit(
    target: str,
    argv: Sequence[str | bytes] | None = None,
    *,
    stdin: bytes | str | None = None,
    name: str | None = None,
    start_at: datetime | float | str | None = None,
    timeout: float | None = None,
    labels: Mapping[str, str] | None = None,
    keep: bool = True,
    token: str | None = None,
    steps: Sequence[StepSpec] | None = None,
    mode: Literal["sequential", "parallel", "dag"] | None = None,
    callback: str | None = None,
) -> Job:
    """Submit ``argv`` as a job of the gateway at ``target``; returns once the
    gateway has committed it. ``start_at`` (an aware datetime, RFC 3339 text or Unix
    time) schedules it; ``timeout`` bounds its run; ``name`` is its queue (default
    argv[0]); ``keep=False`` deletes it once it succeeded. The token defaults to
    ``$SOCKEXEC_TOKEN``. A task gives ``steps`` instead of ``argv`` (each
    ``{"name", "argv", "depends_on"?, "stdin"?, "timeout"?}``) and a ``mode``;
    ``callback`` is a URL the gateway POSTs the job's status to when it ends.

    Error handling: :class:`QueueFull` (429), :class:`GatewayRefused` (400: the
    detail names the field), :class:`BrokerUnavailable` (the gateway or its store).
    """
    from . import _rest

    url = _gateway(target)
    body = _submit_body(
        argv,
        stdin,
        name,
        start_at,
        timeout,
        labels,
        keep,
        steps=steps,
        mode=mode,
        callback=callback,
    )
    accepted = _rest.call(url, "POST", "/v1/jobs", body, token=token, refuse=_refuse)
    return Job(url, accepted["id"], token=token)


def list_jobs(
    target: str,
    *,
    state: str | Iterable[str] | None = None,
    name: str | None = None,
    labels: Mapping[str, str] | None = None,
    created_after: datetime | float | str | None = None,
    created_before: datetime | float | str | None = None,
    sort: Literal["created", "started", "ended"] = "created",
    order: Literal["desc", "asc"] = "desc",
    limit: int = 50,
    cursor: str | None = None,
    token: str | None = None,
) -> JobPage:
    """One page of the gateway's jobs, newest first by default (filters combine)."""
    from . import _rest

    query = _list_target(
        state, name, labels, created_after, created_before, sort, order, limit, cursor
    )
    return _page(_rest.call(_gateway(target), "GET", query, token=token, refuse=_refuse))
