"""The dashboard's parts alone (no server): escaping by construction, the session
store's bounds and expiry, the Origin rules, the run form's checks, the views."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from starlette.datastructures import Headers

from sockexec_py.gateway.auth import ANONYMOUS, TokenStore
from sockexec_py.gateway.dashboard.commands import Commands
from sockexec_py.gateway.dashboard.guard import Guard, parse_origin
from sockexec_py.gateway.dashboard.html import Markup, escape, join, render, tag
from sockexec_py.gateway.dashboard.logins import SESSION_COOKIE, Logins, same_secret
from sockexec_py.gateway.dashboard.site import safe_next
from sockexec_py.gateway.dashboard.views import fraction, job_row, progress_text, steps_table
from sockexec_py.jobs import Job, JobState, Progress

PAYLOADS = [
    "<script>document.title='pwned'</script>",
    '"><img src=x onerror=alert(1)>',
    "' onmouseover='alert(1)",
    "</textarea><svg onload=alert(1)>",
    "&lt;already&gt; & ampersands",
]


# -- escaping -----------------------------------------------------------------------


@pytest.mark.parametrize("payload", PAYLOADS)
def test_values_are_escaped_in_text_and_attributes(payload: str) -> None:
    page = render("error.html", {"title": payload, "detail": payload})
    assert "<script>" not in page and "<img" not in page and "<svg" not in page
    assert escape(payload) in page
    link = tag("a", payload, href=payload, data_x=payload)
    # No value can leave its attribute: every quote is an entity.
    assert link.count('"') == 4 and "'" not in link
    assert re.fullmatch(r'<a href="[^"]*" data-x="[^"]*">[^<]*</a>', link)


def test_markup_passes_and_everything_else_is_escaped() -> None:
    assert escape(Markup("<b>ok</b>")) == "<b>ok</b>"
    assert escape(None) == ""
    assert join(["<a>", Markup("<br>")], "<&>") == "&lt;a&gt;&lt;&amp;&gt;<br>"
    assert (
        tag("input", disabled=True, hidden=False, class_="x")
        == '<input disabled class="x"></input>'
    )
    with pytest.raises(KeyError):
        render("error.html", {"title": "missing detail"})


def test_a_job_row_escapes_what_the_job_says() -> None:
    job = Job(
        id="01M939MKQT5RJB05FXYDAFSJ8B",
        name="x",
        argv=tuple(PAYLOADS),
        labels={"k": PAYLOADS[1]},
        state=JobState.RUNNING,
        created_at=1.0,
        started_at=2.0,
        progress=Progress(1, 3, PAYLOADS[0], 50, PAYLOADS[2]),
    )
    row = job_row(job, now=3.0)
    assert "<script>" not in row and "<img" not in row and "onmouseover='" not in row
    assert 'data-id="01M939MKQT5RJB05FXYDAFSJ8B"' in row
    assert '<progress max="1000" value="167">' in row


def test_steps_are_shown_only_when_the_view_has_them() -> None:
    assert steps_table(None) == "" and steps_table([]) == ""
    table = steps_table(
        [
            {"name": "fetch", "state": "succeeded", "exitcode": 0},
            {"name": PAYLOADS[0], "state": "running"},
            "not a step",
        ],
        "JOB",
    )
    assert table.count('class="step"') == 2
    assert "state-succeeded" in table and "<script>" not in table
    assert 'href="/jobs/JOB/output?step=fetch"' in table
    assert table.count('href="/jobs/JOB/output?step=%3C') == 1  # the payload's name, quoted


@pytest.mark.parametrize(
    ("progress", "state", "expected"),
    [
        (Progress(), JobState.RUNNING, None),
        (Progress(1, 4, "a"), JobState.RUNNING, 0.0),
        (Progress(3, 4, "c", 50), JobState.RUNNING, 0.625),
        (Progress(percent=40), JobState.RUNNING, 0.4),
        (Progress(2, 4), JobState.SUCCEEDED, 1.0),
        (Progress(task=7), JobState.RUNNING, None),
        (Progress(9, 4), JobState.FAILED, 1.0),
    ],
)
def test_progress_fraction(progress: Progress, state: JobState, expected: float | None) -> None:
    assert fraction(progress, state) == expected


def test_progress_text() -> None:
    assert progress_text(Progress(2, 5, "build", 40, "link")) == "2/5 · build · 40% link"
    assert progress_text(Progress(task=3)) == "#3"


# -- sessions -----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sessions_are_bounded_and_expire() -> None:
    clock = Clock()
    logins = Logins(None, max_logins=3, idle=60, lifetime=300, clock=clock)
    ids = [logins.open(None)[0] for _ in range(4)]
    assert len(logins) == 3 and logins.find(ids[0]) is None  # the least recently used
    assert logins.find(ids[1]) is not None
    clock.now += 50
    assert logins.find(ids[1]) is not None  # used: its idle time starts again
    clock.now += 50
    assert logins.find(ids[2]) is None and logins.find(ids[1]) is not None
    for _ in range(3):
        clock.now += 59
        assert logins.find(ids[1]) is not None
    clock.now += 59  # used all along, but past its lifetime
    assert logins.find(ids[1]) is None
    assert logins.find(None) is None and logins.find("x" * 500) is None


def test_a_session_lives_only_as_long_as_its_token(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("first-token\nsecond-token\n")
    logins = Logins(TokenStore(str(token_file)))
    assert logins.check_token("nope") is None and logins.check_token("") is None
    assert logins.check_token("first-token\r\nX: y") is None
    principal = logins.check_token("first-token")
    assert principal is not None and principal.fingerprint is not None
    session_id, login = logins.open("first-token")
    other, _ = logins.open("first-token")
    assert session_id != other and login.csrf  # a login always makes a new id
    found = logins.find(session_id)
    assert found is not None and found[1] == principal
    token_file.write_text("second-token\n")  # rotated: the sessions of the old one end
    assert logins.find(session_id) is None
    logins.close(other)
    assert logins.find(other) is None


def test_an_expired_token_neither_logs_in_nor_keeps_its_session(tmp_path: Path) -> None:
    clock = Clock()
    token_file = tmp_path / "tokens"
    token_file.write_text(
        "old-token expires=1970-01-01T00:00:01Z\nday-token expires=1970-01-01T00:20:00Z\n"
    )
    logins = Logins(TokenStore(str(token_file), clock=clock), clock=clock)
    assert logins.check_token("old-token") is None
    assert logins.check_token("day-token") is not None
    session_id, _ = logins.open("day-token")
    assert logins.find(session_id) is not None
    clock.now = 1200.0  # the token's expiry: its session ends with it
    assert logins.find(session_id) is None and logins.check_token("day-token") is None


def test_token_less_sessions_speak_for_anonymous() -> None:
    logins = Logins(None)
    session_id, _ = logins.open(None)
    found = logins.find(session_id)
    assert found is not None and found[1] is ANONYMOUS


def test_secrets_compare() -> None:
    assert same_secret("abc", "abc")
    assert not same_secret("abd", "abc") and not same_secret(None, "abc")
    assert not same_secret("", "")


# -- the Origin rules -----------------------------------------------------------------


def headers(**values: str) -> Headers:
    return Headers({key.replace("_", "-"): value for key, value in values.items()})


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
        ("http://LOCALHOST:8080", "localhost:8080", True),
        ("http://example.com", "example.com:80", True),
        ("http://localhost:9999", "localhost:8080", False),  # same site, other origin
        ("https://localhost:8080", "localhost:8080", False),
        ("http://evil.example", "localhost:8080", False),
        ("null", "localhost:8080", False),
        ("http://localhost:8080/path", "localhost:8080", False),
        ("http://user@localhost:8080", "localhost:8080", False),
        ("javascript://localhost:8080", "localhost:8080", False),
        ("http://localhost:8080", "", False),
    ],
)
def test_same_origin(origin: str, host: str, same: bool) -> None:
    guard = Guard(Logins(None))
    assert guard.same_origin("http", headers(origin=origin, host=host)) is same


def test_public_origin_replaces_the_host() -> None:
    guard = Guard(Logins(None), "https://jobs.example")
    assert guard.same_origin("http", headers(origin="https://jobs.example:443", host="10.0.0.1"))
    assert not guard.same_origin("http", headers(origin="http://10.0.0.1", host="10.0.0.1"))
    assert parse_origin("ftp://x") is None
    with pytest.raises(ValueError):
        Guard(Logins(None), "jobs.example")


def test_api_principal_needs_cookie_csrf_and_our_origin(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("t0ken\n")
    logins = Logins(TokenStore(str(token_file)))
    guard = Guard(logins)
    session_id, login = logins.open("t0ken")
    cookie = f"{SESSION_COOKIE}={session_id}"
    good = {"host": "gw:8080", "cookie": cookie, "x_csrf_token": login.csrf}
    assert guard.api_principal(headers(**good)) is not None
    assert guard.api_principal(headers(**good, origin="http://gw:8080")) is not None
    assert guard.api_principal(headers(**good, origin="http://gw:9090")) is None
    assert guard.api_principal(headers(**{**good, "x_csrf_token": "wrong"})) is None
    assert guard.api_principal(headers(host="gw:8080", cookie=cookie)) is None
    assert guard.api_principal(headers(host="gw:8080", x_csrf_token=login.csrf)) is None


def test_token_less_api_principal_keeps_the_host_rule() -> None:
    logins = Logins(None)
    guard = Guard(logins)
    session_id, login = logins.open(None)
    cookie = f"{SESSION_COOKIE}={session_id}"
    assert guard.api_principal(headers(host="localhost:1", cookie=cookie, x_csrf_token=login.csrf))
    assert (
        guard.api_principal(headers(host="evil.example", cookie=cookie, x_csrf_token=login.csrf))
        is None
    )


@pytest.mark.parametrize(
    ("given", "safe"),
    [
        ("/jobs/X?a=1", "/jobs/X?a=1"),
        (None, "/"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("/\r\nx", "/"),
        ("jobs", "/"),
    ],
)
def test_login_redirects_stay_on_the_gateway(given: str | None, safe: str) -> None:
    assert safe_next(given) == safe


# -- the run form's commands ------------------------------------------------------------


POLICY = """
[[allow]]
program = "true"

[[command]]
name = "thumb"
argv = ["/bin/echo", "@@1", "@@2"]
params_regex = ['[\\w.-]+\\.png', '\\d{1,4}']

[[command]]
name = "free"
argv = ["/bin/echo", "@@1"]
"""


def test_commands_check_like_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    commands = Commands(str(path))
    assert [c.name for c in commands.all()] == ["thumb", "free"]
    thumb = commands.get("thumb")
    assert thumb is not None
    assert thumb.problem(["a.png", "128"]) is None
    assert thumb.problem(["a.png"]) == "thumb takes 2 parameter(s), got 1"
    assert thumb.problem(["a.png; rm -rf /", "1"]) == r"parameter 1 does not match [\w.-]+\.png"
    assert thumb.problem(["a.png", "١٢"]) is not None  # ASCII mode, as the broker's
    free = commands.get("free")
    assert free is not None and free.problem(["anything at all"]) is None
    assert free.problem(["nul\x00"]) == "parameter 1 holds a NUL byte"
    path.write_text("not toml [")  # a broken file keeps the last good commands
    assert [c.name for c in commands.all()] == ["thumb", "free"] and commands.error
    assert Commands(None).all() == []
