"""Signed callbacks through a real gateway and broker to a real HTTP receiver on
loopback, which checks every signature with ``hmac``: delivered once; a receiver
that is down, slow, answers 500 or redirects; a URL resolving to a forbidden
address; URLs refused at submit; and a pending delivery resumed after kill -9."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jobs_support import call

from conftest import Broker, GatewayProcess, wait_until

SECRET = b"callback-secret-\x00\xff-bytes"


class Receiver:
    """An HTTP server on loopback: each path answers as ``behaviour[path]`` says
    (a status, a list of statuses taken in turn, or "slow"); every request is
    recorded with whether its signature and timestamp were right."""

    def __init__(self) -> None:
        self.behaviour: dict[str, Any] = {}
        self.secret = SECRET  # what signatures are checked with
        self.hits: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        self.release = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                stamp = self.headers["X-Sockexec-Timestamp"]
                expected = hmac.new(receiver.secret, stamp.encode() + b"." + body, hashlib.sha256)
                signed = hmac.compare_digest(
                    "sha256=" + expected.hexdigest(), self.headers["X-Sockexec-Signature"]
                )
                fresh = abs(time.time() - int(stamp)) < 300  # the receiver's replay window
                answer = receiver.behaviour.get(self.path, 200)
                if isinstance(answer, list):
                    answer = answer.pop(0) if len(answer) > 1 else answer[0]
                hit = {
                    "path": self.path,
                    "signed": signed and fresh,
                    "body": json.loads(body),
                    "delivery": self.headers["X-Sockexec-Delivery"],
                    "attempt": int(self.headers["X-Sockexec-Attempt"]),
                    "answer": answer,
                }
                with receiver.changed:
                    receiver.hits.append(hit)
                    receiver.changed.notify_all()
                if answer == "slow":
                    receiver.release.wait(30)  # past the gateway's timeout
                    answer = 200
                if answer == "huge":  # says 1 GiB is coming, sends 1 MiB, closes
                    self.send_response(200)
                    self.send_header("Content-Length", str(1 << 30))
                    self.end_headers()
                    self.wfile.write(b"x" * (1 << 20))
                    return
                self.send_response(answer)
                if 300 <= answer < 400:
                    self.send_header("Location", "/ok")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def delivered(self, path: str) -> list[dict[str, Any]]:
        return [hit for hit in self.hits if hit["path"] == path and hit["answer"] == 200]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def gateway_flags(tmp_path: Path, receiver: Receiver, *more: str) -> list[str]:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    return [
        "--data-dir",
        str(tmp_path / "data"),
        "--callback-secret-file",
        str(secret),
        "--callback-allow",
        f"loopback={receiver.url('/')}",
        "--callback-allow",
        f"http://localhost:{receiver.port}/",  # no loopback: localhost is refused
        "--callback-timeout",
        "0.5",
        "--callback-attempts",
        "3",
        "--callback-backoff",
        "0.05",
        *more,
    ]


def submit(gateway: GatewayProcess, url: str, **body: Any) -> str:
    body.setdefault("argv", ["sh", "-c", "echo done; exit 3"])
    status, answer = call(gateway, "POST", "/v1/jobs", {**body, "callback": {"url": url}})
    assert status == 202, answer
    return str(answer["id"])


def callback_ended(gateway: GatewayProcess, job_id: str) -> dict[str, Any]:
    """The job's callback once it was delivered or given up."""
    found: dict[str, Any] = {}

    def ended() -> bool:
        _, job = call(gateway, "GET", f"/v1/jobs/{job_id}")
        found.update(job)
        return bool(job["callback"]["state"] in ("delivered", "failed"))

    wait_until(ended, 30, f"the callback of {job_id}")
    return found


def test_delivered_once_signed_with_the_status(
    broker: Broker, tmp_path: Path, receiver: Receiver
) -> None:
    with GatewayProcess(broker.path, *gateway_flags(tmp_path, receiver)) as gateway:
        job_id = submit(gateway, receiver.url("/ok"), labels={"team": "ops"})
        job = callback_ended(gateway, job_id)
        callback = job["callback"]
        assert callback["state"] == "delivered" and callback["delivered_at"]
        assert [(a["status"], a["error"]) for a in callback["attempts"]] == [(200, None)]
        (hit,) = receiver.delivered("/ok")
        assert hit["signed"] and hit["delivery"] == job_id and hit["attempt"] == 1
        body = hit["body"]  # the job's status as it ended
        assert (body["id"], body["state"], body["exitcode"]) == (job_id, "failed", 3)
        assert body["labels"] == {"team": "ops"} and "callback" not in body
        # A task's callback carries its steps.
        task = submit(
            gateway,
            receiver.url("/task"),
            argv=None,
            steps=[{"name": "a", "argv": ["true"]}, {"name": "b", "argv": ["false"]}],
        )
        callback_ended(gateway, task)
        (hit,) = receiver.delivered("/task")
        assert hit["signed"] and [s["state"] for s in hit["body"]["steps"]] == [
            "succeeded",
            "failed",
        ]


