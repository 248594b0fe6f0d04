"""Scoped tokens (issue 16) against a real gateway and broker: the matrix of every
action against every endpoint, a token's names, an expired token, the listing and
the monitor narrowed to a token's names, a token file rewritten while requests
run, and logs that name tokens by fingerprint only."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sockexec_py.gateway.auth import ACTIONS, NameScope, TokenFileError, fingerprint, parse_tokens

from conftest import Broker, GatewayProcess

FULL = "full-access-token"
#: One token per action, scoped to the program (and job name) ``echo``.
SCOPED = {action: f"only-{action}-on-echo" for action in ACTIONS}
BOTH = "monitor-and-status-on-echo"
TOKEN_FILE = "\n".join(
    [
        "# a bare token may do everything",
        FULL,
        *(f"{token}  actions={action}  names=echo" for action, token in SCOPED.items()),
        f"{BOTH}\tactions=monitor,status names=echo",
        "expired-token actions=status expires=2001-01-01T00:00:00Z",
        "prefix-token actions=status,run names=ec*",
    ]
)


GATEWAY = [sys.executable, "-m", "sockexec_py.gateway", "--listen", "127.0.0.1:0"]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("tokens")
    (tmp / "tokens").write_text(TOKEN_FILE)
    broker = Broker(tmp / "broker.sock", ())
    process = GatewayProcess(
        broker.path, "--token-file", str(tmp / "tokens"), "--data-dir", str(tmp / "data")
    )
    yield process
    process.stop()
    broker.stop()


def call(
    gateway: GatewayProcess, method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    status, _, data = gateway.request(method, path, body, headers=auth(token))
    try:
        return status, json.loads(data) if data else None
    except ValueError:
        return status, data


def upgrade(gateway: GatewayProcess, path: str, token: str) -> tuple[int, Any]:
    """A WebSocket handshake: 101, or the refusal's status and JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        conn.request(
            "GET",
            path,
            headers={
                **auth(token),
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        )
        response = conn.getresponse()
        if response.status == 101:
            return 101, None
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def job(gateway: GatewayProcess, **body: Any) -> str:
    status, answer = call(gateway, "POST", "/v1/jobs", FULL, body)
    assert status == 202, answer
    return str(answer["id"])


