"""The gateway's request checks alone (no server): what a browser may not do, which
Host names a token-less gateway answers to, and the validated exec request."""

from __future__ import annotations

import pytest

from sockexec_py.gateway.request import (
    ExecRequest,
    HTTPError,
    refuse_cross_site,
    refuse_foreign_host,
    require_json,
)
from sockexec_py.gateway.settings import GatewaySettings

SETTINGS = GatewaySettings(socket_path="/x.sock", max_timeout=100, default_timeout=7)


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


def test_a_valid_exec_request() -> None:
    request = ExecRequest({"argv": ["cat"], "stdin_b64": "aGk=", "timeout": 5}, SETTINGS)
    assert (request.argv, request.stdin, request.timeout) == (["cat"], b"hi", 5.0)
    assert ExecRequest({"argv": ["true"]}, SETTINGS).timeout == 7.0


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ([], "the body must be a JSON object"),
        ({}, "argv must be a non-empty list"),
        ({"argv": []}, "argv must be a non-empty list"),
        ({"argv": ["a\0b"]}, "argv must be a non-empty list of strings without NUL"),
        ({"argv": [1]}, "argv must be a non-empty list"),
        ({"argv": ["\ud800"]}, "argv holds text that is not valid Unicode"),
        ({"argv": ["x"] * 1001}, "argv has more than 1000 items"),
        ({"argv": ["x"], "nope": 1}, "unknown field(s): nope"),
        ({"argv": ["x"], "stdin": "a", "stdin_b64": "YQ=="}, "give stdin or stdin_b64"),
        ({"argv": ["x"], "stdin": 3}, "stdin must be a string"),
        ({"argv": ["x"], "stdin_b64": "!!"}, "stdin_b64 is not valid base64"),
        ({"argv": ["x"], "timeout": 0}, "timeout must be a number in (0, 100"),
        ({"argv": ["x"], "timeout": 101}, "timeout must be a number in (0, 100"),
        ({"argv": ["x"], "timeout": True}, "timeout must be a number"),
    ],
)
def test_bad_exec_requests_are_400_naming_the_field(body: object, detail: str) -> None:
    with pytest.raises(HTTPError) as caught:
        ExecRequest(body, SETTINGS)
    assert caught.value.status == 400 and caught.value.detail.startswith(detail)


def test_websocket_requests_take_stdin_as_messages() -> None:
    with pytest.raises(HTTPError, match="send stdin as WebSocket messages"):
        ExecRequest({"argv": ["cat"], "stdin": "x"}, SETTINGS, allow_stdin=False)
