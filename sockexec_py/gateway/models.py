"""The HTTP API's requests and answers, as pydantic models: :mod:`.api` validates
with them and generates ``/openapi.json`` from them, so they are the reference.

Request bodies are strict (``extra="forbid"``, no ``"5"`` for 5 or ``1`` for true:
a misspelt or mistyped field is refused, never guessed); query strings are text,
so their models convert (``?limit=10``, ``?follow=1``). Values that depend on the
gateway's settings (``--max-timeout``, the jobs' limits) are checked after, by the
handlers, with the same one-line ``field: what`` errors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from sockexec_py.jobs import JobState


def _non_empty_list(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise PydanticCustomError("argv", "must be a non-empty list of strings")
    return value


def _no_nul(value: Any) -> Any:
    if isinstance(value, str) and "\0" in value:
        raise PydanticCustomError("nul", "contains a NUL character")
    return value


Argv = Annotated[
    list[Annotated[str, BeforeValidator(_no_nul)]],
    BeforeValidator(_non_empty_list),
    Field(
        min_length=1,
        description="The program and its arguments (argv[0] is looked up in the broker's "
        "PATH, or names a policy [[command]]); no shell is involved.",
    ),
]


class Body(BaseModel):
    """A request body: unknown fields are refused, types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Query(BaseModel):
    """A query string: unknown parameters are refused; text is converted."""

    model_config = ConfigDict(extra="forbid")


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Error(Answer):
    """Every error answer: a code and one line for a person."""

    error: str = Field(description="A stable code: bad_request, not_found, queue_full...")
    detail: str = Field(description="One line saying what is wrong (names the field for 400)")


# -- exec -----------------------------------------------------------------------------


class ExecRequest(Body):
    """``POST /v1/exec`` (and the first WebSocket message of ``/v1/exec/ws``, which
    takes no stdin field: stdin comes as messages)."""

    argv: Argv
    stdin: str | None = Field(None, description="Text for stdin (UTF-8).")
    stdin_b64: str | None = Field(None, description="Bytes for stdin, base64.")
    timeout: float | None = Field(
        None, gt=0, description="Seconds before the session is cut (504); --default-timeout."
    )


class EncodingQuery(Query):
    encoding: Literal["text", "base64"] = Field(
        "text", description="base64: output as stdout_b64/stderr_b64 or data_b64 (exact bytes)."
    )


class ExecResult(Answer):
    """A one-shot run: text output (or base64 with ``?encoding=base64``) and the exit."""

    stdout: str | None = None
    stderr: str | None = None
    stdout_b64: str | None = None
    stderr_b64: str | None = None
    exitcode: int | None = Field(description="The exit status, or null after a signal")
    termsig: str | None = Field(description="The signal's name (TERM, KILL...), or null")
    duration_ms: float


class Health(Answer):
    status: Literal["ok"]


# -- jobs -----------------------------------------------------------------------------

JobStateName = Literal["scheduled", "queued", "running", "succeeded", "failed", "cancelled", "lost"]
assert set(JobStateName.__args__) == {state.value for state in JobState}  # type: ignore[attr-defined]


StepName = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:@+/-]{1,64}$")]


class StepSubmit(Body):
    """One step of a task: a broker session of its own (output, progress, exit)."""

    name: StepName = Field(description="Unique in the task; what depends_on and ?step= name")
    argv: Argv
    depends_on: list[StepName] = Field(
        [], description='Steps that must succeed before this one starts (only "mode": "dag")'
    )
    stdin: str | None = Field(None, description="Text for stdin (at most 1 MiB).")
    stdin_b64: str | None = Field(None, description="Bytes for stdin, base64 (at most 1 MiB).")
    timeout: float | None = Field(None, gt=0, description="Seconds this step may run.")


class CallbackSubmit(Body):
    url: str = Field(
        max_length=2048,
        description="Where the job's status is POSTed when it ends, signed (README: "
        "Callbacks); must match one of the gateway's --callback-allow prefixes",
    )


class JobSubmit(Body):
    """``POST /v1/jobs``: a program to run later, through the broker as any session;
    or a task of ``steps`` (then without argv, stdin and timeout)."""

    argv: Argv | None = None
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._:@+/-]{1,128}$",
        description="The queue: jobs of one name run in FIFO order, within its limit "
        "(default: argv[0]).",
    )
    labels: dict[str, str] | None = Field(
        None, description="Up to 32 labels (key: 1-64 of A-Z a-z 0-9 . _ / -) to filter by."
    )
    start_at: str | float | None = Field(
        None, description="A scheduled start: RFC 3339 date-time with an offset, or Unix time."
    )
    timeout: float | None = Field(
        None, gt=0, description="Seconds the program may run, then it is terminated (failed)."
    )
    stdin: str | None = Field(None, description="Text for stdin (at most 1 MiB).")
    stdin_b64: str | None = Field(None, description="Bytes for stdin, base64 (at most 1 MiB).")
    keep: bool = Field(True, description="false: a successful job is deleted when it ends.")
    steps: list[StepSubmit] | None = Field(
        None, max_length=1000, description="A task: up to 1000 steps, each a broker session."
    )
    mode: Literal["sequential", "parallel", "dag"] | None = Field(
        None,
        description="How a task's steps run: one after the other (default), all at once, "
        "or as their depends_on allow. A failed step skips its dependents.",
    )
    callback: CallbackSubmit | None = None


class JobAccepted(Answer):
    """The job is committed (it survives a crash of the gateway from now on)."""

    id: str
    state: JobStateName
    position: int | None = Field(
        description="Jobs of its name ahead of it in the queue (null unless queued)"
    )
    url: str


