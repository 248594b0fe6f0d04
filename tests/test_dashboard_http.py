"""The dashboard over HTTP, against a real gateway: the login, the cookie's
attributes, the Origin and CSRF rules for the pages and for the API, the run
form's server-side checks, the security headers."""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from dashboard_support import TOKEN, Browserless, hidden, write_files

from sockexec_py.gateway.dashboard.guard import CSP

from conftest import Broker, GatewayProcess


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return write_files(tmp_path)


@pytest.fixture
def secured(
    start_broker: object, files: tuple[Path, Path], tmp_path: Path
) -> Iterator[GatewayProcess]:
    policy, tokens = files
    broker = start_broker("--policy", str(policy))  # type: ignore[operator]
    args = ["--data-dir", str(tmp_path / "data"), "--token-file", str(tokens)]
    with GatewayProcess(broker.path, *args, "--policy", str(policy)) as gateway:
        yield gateway


def test_login_exchanges_the_token_for_a_session_cookie(secured: GatewayProcess) -> None:
    client = Browserless(secured.port)
    status, headers, _ = client.request("GET", "/?state=failed")
    assert status == 303 and headers["location"] == "/login?next=%2F%3Fstate%3Dfailed"
    assert client.request("GET", "/ui/events")[0] == 401
    assert client.request("GET", "/ui/queue")[0] == 401
    status, headers, page = client.request("GET", "/login")
    assert status == 200 and headers["content-security-policy"] == CSP
    login_cookie = headers["set-cookie"]
    assert "HttpOnly" in login_cookie and "SameSite=strict" in login_cookie
    csrf = hidden(page, "csrf")
    form = {"csrf": csrf, "token": TOKEN, "next": "/queue"}
    own = {"Origin": client.origin}
    # Another origin (even another port of this machine: the same site), none, or null.
    for origin in ("http://127.0.0.1:1", "null", None):
        refused = client.request(
            "POST", "/login", form=form, headers={"Origin": origin} if origin else {}
        )
        assert refused[0] == 403, origin
    assert client.request("POST", "/login", form={**form, "csrf": "x"}, headers=own)[0] == 403
    status, _, page = client.request("POST", "/login", form={**form, "token": "wrong"}, headers=own)
    assert status == 401 and "not valid" in page and "sockexec_session" not in client.cookies
    status, headers, _ = client.request(
        "POST", "/login", form={**form, "csrf": hidden(page, "csrf")}, headers=own
    )
    assert status == 303 and headers["location"] == "/queue"
    cookie = next(v for v in headers.get_all("set-cookie") if v.startswith("sockexec_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP here: see the --public-origin test
    status, headers, page = client.request("GET", "/queue")
    assert status == 200 and "Queues" in page
    for name, value in {
        "content-security-policy": CSP,
        "x-content-type-options": "nosniff",
        "x-frame-options": "DENY",
        "referrer-policy": "same-origin",
        "cache-control": "no-store",
    }.items():
        assert headers[name] == value
    assert "unsafe-inline" not in CSP and "frame-ancestors 'none'" in CSP
    # Logging out ends the session on the server: the old cookie is worth nothing.
    old = dict(client.cookies)
    csrf = client.csrf()
    assert client.request("POST", "/logout", form={"csrf": csrf}, headers=own)[0] == 303
    client.cookies = old
    assert client.request("GET", "/queue")[0] == 303


def test_an_expired_token_cannot_log_in(secured: GatewayProcess, files: tuple[Path, Path]) -> None:
    """The API's 401 for an expired token holds for the login page too (a session
    would carry the token past its expiry, API calls included)."""
    _, tokens = files
    tokens.write_text(f"{TOKEN}\ngone-token expires=2001-01-01T00:00:00Z\n")
    client = Browserless(secured.port)
    status, _, page = client.request("GET", "/login")
    form = {"csrf": hidden(page, "csrf"), "token": "gone-token", "next": "/"}
    status, _, page = client.request("POST", "/login", form=form, headers={"Origin": client.origin})
    assert status == 401 and "not valid" in page and "sockexec_session" not in client.cookies
    client.login(TOKEN)  # the file was read again: the other token still logs in


def test_changes_need_our_origin_and_the_csrf_token(secured: GatewayProcess) -> None:
    client = Browserless(secured.port)
    client.login()
    csrf = client.csrf()
    form = {"csrf": csrf, "command": "hello", "param": "world"}
    own = {"Origin": client.origin}
    assert client.request("POST", "/run", form=form)[0] == 403  # no Origin
    assert (
        client.request("POST", "/run", form=form, headers={"Origin": "http://127.0.0.1:1"})[0]
        == 403
    )
    assert client.request("POST", "/run", form={**form, "csrf": "forged"}, headers=own)[0] == 403
    assert client.request("POST", "/run", form={**form, "csrf": ""}, headers=own)[0] == 403
    # The page checks the parameters; the server checks them again.
    status, _, page = client.request("POST", "/run", form={**form, "param": "W0rld!"}, headers=own)
    assert status == 400 and "parameter 1 does not match [a-z]+" in page
    assert 'value="W0rld!"' in page  # the form comes back with what was typed
    status, _, page = client.request("POST", "/run", form={**form, "command": "rm"}, headers=own)
    assert status == 404
    status, headers, _ = client.request("POST", "/run", form=form, headers=own)
    assert status == 303 and headers["location"].startswith("/jobs/")
    job_id = headers["location"].rsplit("/", 1)[1]
    status, _, body = secured.request(
        "GET", f"/v1/jobs/{job_id}?wait=30", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    job = json.loads(body)
    assert (job["state"], job["argv"], job["name"]) == ("succeeded", ["hello", "world"], "hello")
    status, headers, text = client.request("GET", f"/jobs/{job_id}/output")
    assert status == 200 and text == "hello world\n"
    assert headers["content-disposition"] == f'attachment; filename="{job_id}.log"'
    assert (
        client.request("POST", "/run", form=form, headers={**own, "Content-Type": "text/plain"})[0]
        == 415
    )


def test_the_api_takes_a_session_only_with_its_csrf_header(secured: GatewayProcess) -> None:
    client = Browserless(secured.port)
    client.login()
    csrf = client.csrf()
    own = client.origin
    with_token = {"X-CSRF-Token": csrf}
    assert client.request("GET", "/v1/jobs", headers=with_token)[0] == 200
    assert client.request("GET", "/v1/jobs", headers={**with_token, "Origin": own})[0] == 200
    # The rule for everything else stays: an Origin is refused, a cookie alone is nothing.
    assert client.request("GET", "/v1/jobs", headers={"Origin": own})[0] == 403
    assert client.request("GET", "/v1/jobs")[0] == 401
    foreign = {**with_token, "Origin": "http://127.0.0.1:1"}
    assert client.request("GET", "/v1/jobs", headers=foreign)[0] == 403
    assert (
        client.request("GET", "/v1/jobs", headers={"X-CSRF-Token": "forged", "Origin": own})[0]
        == 403
    )
    bearer = {"Authorization": f"Bearer {TOKEN}", "Origin": own}
    assert client.request("GET", "/v1/jobs", headers=bearer, cookies=False)[0] == 403
    status, _, _ = client.request(
        "POST",
        "/v1/jobs",
        headers={**with_token, "Origin": own, "Content-Type": "application/json"},
    )
    assert status == 400  # through the screen, to the body's validation


def test_public_origin_makes_the_cookie_secure(
    broker: Broker, files: tuple[Path, Path], tmp_path: Path
) -> None:
    _, tokens = files
    args = ["--token-file", str(tokens), "--public-origin", "https://jobs.example"]
    with GatewayProcess(broker.path, *args) as gateway:
        client = Browserless(gateway.port)
        _, _, page = client.request("GET", "/login")
        form = {"csrf": hidden(page, "csrf"), "token": TOKEN}
        status, _, _ = client.request(
            "POST", "/login", form=form, headers={"Origin": client.origin}
        )
        assert status == 403  # the browser's origin is the public one
        status, headers, _ = client.request(
            "POST", "/login", form=form, headers={"Origin": "https://jobs.example"}
        )
        assert status == 303
        cookie = next(v for v in headers.get_all("set-cookie") if v.startswith("sockexec_session="))
        assert "Secure" in cookie


def test_token_less_dashboard_is_for_loopback_names_only(gateway: GatewayProcess) -> None:
    client = Browserless(gateway.port)
    status, headers, page = client.request("GET", "/")
    assert status == 200 and "jobs are off" in page  # no data dir
    assert "sockexec_session" in client.cookies and "Log out" not in page
    assert client.request("GET", "/", headers={"Host": "evil.example"})[0] == 421
    assert client.request("GET", "/static/dashboard.js", headers={"Host": "x"})[0] == 200
    assert client.request("GET", "/login")[0] == 303
    status, headers, _ = client.request("GET", "/static/dashboard.js")
    assert headers["content-type"].startswith("text/javascript") and headers["etag"]
    assert (
        client.request("GET", "/static/dashboard.js", headers={"If-None-Match": headers["etag"]})[0]
        == 304
    )
    assert client.request("GET", "/static/nope.js")[0] == 404
    # A session made by a page view does not let a change through without its token.
    own = {"Origin": client.origin}
    assert client.request("POST", "/run", form={"command": "x"}, headers=own)[0] == 403
    fresh = Browserless(gateway.port)
    assert fresh.request("POST", "/run", form={"command": "x", "csrf": ""}, headers=own)[0] == 403


def test_a_scoped_token_sees_only_its_names(
    start_broker: object, files: tuple[Path, Path], tmp_path: Path
) -> None:
    """A session of a token scoped to some names (issue 16) sees on every page what
    the API would show it: its names' jobs, no totals, its names' queues; another
    name's job, its output and its live feed are 403 naming the scope."""
    policy, tokens = files
    tokens.write_text(f"{TOKEN}\nscoped-dash actions=status,monitor names=mine*\n")
    broker = start_broker("--policy", str(policy))  # type: ignore[operator]
    args = ["--data-dir", str(tmp_path / "data"), "--token-file", str(tokens)]
    with GatewayProcess(broker.path, *args, "--policy", str(policy)) as gateway:
        full = {"Authorization": f"Bearer {TOKEN}"}
        ids = {}
        for name in ("mine-1", "theirs"):
            status, _, body = gateway.request(
                "POST", "/v1/jobs", {"argv": ["echo", name], "name": name}, full
            )
            assert status == 202, body
            ids[name] = json.loads(body)["id"]
            assert gateway.request("GET", f"/v1/jobs/{ids[name]}?wait=30", headers=full)[0] == 200
        client = Browserless(gateway.port)
        client.login("scoped-dash")
        status, _, page = client.request("GET", "/")
        assert status == 200 and ids["mine-1"] in page and ids["theirs"] not in page
        assert "succeeded 2" not in page.lower()  # no totals counting the other name
        owner = Browserless(gateway.port)
        owner.login()
        status, _, page = owner.request("GET", "/")
        assert ids["mine-1"] in page and ids["theirs"] in page
        assert client.request("GET", f"/jobs/{ids['mine-1']}")[0] == 200
        for path in (
            f"/jobs/{ids['theirs']}",
            f"/jobs/{ids['theirs']}/output",
            f"/ui/jobs/{ids['theirs']}/live",
            f"/ui/events?job={ids['theirs']}",
            "/?name=theirs",
        ):
            status, _, text = client.request("GET", path)
            assert status == 403 and "status on 'theirs'" in html.unescape(text), (path, text[:300])
        status, _, text = client.request("GET", f"/jobs/{ids['mine-1']}/output")
        assert (status, text) == (200, "mine-1\n")
        status, _, text = client.request("GET", "/ui/queue")
        assert status == 200
        assert [q["name"] for q in json.loads(text)["queues"]] == []  # nothing waits or runs
        # The run form needs `run`: this token has only status and monitor.
        form = {"csrf": client.csrf(), "command": "hello", "param": "world"}
        status, _, text = client.request(
            "POST", "/run", form=form, headers={"Origin": client.origin}
        )
        assert status == 403 and "run on 'hello'" in html.unescape(text)


def test_a_tasks_page_shows_its_steps(secured: GatewayProcess) -> None:
    """A multi-step task's page lists its steps in order with their states and
    exits (a failed step's dependent skipped)."""
    full = {"Authorization": f"Bearer {TOKEN}"}
    steps = [
        {"name": "build", "argv": ["true"]},
        {"name": "test", "argv": ["sh", "-c", "echo testing; exit 3"], "depends_on": ["build"]},
        {"name": "ship", "argv": ["true"], "depends_on": ["test"]},
    ]
    status, _, body = secured.request(
        "POST", "/v1/jobs", {"name": "pipeline", "mode": "dag", "steps": steps}, full
    )
    assert status == 202, body
    job_id = json.loads(body)["id"]
    status, _, body = secured.request("GET", f"/v1/jobs/{job_id}?wait=30", headers=full)
    assert status == 200 and json.loads(body)["state"] == "failed", body
    client = Browserless(secured.port)
    client.login()
    status, _, page = client.request("GET", f"/jobs/{job_id}")
    assert status == 200
    table = page[page.index('id="steps"') : page.index("</table>", page.index('id="steps"'))]
    rows = [html.unescape(row) for row in table.split('<tr class="step">')[1:]]
    assert [row.split("</td>")[1].rsplit(">", 1)[-1] for row in rows] == [
        "build",
        "test",
        "ship",
    ]
    states = [row.split("state-")[1].split('"')[0] for row in rows]
    assert states == ["succeeded", "failed", "skipped"]
    assert "<td>3</td>" in rows[1]  # the exit code of the failed step
    assert "a dag task of 3 steps" in page  # not the first step's command as its own
    link = html.unescape(rows[1].split('href="')[1].split('"')[0])
    status, headers, text = client.request("GET", link)
    assert (status, text) == (200, "testing\n")
    assert f'filename="{job_id}.test.log"' in headers["content-disposition"]
    assert client.request("GET", f"/jobs/{job_id}/output?step=nope")[0] == 404
