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

import base64
import json
import math
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, Literal, NoReturn
from urllib.parse import quote, urlencode

import trio

from sockexec_py.errors import LocalProtocolError, ProtocolError, Timeout
from sockexec_py.events import Exited, Output

from ._common import Frame, is_gateway
from .wire import GatewayRefused, argv_text, error_text, raise_for_status

__all__ = [
    "AsyncJob",
    "Job",
    "JobConflict",
    "JobNotFound",
    "JobPage",
    "JobStatus",
    "QueueFull",
    "alist_jobs",
    "asubmit",
    "list_jobs",
    "submit",
]

View = Literal["stdout", "stderr", "both"]
#: The longest a single long poll of ``wait()`` asks the gateway to hold.
_POLL = 30.0
#: Beyond a long poll, how long the gateway may take to answer.
_ANSWER_GRACE = 10.0


class JobNotFound(GatewayRefused):
    """No job has this id (never had, or it was deleted or purged): 404."""


class JobConflict(GatewayRefused):
    """The job's state does not allow this (cancel a finished job, delete a
    running one): 409."""


class QueueFull(GatewayRefused):
    """The job's name already has its maximum of waiting jobs: 429."""


_TYPED: Mapping[int, type[GatewayRefused]] = {404: JobNotFound, 409: JobConflict, 429: QueueFull}


def _refuse(status: int, body: bytes) -> NoReturn:
    """The typed error of a jobs endpoint's refusal."""
    try:
        code = json.loads(body).get("error")
    except (ValueError, AttributeError):
        code = None
    kind = _TYPED.get(status)
    if kind is not None and (status != 404 or code == "not_found"):
        raise kind(f"gateway refused the request: {error_text(status, body)}", status)
    raise_for_status(status, body)


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A job as the gateway recorded it (``GET /v1/jobs/{id}``). Times are RFC 3339
    text in UTC; ``progress`` has ``task``, ``tasks``, ``title``, ``percent``, ``step``."""

    id: str
    name: str
    argv: tuple[str, ...]
    state: str
    created_at: str
    labels: Mapping[str, str] = field(default_factory=dict)
    position: int | None = None
    start_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    duration: float | None = None
    timeout: float | None = None
    keep: bool = True
    exitcode: int | None = None
    termsig: str | None = None
    reason: str | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    dropped_bytes: int = 0
    truncated: bool = False
    progress: Mapping[str, Any] = field(default_factory=dict)
    url: str = ""

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled", "lost")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobStatus:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["argv"] = tuple(values.get("argv", ()))
        return cls(**values)


@dataclass(frozen=True, slots=True)
class JobPage:
    """One page of :func:`list_jobs`: pass ``next_cursor`` as ``cursor`` for the next;
    ``totals`` counts the jobs per state in the whole store."""

    jobs: list[JobStatus]
    next_cursor: str | None
    totals: Mapping[str, int]


def _gateway(target: str) -> str:
    if not is_gateway(target):
        raise ValueError(f"jobs go through the gateway (http://HOST:PORT), not {target!r}")
    return target.replace("ws://", "http://", 1).replace("wss://", "https://", 1)


def _submit_body(
    argv: Sequence[str | bytes],
    stdin: bytes | str | None,
    name: str | None,
    start_at: datetime | float | str | None,
    timeout: float | None,
    labels: Mapping[str, str] | None,
    keep: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {"argv": argv_text(argv), "keep": keep}
    if stdin:
        data = stdin.encode() if isinstance(stdin, str) else stdin
        body["stdin_b64"] = base64.b64encode(data).decode()
    if name is not None:
        body["name"] = name
    if isinstance(start_at, datetime):
        if start_at.tzinfo is None:
            raise LocalProtocolError("start_at: give an aware datetime (with a time zone)")
        body["start_at"] = start_at.isoformat()
    elif start_at is not None:
        body["start_at"] = start_at
    if timeout is not None:
        body["timeout"] = timeout
    if labels:
        body["labels"] = dict(labels)
    return body


def _list_target(
    state: str | Iterable[str] | None,
    name: str | None,
    labels: Mapping[str, str] | None,
    created_after: datetime | float | str | None,
    created_before: datetime | float | str | None,
    sort: str,
    order: str,
    limit: int,
    cursor: str | None,
) -> str:
    params: list[tuple[str, str]] = []
    states = [state] if isinstance(state, str) else list(state or ())
    params += [("state", each) for each in states]
    if name is not None:
        params.append(("name", name))
    params += [("label", f"{key}={value}") for key, value in (labels or {}).items()]
    for key, when in (("created_after", created_after), ("created_before", created_before)):
        if when is not None:
            params.append((key, when.isoformat() if isinstance(when, datetime) else str(when)))
    params += [("sort", sort), ("order", order), ("limit", str(limit))]
    if cursor is not None:
        params.append(("cursor", cursor))
    return "/v1/jobs?" + urlencode(params)


def _page(data: Mapping[str, Any]) -> JobPage:
    return JobPage(
        [JobStatus.from_json(job) for job in data["jobs"]], data["next_cursor"], data["totals"]
    )


def _output_target(job_id: str, follow: bool, stream: View, offset: int) -> str:
    query = urlencode(
        {"stream": stream, "offset": offset, "follow": int(follow), "encoding": "base64"}
    )
    return f"/v1/jobs/{quote(job_id)}/output?{query}"


def _frame(message: Any) -> Frame | None:
    """A job's output frame; None for what is not one (the truncation marker, the
    end of a job that has no exit status)."""
    kind = message.get("type") if isinstance(message, dict) else None
    try:
        if kind in ("stdout", "stderr"):
            return Output(kind, base64.b64decode(message["data_b64"], validate=True))
        if kind == "exit":
            if message["exitcode"] is None and message["termsig"] is None:
                return None  # cancelled before it started, or lost
            return Exited(exitcode=message["exitcode"], termsig=message["termsig"])
        if kind == "truncated":
            return None
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"unexpected frame from the gateway: {str(message)[:100]}") from exc
    if kind == "error":
        raise_for_status(int(message.get("status", 500)), json.dumps(message).encode())
    raise ProtocolError(f"unexpected frame from the gateway: {str(message)[:100]}")


# -- blocking ---------------------------------------------------------------------------


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

    def output(
        self, follow: bool = True, *, stream: View = "both", offset: int = 0
    ) -> Iterator[Frame]:
        """The job's output frames from ``offset`` of ``stream``; with ``follow``,
        until the job ends (a waiting job is waited for). Leaving the loop early
        closes the connection (use the generator in a ``with contextlib.closing``
        to be sure it happens at once)."""
        from . import _rest

        target = _output_target(self.id, follow, stream, offset)
        for message in _rest.lines(self.url, target, token=self.token, refuse=_refuse):
            frame = _frame(message)
            if frame is not None:
                yield frame


def submit(
    target: str,
    argv: Sequence[str | bytes],
    *,
    stdin: bytes | str | None = None,
    name: str | None = None,
    start_at: datetime | float | str | None = None,
    timeout: float | None = None,
    labels: Mapping[str, str] | None = None,
    keep: bool = True,
    token: str | None = None,
) -> Job:
    """Submit ``argv`` as a job of the gateway at ``target``; returns once the
    gateway has committed it. ``start_at`` (an aware datetime, RFC 3339 text or Unix
    time) schedules it; ``timeout`` bounds its run; ``name`` is its queue (default
    argv[0]); ``keep=False`` deletes it once it succeeded. The token defaults to
    ``$SOCKEXEC_TOKEN``.

    Error handling: :class:`QueueFull` (429), :class:`GatewayRefused` (400: the
    detail names the field), :class:`BrokerUnavailable` (the gateway or its store).
    """
    from . import _rest

    url = _gateway(target)
    body = _submit_body(argv, stdin, name, start_at, timeout, labels, keep)
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


# -- trio --------------------------------------------------------------------------------


class AsyncJob:
    """The trio flavour of :class:`Job`; bound calls with trio's cancel scopes."""

    def __init__(self, url: str, job_id: str, *, token: str | None = None) -> None:
        self.url = _gateway(url)
        self.id = job_id
        self.token = token

    def __repr__(self) -> str:
        return f"AsyncJob({self.url!r}, {self.id!r})"

    async def _call(self, method: str, target: str) -> Any:
        from . import _rest

        return await _rest.acall(self.url, method, target, token=self.token, refuse=_refuse)

    async def status(self) -> JobStatus:
        return JobStatus.from_json(await self._call("GET", f"/v1/jobs/{quote(self.id)}"))

    async def wait(self, timeout: float | None = None) -> JobStatus:
        """As :meth:`Job.wait`."""
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            while True:
                target = f"/v1/jobs/{quote(self.id)}?wait={_POLL:g}"
                status = JobStatus.from_json(await self._call("GET", target))
                if status.finished:
                    return status
        assert scope.cancelled_caught
        raise Timeout(f"job {self.id} did not finish within {timeout:g} s")

    async def cancel(self) -> JobStatus:
        return JobStatus.from_json(await self._call("POST", f"/v1/jobs/{quote(self.id)}/cancel"))

    async def delete(self) -> None:
        await self._call("DELETE", f"/v1/jobs/{quote(self.id)}")

    @asynccontextmanager
    async def output(
        self, follow: bool = True, *, stream: View = "both", offset: int = 0
    ) -> AsyncIterator[AsyncIterator[Frame]]:
        """``async with job.output() as frames: async for frame in frames``; leaving
        the block closes the connection."""
        from . import _rest

        target = _output_target(self.id, follow, stream, offset)
        async with _rest.alines(self.url, target, token=self.token, refuse=_refuse) as lines:
            yield _AsyncFrames(lines)


