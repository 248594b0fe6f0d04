"""A validated job submission, sans-IO: a decoded JSON body in, a
:class:`SubmitRequest` out, or :class:`InvalidField` naming what is wrong.

Fail closed: every field is checked for type and bounds before anything is
written, unknown fields are refused (a misspelt ``start_at`` must not silently run a
job now), and the message names the field so the HTTP layer answers 400
``{error, detail}`` that a user can act on.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from .errors import InvalidField
from .model import JobState
from .steps import MAX_STEPS, MODES, Mode, StepRequest, build_graph

__all__ = ["SubmitLimits", "SubmitRequest", "parse_start_at", "parse_submit"]

_NAME = re.compile(r"[A-Za-z0-9._:@+/-]{1,128}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# RFC 3339 date-time: a full date, a full time and an offset (no local times: a
# scheduled start must not depend on the gateway's time zone).
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})"
)
#: 9999-12-31T23:59:59Z: the largest time both forms can express.
_MAX_UNIX_TIME = 253402300799
_FIELDS = frozenset(
    {
        "argv",
        "name",
        "labels",
        "start_at",
        "timeout",
        "stdin",
        "stdin_b64",
        "keep",
        "steps",
        "mode",
        "callback",
    }
)
_STEP_FIELDS = frozenset({"name", "argv", "depends_on", "stdin", "stdin_b64", "timeout"})
_STEP_NAME = re.compile(r"[A-Za-z0-9._:@+/-]{1,64}")
#: The longest callback URL taken.
MAX_URL = 2048


@dataclass(frozen=True, slots=True)
class SubmitLimits:
    """Bounds on one submission (the stdin is stored in the database until the job
    starts, so it is kept small; ~1 MB like the /scripts extension)."""

    max_args: int = 1000
    max_argv_bytes: int = 256 * 1024
    max_labels: int = 32
    max_label_value: int = 256
    max_stdin: int = 1024 * 1024
    max_timeout: float = 365 * 86400.0
    max_steps: int = MAX_STEPS
    #: The stdin of all the steps of a task together.
    max_task_stdin: int = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    """A job as submitted, every field valid. Build it with :func:`parse_submit`.

    A task (``mode`` set) has ``steps`` and runs no ``argv`` of its own: its
    ``argv`` is its first step's (what lists show), its ``stdin`` empty.
    ``callback_url`` is stored as given: the gateway checked it against its allowed
    prefixes before submitting."""

    argv: tuple[str, ...]
    name: str
    labels: Mapping[str, str]
    start_at: float | None
    timeout: float | None
    stdin: bytes
    keep: bool
    mode: Mode | None = None
    steps: tuple[StepRequest, ...] = ()
    callback_url: str | None = None

    @property
    def programs(self) -> tuple[str, ...]:
        """Every program it runs (argv[0] of the job, or of each step)."""
        if self.steps:
            return tuple(dict.fromkeys(step.argv[0] for step in self.steps))
        return (self.argv[0],)

    def initial_state(self, now: float) -> JobState:
        """``scheduled`` when the start is still ahead, else ``queued``."""
        if self.start_at is not None and self.start_at > now:
            return JobState.SCHEDULED
        return JobState.QUEUED


def _number(value: object) -> float | None:
    """A JSON number as float (bool is not a number here), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def parse_start_at(value: object, field: str = "start_at") -> float:
    """RFC 3339 text (``2030-01-02T03:04:05Z``, with an offset) or a Unix time."""
    if isinstance(value, str):
        match = _RFC3339.fullmatch(value)
        if match is None:
            raise InvalidField(field, "expected an RFC 3339 date-time with an offset or Z")
        date, clock, fraction, offset = match.groups()
        offset = "+00:00" if offset in ("Z", "z") else offset
        # fromisoformat takes at most microseconds; finer digits are dropped.
        micros = f".{(fraction or '0')[:6]:0<6}"
        try:
            stamp = datetime.fromisoformat(f"{date}T{clock}{micros}{offset}").timestamp()
        except (ValueError, OverflowError) as exc:
            raise InvalidField(field, f"not a valid date-time ({exc})") from None
    else:
        number = _number(value)
        if number is None:
            raise InvalidField(field, "expected an RFC 3339 string or a Unix time in seconds")
        stamp = number
    if not (math.isfinite(stamp) and 0 <= stamp <= _MAX_UNIX_TIME):
        raise InvalidField(field, "out of range (1970 to 9999)")
    return stamp