def test_every_action_against_every_endpoint(gateway: GatewayProcess) -> None:
    """Each endpoint with each single-action token (names=echo): allowed only with
    its action; every refusal is 403 naming the missing scope. Then the same with
    the right action on a name outside the token's scope."""
    done = job(gateway, argv=["echo", "hi"])
    call(gateway, "GET", f"/v1/jobs/{done}?wait=10", FULL)

    def later() -> str:  # a job that waits (cancel and delete change it)
        return job(gateway, argv=["echo", "later"], start_at=4102444800)

    endpoints: list[tuple[str, set[str], Any]] = [
        ("exec", {"exec"}, lambda t: call(gateway, "POST", "/v1/exec", t, {"argv": ["echo"]})),
        ("submit", {"run"}, lambda t: call(gateway, "POST", "/v1/jobs", t, {"argv": ["echo"]})),
        ("list", {"status"}, lambda t: call(gateway, "GET", "/v1/jobs?name=echo", t)),
        ("show", {"status"}, lambda t: call(gateway, "GET", f"/v1/jobs/{done}", t)),
        ("output", {"status"}, lambda t: call(gateway, "GET", f"/v1/jobs/{done}/output", t)),
        ("cancel", {"cancel"}, lambda t: call(gateway, "POST", f"/v1/jobs/{later()}/cancel", t)),
        (
            "cancel step",
            {"cancel"},
            lambda t: call(gateway, "POST", f"/v1/jobs/{later()}/steps/x/cancel", t),
        ),
        ("delete", {"cancel"}, lambda t: call(gateway, "DELETE", f"/v1/jobs/{later()}", t)),
        ("monitor", {"monitor", "status"}, lambda t: upgrade(gateway, "/v1/monitor?name=echo", t)),
        ("metrics", {"admin"}, lambda t: call(gateway, "GET", "/metrics", t)),
    ]
    tokens = {frozenset({action}): token for action, token in SCOPED.items()}
    tokens[frozenset({"monitor", "status"})] = BOTH
    for what, needs, request in endpoints:
        for actions, token in tokens.items():
            status, answer = request(token)
            if needs <= actions:
                assert status != 403, (what, token, answer)
                continue
            assert status == 403, (what, token, status, answer)
            missing = sorted(needs - actions)[0] if len(needs - actions) == 1 else None
            assert answer["error"] == "missing_scope", (what, token, answer)
            if missing is not None:
                assert f"lacks the scope {missing}" in answer["detail"], (what, answer)
        assert request(FULL)[0] != 403, what
    # The right action on a name it does not cover.
    outside = job(gateway, argv=["true"])
    call(gateway, "GET", f"/v1/jobs/{outside}?wait=10", FULL)
    status, answer = call(gateway, "POST", "/v1/exec", SCOPED["exec"], {"argv": ["true"]})
    assert status == 403 and answer["detail"] == "this token lacks the scope exec on 'true'"
    status, answer = call(gateway, "POST", "/v1/jobs", SCOPED["run"], {"argv": ["true"]})
    assert status == 403 and "run on 'true'" in answer["detail"]
    body = {"argv": ["echo"], "name": "other"}  # its program is allowed, its name is not
    status, answer = call(gateway, "POST", "/v1/jobs", SCOPED["run"], body)
    assert status == 403 and "run on 'other'" in answer["detail"]
    task = {"steps": [{"name": "a", "argv": ["echo"]}, {"name": "b", "argv": ["rm", "x"]}]}
    status, answer = call(gateway, "POST", "/v1/jobs", SCOPED["run"], task)
    assert status == 403 and "run on 'rm'" in answer["detail"]  # every step's program
    for path in (f"/v1/jobs/{outside}", f"/v1/jobs/{outside}/output"):
        status, answer = call(gateway, "GET", path, SCOPED["status"])
        assert status == 403 and "status on 'true'" in answer["detail"]
    status, answer = call(gateway, "POST", f"/v1/jobs/{outside}/cancel", SCOPED["cancel"])
    assert status == 403 and "cancel on 'true'" in answer["detail"]
    assert upgrade(gateway, "/v1/monitor?name=true", BOTH)[0] == 403
    # A prefix scope covers the names it starts.
    assert call(gateway, "POST", "/v1/jobs", "prefix-token", {"argv": ["echo"]})[0] == 202
    assert call(gateway, "POST", "/v1/jobs", "prefix-token", {"argv": ["true"]})[0] == 403


def test_listing_and_monitor_show_only_the_tokens_names(gateway: GatewayProcess) -> None:
    mine = job(gateway, argv=["echo", "mine"])
    theirs = job(gateway, argv=["true"], name="theirs")
    for job_id in (mine, theirs):
        call(gateway, "GET", f"/v1/jobs/{job_id}?wait=10", FULL)
    status, page = call(gateway, "GET", "/v1/jobs?limit=1000", SCOPED["status"])
    assert status == 200 and page["totals"] == {}  # counts would tell about other names
    names = {each["name"] for each in page["jobs"]}
    assert names == {"echo"} and mine in {each["id"] for each in page["jobs"]}
    status, page = call(gateway, "GET", "/v1/jobs?limit=1000", FULL)
    assert theirs in {each["id"] for each in page["jobs"]} and page["totals"]["succeeded"] >= 2
    status, answer = call(gateway, "GET", "/v1/jobs?name=theirs", SCOPED["status"])
    assert status == 403 and "status on 'theirs'" in answer["detail"]
    # The monitor of a token scoped to echo replays echo's events only.
    from sockexec_py.client.jobs import monitor

    events = monitor(gateway.base, since=0, token=BOTH, reconnect=False)
    seen = []
    for event in events:
        seen.append(event)
        if event.job == mine and event.type == "finished":
            break
    events.close()
    assert {event.name for event in seen} == {"echo"}


def test_expired_and_unknown_tokens_are_401(gateway: GatewayProcess) -> None:
    status, answer = call(gateway, "GET", "/v1/jobs", "expired-token")
    assert status == 401 and answer["error"] == "token_expired"
    assert answer["detail"] == "this token expired at 2001-01-01T00:00:00Z"
    status, answer = upgrade(gateway, "/v1/monitor", "expired-token")
    assert status == 401 and answer["error"] == "token_expired"
    assert call(gateway, "GET", "/v1/jobs", "nobody")[0] == 401


