"""What both flavours of the jobs client share: the typed errors, the status and
page records, and the requests and answers of ``/v1/jobs`` (no I/O here)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, Literal, NoReturn
from urllib.parse import quote, urlencode

from sockexec_py.errors import LocalProtocolError, ProtocolError
from sockexec_py.events import Exited, Output

from ._common import Frame, is_gateway
from .wire import GatewayRefused, argv_text, error_text, raise_for_status

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
    #: A task's mode and steps (each as the gateway shows it: name, state, exit...).
    mode: str | None = None
    steps: tuple[Mapping[str, Any], ...] | None = None
    #: The callback and its attempts, if the job has one.
    callback: Mapping[str, Any] | None = None

    def step(self, name: str) -> Mapping[str, Any]:
        """A step of a task, by name (``KeyError`` if there is none)."""
        for step in self.steps or ():
            if step["name"] == name:
                return step
        raise KeyError(name)

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled", "lost")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobStatus:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["argv"] = tuple(values.get("argv", ()))
        if values.get("steps") is not None:
            values["steps"] = tuple(values["steps"])
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


#: A step of a task as given to submit: ``{"name", "argv", "depends_on"?, "stdin"?,
#: "timeout"?}`` (stdin as bytes or text).
StepSpec = Mapping[str, Any]


def _stdin_field(stdin: bytes | str) -> str:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return base64.b64encode(data).decode()


def _step_body(step: StepSpec) -> dict[str, Any]:
    body: dict[str, Any] = {"name": step["name"], "argv": argv_text(step["argv"])}
    if step.get("depends_on"):
        body["depends_on"] = list(step["depends_on"])
    if step.get("stdin"):
        body["stdin_b64"] = _stdin_field(step["stdin"])
    if step.get("timeout") is not None:
        body["timeout"] = step["timeout"]
    return body


def _submit_body(
    argv: Sequence[str | bytes] | None,
    stdin: bytes | str | None,
    name: str | None,
    start_at: datetime | float | str | None,
    timeout: float | None,
    labels: Mapping[str, str] | None,
    keep: bool,
    *,
    steps: Sequence[StepSpec] | None = None,
    mode: str | None = None,
    callback: str | None = None,
) -> dict[str, Any]:
    if (argv is None) == (steps is None):
        raise LocalProtocolError("give argv (a job) or steps (a task), not both")
    body: dict[str, Any] = {"keep": keep}
    if argv is not None:
        body["argv"] = argv_text(argv)
    if steps is not None:
        body["steps"] = [_step_body(step) for step in steps]
        if mode is not None:
            body["mode"] = mode
    if callback is not None:
        body["callback"] = {"url": callback}
    if stdin:
        body["stdin_b64"] = _stdin_field(stdin)
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


def _output_target(
    job_id: str, follow: bool, stream: View, offset: int, step: str | None = None
) -> str:
    params: dict[str, Any] = {
        "stream": stream,
        "offset": offset,
        "follow": int(follow),
        "encoding": "base64",
    }
    if step is not None:
        params["step"] = step
    query = urlencode(params)
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