def _argv(value: object, limits: SubmitLimits, at: str = "") -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidField(f"{at}argv", "expected a non-empty list of strings")
    if len(value) > limits.max_args:
        raise InvalidField(f"{at}argv", f"more than {limits.max_args} arguments")
    total = 0
    for index, argument in enumerate(value):
        where = f"{at}argv[{index}]"
        if not isinstance(argument, str):
            raise InvalidField(where, "expected a string")
        if "\0" in argument:
            raise InvalidField(where, "contains a NUL character")
        try:
            total += len(argument.encode("utf-8")) + 1
        except UnicodeEncodeError:
            raise InvalidField(where, "not valid Unicode (a lone surrogate)") from None
    if not value[0]:
        raise InvalidField(f"{at}argv[0]", "the program name is empty")
    if total > limits.max_argv_bytes:
        raise InvalidField(f"{at}argv", f"longer than {limits.max_argv_bytes} bytes")
    return tuple(value)


def _name(value: object, argv0: str) -> str:
    if value is None:
        if _NAME.fullmatch(argv0) is None:
            raise InvalidField(
                "name", "argv[0] is not a valid job name (1-128 of A-Z a-z 0-9 . _ : @ + / -)"
            )
        return argv0
    if not isinstance(value, str) or _NAME.fullmatch(value) is None:
        raise InvalidField("name", "expected 1-128 characters of A-Z a-z 0-9 . _ : @ + / -")
    return value


def _labels(value: object, limits: SubmitLimits) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidField("labels", "expected an object of strings")
    if len(value) > limits.max_labels:
        raise InvalidField("labels", f"more than {limits.max_labels} labels")
    labels: dict[str, str] = {}
    for key, text in value.items():
        if not isinstance(key, str) or _LABEL_KEY.fullmatch(key) is None:
            raise InvalidField("labels", f"bad key {str(key)[:70]!r} (1-64 of A-Z a-z 0-9 . _ / -)")
        where = f"labels.{key}"
        if not isinstance(text, str):
            raise InvalidField(where, "expected a string")
        if len(text) > limits.max_label_value:
            raise InvalidField(where, f"longer than {limits.max_label_value} characters")
        if _CONTROL.search(text):
            raise InvalidField(where, "contains control characters")
        labels[key] = text
    return labels