class _AsyncFrames:
    def __init__(self, lines: AsyncIterator[Any]) -> None:
        self._lines = lines

    def __aiter__(self) -> _AsyncFrames:
        return self

    async def __anext__(self) -> Frame:
        while True:
            frame = _frame(await self._lines.__anext__())
            if frame is not None:
                return frame


async def asubmit(
    target: str,
    argv: Sequence[str | bytes],
    *,
    stdin: bytes | str | None = None,
    name: str | None = None,
    start_at: datetime | float | str | None = None,
    timeout: float | None = None,
    labels: Mapping[str, str] | None = None,
    keep: bool = True,
    token: str | None = None,
) -> AsyncJob:
    """The trio flavour of :func:`submit`."""
    from . import _rest

    url = _gateway(target)
    body = _submit_body(argv, stdin, name, start_at, timeout, labels, keep)
    accepted = await _rest.acall(url, "POST", "/v1/jobs", body, token=token, refuse=_refuse)
    return AsyncJob(url, accepted["id"], token=token)


async def alist_jobs(
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
    """The trio flavour of :func:`list_jobs`."""
    from . import _rest

    query = _list_target(
        state, name, labels, created_after, created_before, sort, order, limit, cursor
    )
    return _page(await _rest.acall(_gateway(target), "GET", query, token=token, refuse=_refuse))
