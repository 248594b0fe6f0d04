"""The jobs API against a real broker, a real gateway process (Hypercorn) and real
SQLite files: every endpoint, the bad inputs and the faults of issue 15 (queue full,
an unusable data dir, a second gateway, kill -9 then restart, the broker down).

Waiting is on observable state: the gateway's long poll (``GET /v1/jobs/{id}?wait=``),
followed output, its log lines; never a sleep."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jobs_support import call, immutable, wait
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec

from sockexec_py.testing import HarnessError

from conftest import MISC, Broker, GatewayProcess, StartBroker, wait_until

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def jobs(broker: Broker, data_dir: Path) -> Iterator[GatewayProcess]:
    process = GatewayProcess(broker.path, "--data-dir", str(data_dir))
    yield process
    process.stop()


def submit(gateway: GatewayProcess, **body: Any) -> dict[str, Any]:
    status, answer = call(gateway, "POST", "/v1/jobs", body)
    assert status == 202, answer
    return dict(answer)


def frames(gateway: GatewayProcess, job_id: str, query: str = "follow=1") -> list[dict[str, Any]]:
    status, _headers, data = gateway.request(
        "GET", f"/v1/jobs/{job_id}/output?{query}", headers={"Accept": "application/x-ndjson"}
    )
    assert status == 200, data
    return [json.loads(line) for line in data.splitlines()]


def printed(gateway: GatewayProcess, job_id: str) -> None:
    """Wait until a running job has printed something (its first line)."""

    def started() -> bool:
        _status, job = call(gateway, "GET", f"/v1/jobs/{job_id}")
        return bool(job["state"] == "running" and job["stdout_bytes"] > 0)

    wait_until(started, 10, f"job {job_id} to print")


# -- the document --------------------------------------------------------------------


class Document:
    """``/openapi.json``, and a check that an answer is what it documents."""

    def __init__(self, gateway: GatewayProcess) -> None:
        status, self.spec = call(gateway, "GET", "/openapi.json")
        assert status == 200
        validate_spec(self.spec)  # a valid OpenAPI 3.1 document

    def check(self, method: str, path: str, status: int, body: Any) -> None:
        operation = self.spec["paths"][path][method.lower()]
        assert str(status) in operation["responses"], (method, path, status, body)
        content = operation["responses"][str(status)].get("content", {})
        if body is None:
            assert not content.get("application/json"), (method, path, status)
            return
        schema = content["application/json"]["schema"]
        validator = Draft202012Validator({**schema, "components": self.spec["components"]})
        errors = [error.message for error in validator.iter_errors(body)]
        assert not errors, (method, path, status, errors, body)


def test_every_answer_is_documented(jobs: GatewayProcess) -> None:
    """Each endpoint, success and refusal, against the generated document."""
    document = Document(jobs)
    assert {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/output",
        "/v1/exec",
        "/v1/exec/ws",
    } <= set(document.spec["paths"])
    missing = "0" * 26
    done = submit(jobs, argv=["echo", "hi"], labels={"k": "v"})
    document.check("POST", "/v1/jobs", 202, done)
    queued = submit(jobs, argv=["true"], start_at="2999-01-01T00:00:00Z")
    cases: list[tuple[str, str, str, Any]] = [
        ("GET", f"/v1/jobs/{done['id']}?wait=5", "/v1/jobs/{job_id}", None),
        ("GET", f"/v1/jobs/{missing}", "/v1/jobs/{job_id}", None),
        ("GET", "/v1/jobs?limit=1&label=k=v&sort=ended", "/v1/jobs", None),
        ("GET", "/v1/jobs?limit=0", "/v1/jobs", None),
        ("GET", "/v1/jobs?bogus=1", "/v1/jobs", None),
        ("POST", "/v1/jobs", "/v1/jobs", {"argv": []}),
        ("POST", "/v1/jobs", "/v1/jobs", {"argv": ["x"], "start_at": "tomorrow"}),
        ("POST", f"/v1/jobs/{done['id']}/cancel", "/v1/jobs/{job_id}/cancel", None),
        ("POST", f"/v1/jobs/{queued['id']}/cancel", "/v1/jobs/{job_id}/cancel", None),
        ("DELETE", f"/v1/jobs/{missing}", "/v1/jobs/{job_id}", None),
        ("DELETE", f"/v1/jobs/{queued['id']}", "/v1/jobs/{job_id}", None),
        ("GET", f"/v1/jobs/{missing}/output", "/v1/jobs/{job_id}/output", None),
        ("GET", "/v1/jobs/x/output?stream=sideways", "/v1/jobs/{job_id}/output", None),
        ("POST", "/v1/exec", "/v1/exec", {"argv": ["true"]}),
        ("POST", "/v1/exec", "/v1/exec", {"argv": ["true"], "bogus": 1}),
        ("GET", "/healthz", "/healthz", None),
    ]
    for method, url, path, body in cases:
        status, answer = call(jobs, method, url, body)
        document.check(method, path, status, answer)
    assert call(jobs, "GET", f"/v1/jobs/{queued['id']}")[0] == 404  # cancelled, then deleted


# -- each endpoint -------------------------------------------------------------------


def test_submit_show_and_output(jobs: GatewayProcess) -> None:
    script = "echo '[1/2] fetch'; echo oops >&2; printf 'x%.0s' $(seq 5); echo; exit 3"
    accepted = submit(jobs, argv=["sh", "-c", script], name="build", labels={"team": "ops"})
    assert set(accepted) == {"id", "state", "position", "url"}
    assert accepted["url"] == f"/v1/jobs/{accepted['id']}" and len(accepted["id"]) == 26
    assert accepted["state"] in ("queued", "running")
    job = wait(jobs, accepted["id"])
    assert (job["state"], job["exitcode"], job["termsig"], job["name"]) == (
        "failed",
        3,
        None,
        "build",
    )
    assert job["labels"] == {"team": "ops"} and job["argv"][0] == "sh"
    assert job["progress"]["task"] == 1 and job["progress"]["tasks"] == 2
    assert job["progress"]["title"] == "fetch"
    assert job["stdout_bytes"] == len("[1/2] fetch\nxxxxx\n") and job["stderr_bytes"] == 5
    assert job["created_at"].endswith("Z") and job["duration"] >= 0
    status, _, data = jobs.request("GET", f"/v1/jobs/{job['id']}/output?stream=stdout")
    assert (status, data) == (200, b"[1/2] fetch\nxxxxx\n")
    status, _, data = jobs.request("GET", f"/v1/jobs/{job['id']}/output?stream=stdout&offset=12")
    assert data == b"xxxxx\n"
    status, _, data = jobs.request("GET", f"/v1/jobs/{job['id']}/output?stream=stderr")
    assert data == b"oops\n"
    lines = frames(jobs, job["id"], "stream=both&encoding=base64")
    assert lines[-1] == {
        "type": "exit",
        "exitcode": 3,
        "termsig": None,
        "state": "failed",
        "reason": None,
    }
    assert {line["type"] for line in lines[:-1]} == {"stdout", "stderr"}


def test_text_frames_keep_characters_whole(jobs: GatewayProcess) -> None:
    """Text frames decode each stream incrementally: 300 KiB of a three-byte
    character read in 256 KiB chunks (not a multiple of 3) comes back whole, with
    no U+FFFD, and each frame's offset is where its text's bytes begin; a cut
    character at the very end is one U+FFFD."""
    count = 100_000
    script = f"python3 -c \"import sys; sys.stdout.write('€' * {count}); sys.stdout.flush()\""
    job = wait(jobs, submit(jobs, argv=["sh", "-c", script + "; printf '\\342\\202'"])["id"])
    assert job["stdout_bytes"] == 3 * count + 2
    lines = frames(jobs, job["id"], "stream=stdout")
    out = [line for line in lines if line["type"] == "stdout"]
    assert len(out) >= 2  # it was read in more than one chunk
    assert "".join(line["data"] for line in out) == "€" * count + "\ufffd"
    position = 0
    for line in out:
        assert line["offset"] == position
        position += len(line["data"].encode()) if line["data"] != "\ufffd" else 2


def test_list_filters_sort_cursor_and_totals(jobs: GatewayProcess) -> None:
    ids = [
        submit(jobs, argv=["true"], name="lst", labels={"n": str(i % 2)})["id"] for i in range(5)
    ]
    for job_id in ids:
        wait(jobs, job_id)
    status, page = call(jobs, "GET", "/v1/jobs?name=lst&limit=2")
    assert status == 200 and [job["id"] for job in page["jobs"]] == ids[::-1][:2]
    assert page["totals"]["succeeded"] == 5 and sum(page["totals"].values()) == 5
    seen = [job["id"] for job in page["jobs"]]
    while page["next_cursor"]:
        status, page = call(jobs, "GET", f"/v1/jobs?name=lst&limit=2&cursor={page['next_cursor']}")
        seen += [job["id"] for job in page["jobs"]]
    assert seen == ids[::-1]
    _, page = call(jobs, "GET", "/v1/jobs?label=n=1&order=asc")
    assert [job["id"] for job in page["jobs"]] == [ids[1], ids[3]]
    _, page = call(jobs, "GET", "/v1/jobs?state=succeeded&state=failed&sort=ended&limit=10")
    assert len(page["jobs"]) == 5
    _, page = call(jobs, "GET", "/v1/jobs?state=queued")
    assert page["jobs"] == []
    _, page = call(jobs, "GET", "/v1/jobs?created_after=2999-01-01T00:00:00Z")
    assert page["jobs"] == []
    _, page = call(jobs, "GET", "/v1/jobs?created_before=4102444800&limit=1")
    assert len(page["jobs"]) == 1


def test_cancel_and_delete(jobs: GatewayProcess) -> None:
    running = submit(jobs, argv=["sh", "-c", "echo started; exec sleep 60"], name="c")
    queued = submit(jobs, argv=["true"], name="c")  # behind it: one per name
    scheduled = submit(jobs, argv=["true"], start_at=4102444800)
    assert scheduled["state"] == "scheduled" and queued["position"] == 0
    status, job = call(jobs, "GET", f"/v1/jobs/{queued['id']}")
    assert job["position"] == 0 and job["state"] == "queued"
    for waiting in (queued, scheduled):
        status, job = call(jobs, "POST", f"/v1/jobs/{waiting['id']}/cancel")
        assert (status, job["state"], job["started_at"]) == (200, "cancelled", None)
    printed(jobs, running["id"])
    status, job = call(jobs, "POST", f"/v1/jobs/{running['id']}/cancel")
    assert (status, job["state"], job["termsig"], job["exitcode"]) == (
        200,
        "cancelled",
        "TERM",
        None,
    )
    status, error = call(jobs, "POST", f"/v1/jobs/{running['id']}/cancel")
    assert status == 409 and error["error"] == "conflict" and "cancelled" in error["detail"]
    long = submit(jobs, argv=["sleep", "60"], name="d")
    status, error = call(jobs, "DELETE", f"/v1/jobs/{long['id']}")
    assert status == 409 and error["error"] == "conflict"
    call(jobs, "POST", f"/v1/jobs/{long['id']}/cancel")
    status, _ = call(jobs, "DELETE", f"/v1/jobs/{running['id']}")
    assert status == 204
    status, error = call(jobs, "GET", f"/v1/jobs/{running['id']}")
    assert status == 404 and error["error"] == "not_found"
    status, _, _data = jobs.request("GET", f"/v1/jobs/{running['id']}/output")
    assert status == 404


def test_cancel_escalates_to_kill(start_broker: StartBroker, data_dir: Path) -> None:
    broker = start_broker("-k", "1")
    with GatewayProcess(broker.path, "--data-dir", str(data_dir)) as gateway:
        job = submit(gateway, argv=[str(MISC / "ignore-term")])
        printed(gateway, job["id"])  # "ready": its TERM handler is set
        status, ended = call(gateway, "POST", f"/v1/jobs/{job['id']}/cancel")
        assert (status, ended["state"], ended["termsig"]) == (200, "cancelled", "KILL")


def test_many_followers_of_one_running_job(jobs: GatewayProcess, tmp_path: Path) -> None:
    """Followers from several offsets all get the output as it comes, then the exit
    frame; the program ran once (one broker session for all of them)."""
    marker = tmp_path / "runs"
    script = f"echo run >> {marker}; for i in 1 2 3; do echo line $i; sleep 0.1; done"
    job = submit(jobs, argv=["sh", "-c", script])
    connections = []
    for offset in (0, 0, 7, 14):
        conn = http.client.HTTPConnection("127.0.0.1", jobs.port, timeout=30)
        conn.request("GET", f"/v1/jobs/{job['id']}/output?follow=1&stream=stdout&offset={offset}")
        connections.append((offset, conn))
    for offset, conn in connections:
        response = conn.getresponse()
        assert response.status == 200
        lines = [json.loads(line) for line in response.read().splitlines()]
        conn.close()
        text = "".join(line.get("data", "") for line in lines)
        assert text == "line 1\nline 2\nline 3\n"[offset:]
        assert lines[-1]["type"] == "exit" and lines[-1]["exitcode"] == 0
    assert marker.read_text() == "run\n"
    # SSE by Accept, and base64 bytes.
    _status, headers, data = jobs.request(
        "GET",
        f"/v1/jobs/{job['id']}/output?follow=1&encoding=base64",
        headers={"Accept": "text/event-stream"},
    )
    assert headers["content-type"].startswith("text/event-stream")
    assert data.startswith(b"event: stdout\ndata: ") and b'"data_b64"' in data
    assert b"event: exit" in data


def test_keep_false_and_metrics(jobs: GatewayProcess) -> None:
    gone = submit(jobs, argv=["true"], keep=False, name="m")
    kept = submit(jobs, argv=["false"], keep=False, name="m")
    assert wait(jobs, kept["id"])["state"] == "failed"
    wait_until(lambda: call(jobs, "GET", f"/v1/jobs/{gone['id']}")[0] == 404, 10, "removal")
    submit(jobs, argv=["true"], name="later", start_at=4102444800)
    _, _, data = jobs.request("GET", "/metrics")
    text = data.decode()
    assert 'sockexec_gateway_jobs{state="failed"} 1.0' in text
    assert 'sockexec_gateway_jobs{state="scheduled"} 1.0' in text
    assert 'sockexec_gateway_job_run_seconds_count{state="failed"} 1.0' in text
    assert 'sockexec_gateway_requests_total{mode="jobs",status="202"} 3.0' in text
    blocker = submit(jobs, argv=["sleep", "60"], name="q")
    submit(jobs, argv=["true"], name="q")
    _, _, data = jobs.request("GET", "/metrics")
    assert 'sockexec_gateway_job_queue_length{name="q"} 1.0' in data.decode()
    call(jobs, "POST", f"/v1/jobs/{blocker['id']}/cancel")


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"argv": "ls"}, "argv: must be a non-empty list of strings"),
        ({"argv": ["ls"], "bogus": 1}, "unknown field: bogus"),
        ({"argv": ["ls"], "start_at": "next week"}, "start_at: expected an RFC 3339"),
        ({"argv": ["ls"], "start_at": -5}, "start_at: out of range"),
        ({"argv": ["ls"], "timeout": 0}, "timeout: input should be greater than 0"),
        ({"argv": ["ls"], "timeout": 1e12}, "timeout: more than"),
        ({"argv": ["ls"], "labels": {"bad key": "x"}}, "labels: bad key"),
        ({"argv": ["ls"], "stdin": "x" * (1 << 20 + 1)}, "stdin: longer than"),
        ({"argv": ["ls"], "name": "has space"}, "name: string should match pattern"),
        ({"argv": [""]}, "argv[0]: the program name is empty"),
    ],
)
def test_malformed_submissions_name_the_field(
    jobs: GatewayProcess, body: dict[str, Any], detail: str
) -> None:
    status, error = call(jobs, "POST", "/v1/jobs", body)
    assert status == 400 and error["error"] == "bad_request", error
    assert error["detail"].startswith(detail), error


def test_bad_ids_queries_and_types(jobs: GatewayProcess) -> None:
    for path in ("/v1/jobs/nope", "/v1/jobs/" + "0" * 26, "/v1/jobs/" + "Z" * 26 + "/output"):
        status, error = call(jobs, "GET", path)
        assert (status, error["error"]) == (404, "not_found"), path
    for query, field in (
        ("limit=5000", "limit"),
        ("limit=many", "limit"),
        ("state=sleeping", "state[0]"),
        ("sort=size", "sort"),
        ("created_after=yesterday", "created_after"),
        ("label=novalue", "label"),
        ("cursor=garbage", "cursor"),
    ):
        status, error = call(jobs, "GET", f"/v1/jobs?{query}")
        assert status == 400 and error["detail"].startswith(f"{field}:"), (query, error)
    conn = http.client.HTTPConnection("127.0.0.1", jobs.port, timeout=30)
    conn.request(
        "POST", "/v1/jobs", body=b'{"argv": ["true"]}', headers={"Content-Type": "text/plain"}
    )
    response = conn.getresponse()
    assert (
        response.status == 415 and json.loads(response.read())["error"] == "unsupported_media_type"
    )
    conn.close()
    status, _, data = jobs.request("POST", "/v1/jobs", headers=JSON, raw=b"{nope")
    assert status == 400 and json.loads(data)["detail"] == "the body is not valid JSON"
    status, _, data = jobs.request("GET", "/v1/jobs", headers={"Origin": "http://evil.example"})
    assert status == 403


def test_queue_full_is_429(broker: Broker, data_dir: Path) -> None:
    with GatewayProcess(
        broker.path, "--data-dir", str(data_dir), "--jobs-max-queue", "1"
    ) as gateway:
        blocker = submit(gateway, argv=["sleep", "60"], name="one")
        wait_until(
            lambda: call(gateway, "GET", f"/v1/jobs/{blocker['id']}")[1]["state"] == "running",
            10,
            "the first job to run",
        )
        submit(gateway, argv=["true"], name="one")
        status, error = call(gateway, "POST", "/v1/jobs", {"argv": ["true"], "name": "one"})
        assert status == 429 and error["error"] == "queue_full" and "'one'" in error["detail"]
        assert submit(gateway, argv=["true"], name="other")["state"] in ("queued", "running")
        call(gateway, "POST", f"/v1/jobs/{blocker['id']}/cancel")


def test_jobs_are_off_without_a_data_dir(gateway: GatewayProcess) -> None:
    status, error = call(gateway, "POST", "/v1/jobs", {"argv": ["true"]})
    assert status == 404 and error["error"] == "jobs_disabled" and "--data-dir" in error["detail"]


def test_auth_and_host_rules_apply_to_jobs(broker: Broker, data_dir: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    with GatewayProcess(
        broker.path, "--data-dir", str(data_dir), "--token-file", str(tokens)
    ) as gateway:
        assert call(gateway, "GET", "/v1/jobs")[0] == 401
        status, _, _ = gateway.request(
            "GET", "/v1/jobs", headers={"Authorization": "Bearer s3cret", "Host": "x.example"}
        )
        assert status == 200
    with GatewayProcess(broker.path) as tokenless:
        status, _, _ = tokenless.request("GET", "/v1/jobs", headers={"Host": "evil.example"})
        assert status == 421


# -- faults -------------------------------------------------------------------------


def _start_fails(broker: Broker, data_dir: Path) -> str:
    command = [sys.executable, "-m", "sockexec_py.gateway", "--socket", str(broker.path)]
    proc = subprocess.run(
        [*command, "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 111, proc.stderr
    assert proc.stderr.count("\n") == 1 and "listening" not in proc.stderr, proc.stderr
    return proc.stderr


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--jobs-limit", "nolimit"),
        ("--jobs-limit", "build=0"),
        ("--jobs-keep", "7y"),
        ("--jobs-keep", "0"),
        ("--jobs-max-running", "0"),
        ("--jobs-max-queue", "-1"),
        ("--job-output-max", "lots"),
        ("--jobs-keep-max", "0"),
    ],
)
def test_bad_jobs_flags_are_usage_errors(
    broker: Broker, tmp_path: Path, flag: str, value: str
) -> None:
    command = [sys.executable, "-m", "sockexec_py.gateway", "--socket", str(broker.path)]
    proc = subprocess.run(
        [*command, "--data-dir", str(tmp_path / "data"), flag, value],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 100, proc.stderr
    assert flag in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_a_second_gateway_on_the_data_dir_is_refused(
    jobs: GatewayProcess, broker: Broker, data_dir: Path
) -> None:
    error = _start_fails(broker, data_dir)
    assert f"the data dir {data_dir} is in use by another gateway (pid {jobs.proc.pid})" in error


def test_an_unusable_data_dir_is_a_startup_error(broker: Broker, tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert "cannot use the data dir" in _start_fails(broker, blocked / "data")
    locked = tmp_path / "immutable"
    locked.mkdir()
    immutable(locked, True)
    try:
        assert f"cannot use the data dir {locked}" in _start_fails(broker, locked)
    finally:
        immutable(locked, False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    import sqlite3

    with sqlite3.connect(foreign / "jobs.db") as conn:
        conn.execute("CREATE TABLE mine (x)")
    conn.close()
    assert "did not create" in _start_fails(broker, foreign)


def test_unwritable_store_is_503_and_nothing_half_written(
    jobs: GatewayProcess, data_dir: Path
) -> None:
    first = submit(jobs, argv=["true"], start_at=4102444800, labels={"a": "b"})
    wal = data_dir / "jobs.db-wal"
    assert wal.exists()
    immutable(wal, True)
    try:
        status, error = call(jobs, "POST", "/v1/jobs", {"argv": ["true"], "labels": {"x": "y"}})
        assert status == 503 and error["error"] == "store_unavailable", error
        assert "\n" not in error["detail"] and "cannot write the job store" in error["detail"]
        status, page = call(jobs, "GET", "/v1/jobs")  # reads still work
        assert status == 200 and [job["id"] for job in page["jobs"]] == [first["id"]]
    finally:
        immutable(wal, False)
    second = submit(jobs, argv=["true"], start_at=4102444800)
    _, page = call(jobs, "GET", "/v1/jobs?label=x=y")
    assert page["jobs"] == []  # the refused submit left no label behind
    _, page = call(jobs, "GET", "/v1/jobs")
    assert [job["id"] for job in page["jobs"]] == [second["id"], first["id"]]
    assert page["totals"]["scheduled"] == 2


def test_an_end_the_store_refuses_is_recorded_once_it_can(
    jobs: GatewayProcess, data_dir: Path, tmp_path: Path
) -> None:
    """A job ends while the store cannot be written: the gateway keeps its end and
    records it when the store comes back (not ``lost`` at the next start)."""
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    job_id = submit(jobs, argv=["sh", "-c", f'read x < "{fifo}"; echo done'])["id"]
    wait_until(lambda: call(jobs, "GET", f"/v1/jobs/{job_id}")[1]["state"] == "running", 10, "it")
    wal = data_dir / "jobs.db-wal"
    immutable(wal, True)
    try:
        fd = os.open(fifo, os.O_WRONLY)  # the program reads: it runs
        os.write(fd, b"go\n")
        os.close(fd)
        jobs.log_until(f"cannot record the end of job {job_id}")
        status, job = call(jobs, "GET", f"/v1/jobs/{job_id}")
        assert (status, job["state"]) == (200, "running")  # as recorded, for now
    finally:
        immutable(wal, False)
    job = wait(jobs, job_id)
    assert (job["state"], job["exitcode"]) == ("succeeded", 0)
    status, _, body = jobs.request("GET", f"/v1/jobs/{job_id}/output")
    assert (status, body) == (200, b"done\n")


def test_kill_9_mid_run_then_restart(broker: Broker, data_dir: Path, tmp_path: Path) -> None:
    """kill -9 of the gateway while a job runs and two wait: at the next start the
    running one is lost (with the reason), the waiting ones run, once each."""
    marker = tmp_path / "ran"
    gateway = GatewayProcess(broker.path, "--data-dir", str(data_dir))
    try:
        running = submit(gateway, argv=["sh", "-c", "echo up; exec sleep 60"], name="k")
        queued = submit(gateway, argv=["sh", "-c", f"echo q >> {marker}"], name="k")
        soon = time.time() + 1  # due after the restart: it waits as scheduled, then queued
        later = submit(gateway, argv=["sh", "-c", f"echo s >> {marker}"], name="k", start_at=soon)
        assert later["state"] == "scheduled"
        printed(gateway, running["id"])
    except BaseException:
        gateway.stop()
        raise
    gateway.kill()
    broker.wait_idle()  # the session dropped: the broker terminated sleep
    with GatewayProcess(broker.path, "--data-dir", str(data_dir)) as restarted:
        lost = wait(restarted, running["id"])
        assert lost["state"] == "lost" and "gateway stopped while it ran" in lost["reason"]
        assert wait(restarted, queued["id"])["state"] == "succeeded"
        assert wait(restarted, later["id"])["state"] == "succeeded"
        _, page = call(restarted, "GET", "/v1/jobs")
        assert sorted(job["id"] for job in page["jobs"]) == sorted(
            job["id"] for job in (running, queued, later)
        )
    assert sorted(marker.read_text().split()) == ["q", "s"]


def test_broker_down_jobs_stay_queued_then_run(start_broker: StartBroker, tmp_path: Path) -> None:
    socket_path = tmp_path / "broker0.sock"  # where start_broker puts the first broker
    with GatewayProcess(socket_path, "--data-dir", str(tmp_path / "data")) as gateway:
        job = submit(gateway, argv=["echo", "finally"])
        gateway.log_until(f"broker unavailable, job {job['id']} stays queued", count=2)
        _status, seen = call(gateway, "GET", f"/v1/jobs/{job['id']}")
        assert seen["state"] in ("queued", "running") and seen["exitcode"] is None
        broker = start_broker()
        assert broker.path == socket_path
        done = wait(gateway, job["id"])
        assert (done["state"], done["exitcode"]) == ("succeeded", 0)
        _, _, data = gateway.request("GET", f"/v1/jobs/{job['id']}/output")
        assert data == b"finally\n"
        _, page = call(gateway, "GET", "/v1/jobs")
        assert page["totals"]["failed"] == 0


def test_harness_log_until_times_out(broker: Broker) -> None:
    with GatewayProcess(broker.path) as gateway, pytest.raises(HarnessError):
        gateway.log_until("never printed", timeout=0.2)