def _timeout(value: object, limits: SubmitLimits, at: str = "") -> float | None:
    if value is None:
        return None
    number = _number(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise InvalidField(f"{at}timeout", "expected a positive number of seconds")
    if number > limits.max_timeout:
        raise InvalidField(f"{at}timeout", f"more than {limits.max_timeout:g} seconds")
    return number


def _stdin(text: object, b64: object, limits: SubmitLimits, at: str = "") -> bytes:
    if text is not None and b64 is not None:
        raise InvalidField(f"{at}stdin_b64", "give stdin or stdin_b64, not both")
    if text is not None:
        if not isinstance(text, str):
            raise InvalidField(f"{at}stdin", "expected a string")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidField(f"{at}stdin", "not valid Unicode (a lone surrogate)") from None
        field = f"{at}stdin"
    elif b64 is not None:
        if not isinstance(b64, str) or len(b64) > (limits.max_stdin + 2) // 3 * 4:
            raise InvalidField(
                f"{at}stdin_b64", f"expected base64 of at most {limits.max_stdin} bytes"
            )
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidField(f"{at}stdin_b64", "not valid base64") from None
        field = f"{at}stdin_b64"
    else:
        return b""
    if len(data) > limits.max_stdin:
        raise InvalidField(field, f"longer than {limits.max_stdin} bytes")
    return data


def _steps(
    value: object, mode: object, limits: SubmitLimits
) -> tuple[Mode, tuple[StepRequest, ...]]:
    if mode is None:
        mode = "sequential"
    if mode not in MODES:
        raise InvalidField("mode", f"expected one of {', '.join(MODES)}")
    if not isinstance(value, list) or not value:
        raise InvalidField("steps", "expected a non-empty list of steps")
    if len(value) > limits.max_steps:
        raise InvalidField("steps", f"more than {limits.max_steps} steps")
    names: list[str] = []
    wanted: list[list[str]] = []
    parsed: list[tuple[tuple[str, ...], bytes, float | None]] = []
    total_stdin = 0
    for index, step in enumerate(value):
        at = f"steps[{index}]."
        if not isinstance(step, dict):
            raise InvalidField(f"steps[{index}]", "expected an object")
        for key in step:
            if key not in _STEP_FIELDS:
                raise InvalidField(f"{at}{str(key)[:64]}", "unknown field")
        name = step.get("name")
        if not isinstance(name, str) or _STEP_NAME.fullmatch(name) is None:
            raise InvalidField(f"{at}name", "expected 1-64 characters of A-Z a-z 0-9 . _ : @ + / -")
        depends = step.get("depends_on", [])
        if not isinstance(depends, list) or not all(isinstance(d, str) for d in depends):
            raise InvalidField(f"{at}depends_on", "expected a list of step names")
        if depends and mode != "dag":
            raise InvalidField(f"{at}depends_on", f'only with "mode": "dag" (this task is {mode})')
        stdin = _stdin(step.get("stdin"), step.get("stdin_b64"), limits, at)
        total_stdin += len(stdin)
        if total_stdin > limits.max_task_stdin:
            raise InvalidField(f"{at}stdin", f"the steps' stdin exceeds {limits.max_task_stdin}")
        names.append(name)
        wanted.append(depends)
        parsed.append(
            (_argv(step.get("argv"), limits, at), stdin, _timeout(step.get("timeout"), limits, at))
        )
    graph = build_graph(mode, names, wanted)
    return mode, tuple(
        StepRequest(name, argv, deps, stdin, timeout)
        for name, (argv, stdin, timeout), deps in zip(names, parsed, graph, strict=True)
    )


def _callback(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"url"}:
        raise InvalidField("callback", 'expected {"url": "..."}')
    url = value["url"]
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise InvalidField("callback.url", f"expected a URL of at most {MAX_URL} characters")
    if _CONTROL.search(url) or " " in url:
        raise InvalidField("callback.url", "contains spaces or control characters")
    return url


def parse_submit(body: object, limits: SubmitLimits | None = None) -> SubmitRequest:
    """Validate a decoded JSON body: ``{argv, name?, labels?, start_at?, timeout?,
    stdin? | stdin_b64?, keep?, callback?}`` or, for a task, ``{steps, mode?, name?,
    labels?, start_at?, keep?, callback?}`` (see :mod:`.steps`).

    Error handling: raises :class:`InvalidField` for the first bad field.
    """
    limits = limits or SubmitLimits()
    if not isinstance(body, dict):
        raise InvalidField("body", "expected a JSON object")
    for key in body:
        if key not in _FIELDS:
            raise InvalidField(str(key)[:64], "unknown field")
    mode: Mode | None = None
    steps: tuple[StepRequest, ...] = ()
    if body.get("steps") is not None:
        for key in ("argv", "stdin", "stdin_b64", "timeout"):
            if body.get(key) is not None:
                raise InvalidField(key, "a task with steps takes it per step")
        mode, steps = _steps(body["steps"], body.get("mode"), limits)
        argv = steps[0].argv
    else:
        if body.get("mode") is not None:
            raise InvalidField("mode", "only with steps")
        argv = _argv(body.get("argv"), limits)
    keep = body.get("keep", True)
    if not isinstance(keep, bool):
        raise InvalidField("keep", "expected true or false")
    start_at = body.get("start_at")
    return SubmitRequest(
        argv=argv,
        name=_name(body.get("name"), argv[0]),
        labels=_labels(body.get("labels"), limits),
        start_at=None if start_at is None else parse_start_at(start_at),
        timeout=_timeout(body.get("timeout"), limits),
        stdin=_stdin(body.get("stdin"), body.get("stdin_b64"), limits),
        keep=keep,
        mode=mode,
        steps=steps,
        callback_url=_callback(body.get("callback")),
    )
