"""Submit validation: each bad field is refused with its name."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from sockexec_py.jobs.errors import InvalidField
from sockexec_py.jobs.model import JobState
from sockexec_py.jobs.request import SubmitLimits, parse_start_at, parse_submit


def test_defaults() -> None:
    request = parse_submit({"argv": ["/bin/echo", "hi"]})
    assert request.argv == ("/bin/echo", "hi")
    assert request.name == "/bin/echo"
    assert request.labels == {} and request.stdin == b"" and request.keep is True
    assert request.start_at is None and request.timeout is None
    assert request.initial_state(0) is JobState.QUEUED


def test_full_request() -> None:
    request = parse_submit(
        {
            "argv": ["thumbnail", "a.png"],
            "name": "thumbs",
            "labels": {"team": "web", "ticket": ""},
            "start_at": "2030-01-02T03:04:05.5+01:00",
            "timeout": 2.5,
            "stdin_b64": base64.b64encode(b"\0\xff").decode(),
            "keep": False,
        }
    )
    assert request.name == "thumbs" and request.labels == {"team": "web", "ticket": ""}
    assert request.start_at == 1893549845.5
    assert request.stdin == b"\0\xff" and request.timeout == 2.5 and request.keep is False
    assert request.initial_state(1_800_000_000) is JobState.SCHEDULED
    assert request.initial_state(1_900_000_000) is JobState.QUEUED


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2030-01-02T03:04:05Z", 1893553445.0),
        ("2030-01-02t03:04:05z", 1893553445.0),
        ("2030-01-02 03:04:05-00:30", 1893555245.0),
        ("2030-01-02T03:04:05.123456789Z", 1893553445.123456),
        (1893553445, 1893553445.0),
        (0, 0.0),
    ],
)
def test_start_at_forms(text: object, expected: float) -> None:
    assert parse_start_at(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        ({}, "argv"),
        ({"argv": []}, "argv"),
        ({"argv": "ls"}, "argv"),
        ({"argv": ["ls", 3]}, "argv[1]"),
        ({"argv": ["ls", "a\0b"]}, "argv[1]"),
        ({"argv": ["ls", "\ud800"]}, "argv[1]"),
        ({"argv": [""]}, "argv[0]"),
        ({"argv": ["x"] * 1001}, "argv"),
        ({"argv": ["x" * 300_000]}, "argv"),
        ({"argv": ["my prog"]}, "name"),
        ({"argv": ["ls"], "name": ""}, "name"),
        ({"argv": ["ls"], "name": "a b"}, "name"),
        ({"argv": ["ls"], "name": "x" * 129}, "name"),
        ({"argv": ["ls"], "labels": ["a"]}, "labels"),
        ({"argv": ["ls"], "labels": {"": "x"}}, "labels"),
        ({"argv": ["ls"], "labels": {"a b": "x"}}, "labels"),
        ({"argv": ["ls"], "labels": {"k": 1}}, "labels.k"),
        ({"argv": ["ls"], "labels": {"k": "a\nb"}}, "labels.k"),
        ({"argv": ["ls"], "labels": {"k": "x" * 257}}, "labels.k"),
        ({"argv": ["ls"], "labels": {f"k{i}": "" for i in range(33)}}, "labels"),
        ({"argv": ["ls"], "start_at": "tomorrow"}, "start_at"),
        ({"argv": ["ls"], "start_at": "2030-01-02T03:04:05"}, "start_at"),  # no offset
        ({"argv": ["ls"], "start_at": "2030-02-30T03:04:05Z"}, "start_at"),
        ({"argv": ["ls"], "start_at": -1}, "start_at"),
        ({"argv": ["ls"], "start_at": float("nan")}, "start_at"),
        ({"argv": ["ls"], "start_at": 1e300}, "start_at"),
        ({"argv": ["ls"], "start_at": True}, "start_at"),
        ({"argv": ["ls"], "timeout": 0}, "timeout"),
        ({"argv": ["ls"], "timeout": -1}, "timeout"),
        ({"argv": ["ls"], "timeout": float("inf")}, "timeout"),
        ({"argv": ["ls"], "timeout": "5"}, "timeout"),
        ({"argv": ["ls"], "timeout": 1e12}, "timeout"),
        ({"argv": ["ls"], "stdin": 5}, "stdin"),
        ({"argv": ["ls"], "stdin": "x" * (1 << 20 + 1)}, "stdin"),
        ({"argv": ["ls"], "stdin_b64": "!!"}, "stdin_b64"),
        ({"argv": ["ls"], "stdin": "a", "stdin_b64": "YQ=="}, "stdin_b64"),
        ({"argv": ["ls"], "keep": "no"}, "keep"),
        ({"argv": ["ls"], "strat_at": 5}, "strat_at"),
    ],
)
def test_bad_fields_are_named(body: Any, field: str) -> None:
    with pytest.raises(InvalidField) as info:
        parse_submit(body)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ") and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_limits_are_configurable() -> None:
    with pytest.raises(InvalidField, match="stdin"):
        parse_submit({"argv": ["cat"], "stdin": "abc"}, SubmitLimits(max_stdin=2))