def test_a_rewritten_secret_signs_the_next_callbacks(
    broker: Broker, tmp_path: Path, receiver: Receiver
) -> None:
    """The secret file is read again when it changes: a new key (renamed over the
    file) signs the next delivery; an emptied file keeps the last key, said once."""
    with GatewayProcess(broker.path, *gateway_flags(tmp_path, receiver)) as gateway:
        gateway.log_until("listening")
        callback_ended(gateway, submit(gateway, receiver.url("/before")))
        assert [hit["signed"] for hit in receiver.delivered("/before")] == [True]
        fresh = tmp_path / "secret.new"
        fresh.write_bytes(b"the rotated key\n")
        fresh.rename(tmp_path / "secret")
        receiver.secret = b"the rotated key"
        callback_ended(gateway, submit(gateway, receiver.url("/after")))
        assert [hit["signed"] for hit in receiver.delivered("/after")] == [True]
        (tmp_path / "secret").write_bytes(b"")  # a writer that truncated, not done yet
        for path in ("/kept", "/kept-again"):
            callback_ended(gateway, submit(gateway, receiver.url(path)))
            assert [hit["signed"] for hit in receiver.delivered(path)] == [True]
        gateway.log_until("keeping the last good version")
    warnings = [line for line in gateway.lines if "keeping the last good version" in line]
    assert len(warnings) == 1 and "is empty" in warnings[0]


def test_500_is_retried_then_delivered(broker: Broker, tmp_path: Path, receiver: Receiver) -> None:
    receiver.behaviour["/flaky"] = [500, 503, 200]
    receiver.behaviour["/broken"] = 500
    with GatewayProcess(broker.path, *gateway_flags(tmp_path, receiver)) as gateway:
        flaky = callback_ended(gateway, submit(gateway, receiver.url("/flaky")))["callback"]
        assert flaky["state"] == "delivered"
        assert [a["status"] for a in flaky["attempts"]] == [500, 503, 200]
        assert [a["error"] for a in flaky["attempts"]] == ["HTTP 500", "HTTP 503", None]
        broken = callback_ended(gateway, submit(gateway, receiver.url("/broken")))["callback"]
        assert broken["state"] == "failed" and len(broken["attempts"]) == 3  # --callback-attempts
        hits = [hit for hit in receiver.hits if hit["path"] in ("/flaky", "/broken")]
        assert all(hit["signed"] for hit in hits) and len(hits) == 6
        assert [hit["attempt"] for hit in hits if hit["path"] == "/broken"] == [1, 2, 3]