def test_logs_name_tokens_by_fingerprint_only(gateway: GatewayProcess) -> None:
    call(gateway, "GET", "/metrics", SCOPED["status"])  # refused: an audit line
    job(gateway, argv=["echo", "audited"])
    refused = fingerprint(SCOPED["status"].encode())
    gateway.log_until(f"refused {refused}: missing scope admin")
    gateway.log_until(f"{fingerprint(FULL.encode())} submitted job")
    log = "".join(gateway.lines)
    for token in (FULL, *SCOPED.values(), BOTH, "expired-token", "prefix-token"):
        assert token not in log


def test_token_file_syntax_errors_name_the_line(broker: Broker, tmp_path: Path) -> None:
    for line, message in (
        ("t0ken actions=run,fly", "line 2: unknown action fly"),
        ("t0ken colour=blue", "line 2: unknown field colour"),
        ("t0ken names", "line 2: expected key=value"),
        ("t0ken expires=soon", "line 2: expires: expected an RFC 3339"),
        ("t0ken names=a*b", "line 2: names: bad name 'a*b'"),
    ):
        path = tmp_path / "tokens"
        path.write_text(f"good\n{line}\n")
        with pytest.raises(TokenFileError, match=re.escape(message)):
            parse_tokens(path.read_bytes(), str(path))
        proc = subprocess.run(
            [*GATEWAY, "--socket", str(broker.path), "--token-file", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 100 and message in proc.stderr, proc.stderr
        assert "t0ken" not in proc.stderr and proc.stderr.count("\n") == 1
    assert NameScope.parse("a,b*").covers("bee") and not NameScope.parse("a,b*").covers("c")


def test_a_prefix_does_not_take_a_name_that_climbs_out_of_it() -> None:
    scope = NameScope.parse("/opt/jobs/*,deploy-*,/srv/x/../y")
    assert scope.covers("/opt/jobs/build.sh") and scope.covers("/opt/jobs/sub/./a..b")
    assert scope.covers("deploy-..")  # not a segment of its own: it does not climb
    for name in ("/opt/jobs/../../bin/sh", "/opt/jobs/sub/../../../bin/sh", "/opt/jobs/.."):
        assert not scope.covers(name), name
    assert scope.covers("/srv/x/../y")  # an exact name is exactly what the file says


def test_exec_refuses_a_climbing_program(broker: Broker, tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"jobs-token actions=exec,run names={tmp_path}/*\n")
    climbing = f"{tmp_path}/../../../../../../../bin/echo"
    args = ("--token-file", str(path), "--data-dir", str(tmp_path / "data"))
    with GatewayProcess(broker.path, *args) as gateway:
        for route, body in (
            ("/v1/exec", {"argv": [climbing, "x"]}),
            ("/v1/jobs", {"argv": [climbing]}),
        ):
            status, answer = call(gateway, "POST", route, "jobs-token", body)
            assert status == 403 and "missing_scope" in str(answer), (route, answer)


def test_a_token_file_rewritten_while_requests_run(broker: Broker, tmp_path: Path) -> None:
    """A writer thread rewrites the file as fast as it can, half the time in place
    (truncate, then one write) and half by renaming a new file over it; the token
    in every version is never refused, a token in none (a prefix of it: what a
    half-read line would give) is never accepted."""
    path = tmp_path / "tokens"
    stable = "stable-token-0123456789"
    versions = [f"{stable} actions=admin\nrotating-a\n", f"rotating-b\n{stable} actions=admin\n"]
    path.write_text(versions[0])
    stop = threading.Event()
    rewrites = [0]

    def writer() -> None:
        while not stop.is_set():
            text = versions[rewrites[0] % 2]
            if rewrites[0] % 4 < 2:
                path.write_text(text)  # in place: truncate, then one write
            else:
                fresh = tmp_path / "tokens.new"
                fresh.write_text(text)
                os.replace(fresh, path)
            rewrites[0] += 1

    with GatewayProcess(broker.path, "--token-file", str(path)) as gateway:
        thread = threading.Thread(target=writer)
        thread.start()
        try:
            statuses = [
                gateway.request("GET", "/metrics", headers=auth(stable))[0] for _ in range(150)
            ]
            halves = [
                gateway.request("GET", "/metrics", headers=auth(stable[:10]))[0] for _ in range(50)
            ]
        finally:
            stop.set()
            thread.join()
    assert rewrites[0] > 100, rewrites
    assert set(statuses) == {200}, statuses
    assert set(halves) == {401}, halves
