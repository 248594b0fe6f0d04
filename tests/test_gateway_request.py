"""The gateway's request checks alone (no server): what a browser may not do, which
Host names a token-less gateway answers to, and the exec request as the models and
the settings validate it (one line naming the field)."""

from __future__ import annotations

import json

import pytest
from pydantic import TypeAdapter, ValidationError

from sockexec_py.gateway.api import describe
from sockexec_py.gateway.models import ExecRequest, JobListQuery, JobSubmit
from sockexec_py.gateway.request import (
    HTTPError,
    exec_call,
    refuse_cross_site,
    refuse_foreign_host,
    require_json,
)
from sockexec_py.gateway.settings import GatewaySettings

SETTINGS = GatewaySettings(socket_path="/x.sock", max_timeout=100, default_timeout=7)
EXEC = TypeAdapter(ExecRequest)


def status(check: object, *args: object) -> int | None:
    assert callable(check)
    try:
        check(*args)
    except HTTPError as exc:
        return exc.status
    return None


@pytest.mark.parametrize(
    ("host", "answered"),
    [
        ("localhost", True),
        ("localhost:8080", True),
        ("127.0.0.1:1", True),
        ("127.9.9.9", True),
        ("[::1]:80", True),
        ("[::1]", True),
        ("LOCALHOST:8080", True),
        ("evil.test", False),
        ("localhost.evil.test", False),
        ("127.0.0.1.evil.test", False),
        ("10.0.0.1", False),
        ("[::1]x", False),
        ("localhost:", False),
        ("localhost:http", False),
        ("", False),
    ],
)
def test_a_tokenless_gateway_answers_only_to_loopback_names(host: str, answered: bool) -> None:
    assert status(refuse_foreign_host, {"host": host}) == (None if answered else 421)


def test_no_host_at_all_is_not_a_browser() -> None:
    assert status(refuse_foreign_host, {}) is None


def test_any_origin_is_refused() -> None:
    assert status(refuse_cross_site, {"origin": "http://127.0.0.1:8080"}) == 403
    assert status(refuse_cross_site, {"origin": "null"}) == 403
    assert status(refuse_cross_site, {}) is None


@pytest.mark.parametrize(
    ("content_type", "accepted"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON", True),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        (None, False),
    ],
)
def test_only_json_bodies(content_type: str | None, accepted: bool) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    assert status(require_json, headers) == (None if accepted else 415)


def _exec(body: object, **kwargs: bool) -> object:
    """The exec call a raw JSON body becomes, as the route does it."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        model = EXEC.validate_json(raw)
    except ValidationError as exc:
        raise HTTPError(400, "bad_request", describe(exc)) from None
    return exec_call(model, SETTINGS, **kwargs)


def test_a_valid_exec_request() -> None:
    call = _exec({"argv": ["cat"], "stdin_b64": "aGk=", "timeout": 5})
    assert (call.argv, call.stdin, call.timeout) == (["cat"], b"hi", 5.0)  # type: ignore[attr-defined]
    assert _exec({"argv": ["true"]}).timeout == 7.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ([], "the body must be a JSON object"),
        (b"{not json", "the body is not valid JSON"),
        (b'{"argv": ["\\ud800"]}', "the body is not valid JSON"),  # a lone surrogate
        ({}, "argv: required"),
        ({"argv": []}, "argv: must be a non-empty list of strings"),
        ({"argv": "ls"}, "argv: must be a non-empty list of strings"),
        ({"argv": ["a\0b"]}, "argv[0]: contains a NUL character"),
        ({"argv": ["a", 1]}, "argv[1]: must be a string"),
        ({"argv": ["x"] * 1001}, "argv: more than 1000 items"),
        ({"argv": ["x"], "nope": 1}, "unknown field: nope"),
        ({"argv": ["x"], "stdin": "a", "stdin_b64": "YQ=="}, "stdin_b64: give stdin or stdin_b64"),
        ({"argv": ["x"], "stdin": 3}, "stdin: must be a string"),
        ({"argv": ["x"], "stdin_b64": "!!"}, "stdin_b64: not valid base64"),
        ({"argv": ["x"], "timeout": 0}, "timeout: input should be greater than 0"),
        ({"argv": ["x"], "timeout": 101}, "timeout: must be in (0, 100]"),
        ({"argv": ["x"], "timeout": True}, "timeout: must be a number"),
        ({"argv": ["x"], "timeout": "5"}, "timeout: must be a number"),
    ],
)
def test_bad_exec_requests_are_400_naming_the_field(body: object, detail: str) -> None:
    with pytest.raises(HTTPError) as caught:
        _exec(body)
    assert caught.value.status == 400 and caught.value.detail.startswith(detail), caught.value


def test_websocket_requests_take_stdin_as_messages() -> None:
    with pytest.raises(HTTPError, match="send stdin as WebSocket messages"):
        _exec({"argv": ["cat"], "stdin": "x"}, allow_stdin=False)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"argv": ["x"], "keep": 1}, "keep: must be true or false"),
        ({"argv": ["x"], "labels": {"a": 1}}, "labels.a: must be a string"),
        ({"argv": ["x"], "labels": []}, "labels: must be an object"),
        ({"argv": ["x"], "name": "a b"}, "name: string should match pattern"),
        ({"argv": ["x"], "start_at": [1]}, "start_at"),
    ],
)
def test_bad_job_submissions_name_the_field(body: object, detail: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TypeAdapter(JobSubmit).validate_json(json.dumps(body))
    assert describe(caught.value).startswith(detail), describe(caught.value)


def test_list_queries_convert_text() -> None:
    query = TypeAdapter(JobListQuery).validate_python(
        {"limit": "10", "state": ["queued", "running"], "order": "asc"}
    )
    assert (query.limit, query.state, query.order) == (10, ["queued", "running"], "asc")
    with pytest.raises(ValidationError) as caught:
        TypeAdapter(JobListQuery).validate_python({"state": ["sleeping"]})
    assert describe(caught.value).startswith("state[0]: input should be")