class ProgressView(Answer):
    """What the job printed about its progress (``[n/m] Title``, ``[NN%] Step``, ``NN%``)."""

    task: int | None
    tasks: int | None
    title: str | None
    percent: int | None
    step: str | None


StepStateName = Literal["queued", "running", "succeeded", "failed", "cancelled", "skipped", "lost"]


class StepView(Answer):
    """One step of a task, as recorded (running ones with their live sizes)."""

    name: str
    argv: list[str]
    depends_on: list[str]
    state: StepStateName
    started_at: str | None
    ended_at: str | None
    duration: float | None
    timeout: float | None
    exitcode: int | None
    termsig: str | None
    reason: str | None
    stdout_bytes: int
    stderr_bytes: int
    dropped_bytes: int
    truncated: bool
    progress: ProgressView


class CallbackAttemptView(Answer):
    at: str
    status: int | None = Field(description="The receiver's HTTP status (null: no answer)")
    error: str | None = Field(description="Why it was not delivered (null: delivered)")
    duration: float


class CallbackView(Answer):
    """The job's callback: waiting (the job runs), pending, delivered or failed."""

    url: str
    state: Literal["waiting", "pending", "delivered", "failed"]
    attempts: list[CallbackAttemptView]
    next_attempt_at: str | None
    delivered_at: str | None


class JobView(Answer):
    """A job as recorded; times are RFC 3339 (UTC), durations and sizes plain numbers.
    A task's output sizes are its steps' together, its progress steps ended of steps."""

    id: str
    name: str
    argv: list[str]
    labels: dict[str, str]
    state: JobStateName
    position: int | None = Field(description="Jobs of its name ahead of it while queued")
    created_at: str
    start_at: str | None
    started_at: str | None
    ended_at: str | None
    duration: float | None = Field(description="Seconds from start to end")
    timeout: float | None
    keep: bool
    exitcode: int | None
    termsig: str | None
    reason: str | None = Field(
        description="One line: the broker's refusal, the timeout, the cancel, why it was lost"
    )
    stdout_bytes: int
    stderr_bytes: int
    dropped_bytes: int = Field(description="Output past --job-output-max, not stored")
    truncated: bool
    progress: ProgressView
    url: str
    mode: Literal["sequential", "parallel", "dag"] | None = Field(
        description="A task's mode; null for a job of one program"
    )
    steps: list[StepView] | None = Field(
        None, description="A task's steps (in GET /v1/jobs/{id}, not in listings)"
    )
    callback: CallbackView | None = Field(None, description="Its callback, if it has one")


class JobPage(Answer):
    jobs: list[JobView]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page")
    totals: dict[str, int] = Field(
        description="Jobs per state in the whole store (empty for a token scoped to names)"
    )


class JobListQuery(Query):
    state: list[JobStateName] = Field([], description="Only these states (repeatable)")
    name: str | None = Field(None, description="Only this queue name")
    label: list[str] = Field([], description="KEY=VALUE, repeatable: all must match")
    created_after: str | None = Field(None, description="RFC 3339 or Unix time (inclusive)")
    created_before: str | None = Field(None, description="RFC 3339 or Unix time (exclusive)")
    sort: Literal["created", "started", "ended"] = "created"
    order: Literal["desc", "asc"] = "desc"
    limit: int = Field(50, ge=1, le=1000)
    cursor: str | None = Field(None, description="next_cursor of the previous page")


class JobGetQuery(Query):
    wait: float = Field(
        0,
        ge=0,
        le=60,
        description="Seconds to wait for the job to finish before answering (long poll)",
    )


class OutputQuery(Query):
    step: str | None = Field(None, description="A task's step (by name): its output")
    stream: Literal["stdout", "stderr", "both"] = "both"
    offset: int = Field(0, ge=0, description="Bytes of the stream (or of both) to skip")
    follow: bool = Field(False, description="Keep streaming until the job ends")
    encoding: Literal["text", "base64"] = "text"


def websocket_refusals(*answers: tuple[int, str]) -> dict[str, Any]:
    """The OpenAPI responses of a WebSocket route's refusals before the upgrade:
    each an HTTP answer with the Error body."""
    return {
        str(code): {
            "description": text,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for code, text in answers
    }


#: The duplex WebSocket route (``/v1/exec/ws``), which OpenAPI cannot describe:
#: written here by hand, next to the models it names.
EXEC_WS_PATH: dict[str, Any] = {
    "get": {
        "summary": "Duplex session over a WebSocket",
        "description": "Upgrade to a WebSocket. The first message is an ExecRequest "
        "(JSON text, without stdin fields); then stdin as text or binary messages, "
        '{"type": "close_stdin"} to close it, {"type": "terminate"} to have the program '
        'terminated. Frames come back as JSON text: {"type": "stdout"|"stderr", "data"} '
        '(data_b64 with ?encoding=base64), then {"type": "exit", "exitcode", "termsig"}; '
        'an error after the upgrade is {"type": "error", "error", "detail", "status"} and '
        "a close. A refusal before the upgrade is an HTTP answer with the Error body.",
        "parameters": [
            {
                "name": "encoding",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "enum": ["text", "base64"], "default": "text"},
            }
        ],
        "responses": {
            "101": {"description": "Switching protocols: the session runs"},
            **websocket_refusals(
                (401, "Missing, wrong or expired bearer token"),
                (403, "Refused: sent by a web browser for a page (an Origin header)"),
                (421, "Without tokens, the Host must be a loopback name"),
            ),
        },
    }
}