def test_a_receiver_that_is_down_slow_or_redirects(
    broker: Broker, tmp_path: Path, receiver: Receiver
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        down_port = sock.getsockname()[1]
    receiver.behaviour["/slow"] = "slow"
    receiver.behaviour["/moved"] = 302
    receiver.behaviour["/huge"] = "huge"
    flags = gateway_flags(
        tmp_path,
        receiver,
        "--callback-allow",
        f"loopback=http://127.0.0.1:{down_port}/",
        "--callback-allow",
        "http://nowhere.invalid/",  # a name that never resolves (RFC 2606)
    )
    with GatewayProcess(broker.path, *flags) as gateway:
        down = submit(gateway, f"http://127.0.0.1:{down_port}/hook")
        slow = submit(gateway, receiver.url("/slow"))
        moved = submit(gateway, receiver.url("/moved"))
        huge = submit(gateway, receiver.url("/huge"))
        unknown = submit(gateway, "http://nowhere.invalid/hook")
        down_cb = callback_ended(gateway, down)["callback"]
        assert down_cb["state"] == "failed" and len(down_cb["attempts"]) == 3
        assert all(a["status"] is None and "Connect" in a["error"] for a in down_cb["attempts"])
        slow_cb = callback_ended(gateway, slow)["callback"]
        assert slow_cb["state"] == "failed" and len(slow_cb["attempts"]) == 3
        assert slow_cb["attempts"][0]["error"] == "no answer within 0.5 s"
        assert all(a["duration"] < 5 for a in slow_cb["attempts"])
        moved_cb = callback_ended(gateway, moved)["callback"]
        assert moved_cb["state"] == "failed" and len(moved_cb["attempts"]) == 1  # not retried
        assert moved_cb["attempts"][0]["error"] == "redirect 302 to '/ok' not followed"
        assert receiver.delivered("/ok") == []  # the redirect was not followed
        # The answer's status is what counts: its body is never read, whatever it says.
        huge_cb = callback_ended(gateway, huge)["callback"]
        assert huge_cb["state"] == "delivered" and len(huge_cb["attempts"]) == 1
        # A name that does not resolve is a network error: recorded, retried.
        unknown_cb = callback_ended(gateway, unknown)["callback"]
        assert unknown_cb["state"] == "failed" and len(unknown_cb["attempts"]) == 3
        assert all(a["status"] is None and a["error"] for a in unknown_cb["attempts"])


def test_forbidden_addresses_are_never_connected(
    broker: Broker, tmp_path: Path, receiver: Receiver
) -> None:
    """``http://localhost:PORT/`` is allowed as a prefix, but without ``loopback=``
    the address it resolves to is not: refused before any connection, no retry."""
    with GatewayProcess(broker.path, *gateway_flags(tmp_path, receiver)) as gateway:
        job_id = submit(gateway, receiver.url("/named", host="localhost"))
        callback = callback_ended(gateway, job_id)["callback"]
        assert callback["state"] == "failed" and len(callback["attempts"]) == 1
        error = callback["attempts"][0]["error"]
        assert error.startswith("refused: localhost resolves to ") and "(loopback)" in error
        assert [hit for hit in receiver.hits if hit["path"] == "/named"] == []


def test_urls_refused_at_submit(broker: Broker, tmp_path: Path, receiver: Receiver) -> None:
    with GatewayProcess(broker.path, "--data-dir", str(tmp_path / "off")) as gateway:
        body = {"argv": ["true"], "callback": {"url": receiver.url("/ok")}}
        status, error = call(gateway, "POST", "/v1/jobs", body)
        assert status == 400 and "--callback-allow" in error["detail"]
    with GatewayProcess(broker.path, *gateway_flags(tmp_path, receiver)) as gateway:
        for url, detail in (
            ("http://example.com/hook", "matches no --callback-allow prefix"),
            (receiver.url("/a/../admin"), ". or .. segments"),
            (receiver.url("/a%2f..%2fadmin"), ". or .. segments"),
            (f"http://user:pw@127.0.0.1:{receiver.port}/", "user info"),
            (f"ftp://127.0.0.1:{receiver.port}/", "scheme must be http or https"),
            (f"https://127.0.0.1:{receiver.port}/", "matches no --callback-allow prefix"),
            ("http://[::1/hook", "host cannot be parsed"),
            ("http://[zz]:80/hook", "host cannot be parsed"),
        ):
            status, error = call(
                gateway, "POST", "/v1/jobs", {"argv": ["true"], "callback": {"url": url}}
            )
            assert status == 400 and error["detail"].startswith("callback.url: "), (url, error)
            assert detail in error["detail"], (url, error)
        _, page = call(gateway, "GET", "/v1/jobs")
        assert page["jobs"] == []


def test_a_pending_delivery_resumes_after_kill_9(
    broker: Broker, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.behaviour["/later"] = 503
    flags = gateway_flags(tmp_path, receiver)
    flags[flags.index("--callback-backoff") + 1] = "2"
    gateway = GatewayProcess(broker.path, *flags)
    try:
        job_id = submit(gateway, receiver.url("/later"))

        def tried() -> bool:
            _, job = call(gateway, "GET", f"/v1/jobs/{job_id}")
            return bool(job["callback"]["attempts"])

        wait_until(tried, 20, "the first attempt")
    except BaseException:
        gateway.stop()
        raise
    gateway.kill()
    receiver.behaviour["/later"] = 200
    with GatewayProcess(broker.path, *flags) as restarted:
        callback = callback_ended(restarted, job_id)["callback"]
    assert callback["state"] == "delivered"
    assert [a["status"] for a in callback["attempts"]] == [503, 200]
    (hit,) = receiver.delivered("/later")
    assert hit["signed"] and hit["attempt"] == 2 and hit["delivery"] == job_id
