"""The HTTP/WebSocket gateway against a real broker and a real gateway process."""

from __future__ import annotations

import base64
import http.client
import json
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from trio_websocket import ConnectionClosed, open_websocket_url

from sockexec_py.client import open_session
from sockexec_py.events import Output

from conftest import MISC, Broker, GatewayProcess, StartBroker, pid_alive, wait_exit, wait_until

ROOT = Path(__file__).resolve().parent.parent
JSON = {"Content-Type": "application/json"}
NDJSON = "application/x-ndjson"


def _post(
    gateway: GatewayProcess,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    query: str = "",
) -> tuple[int, dict[str, str], bytes]:
    """``POST /v1/exec`` with a JSON content type (``headers`` added or overriding)."""
    return gateway.request("POST", "/v1/exec" + query, body, {**JSON, **(headers or {})}, raw)


def _exec(gateway: GatewayProcess, body: Any, query: str = "") -> tuple[int, dict[str, Any]]:
    status, _, data = _post(gateway, body, query=query)
    return status, json.loads(data)


def test_one_shot_json(gateway: GatewayProcess) -> None:
    status, result = _exec(gateway, {"argv": ["sh", "-c", "echo out; echo err >&2; exit 3"]})
    assert status == 200
    assert (result["stdout"], result["stderr"], result["exitcode"]) == ("out\n", "err\n", 3)
    assert result["termsig"] is None and result["duration_ms"] > 0
    status, result = _exec(gateway, {"argv": ["cat"], "stdin": "héllo"})
    assert (status, result["stdout"]) == (200, "héllo")
    status, result = _exec(gateway, {"argv": ["sh", "-c", "kill -TERM $$"]})
    assert (result["exitcode"], result["termsig"]) == (None, "TERM")


def test_five_megabytes_binary_round_trip_in_base64(gateway: GatewayProcess) -> None:
    payload = random.Random(5).randbytes(5_000_000)
    body = {"argv": ["cat"], "stdin_b64": base64.b64encode(payload).decode()}
    status, result = _exec(gateway, body, "?encoding=base64")
    assert status == 200
    assert base64.b64decode(result["stdout_b64"]) == payload
    assert result["stderr_b64"] == "" and result["exitcode"] == 0


def _stream(
    gateway: GatewayProcess, body: Any, accept: str
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    headers = {**JSON, "Accept": accept}
    conn.request("POST", "/v1/exec", body=json.dumps(body).encode(), headers=headers)
    return conn, conn.getresponse()


@pytest.mark.parametrize("accept", ["application/x-ndjson", "text/event-stream"])
def test_streaming_delivers_frames_while_the_program_runs(
    gateway: GatewayProcess, accept: str
) -> None:
    script = "echo $$; read line; echo never"  # waits on stdin, which the gateway closed
    body = {"argv": ["sh", "-c", f"echo $$; exec {MISC / 'slow-print'} 2 1500 tick"]}
    conn, response = _stream(gateway, body, accept)
    assert response.status == 200
    assert response.getheader("content-type", "").startswith(accept)
    first = response.readline()
    if accept == "text/event-stream":
        assert first == b"event: stdout\n"
        first = response.readline().removeprefix(b"data: ")
    frame = json.loads(first)
    assert frame["type"] == "stdout"
    pid = int(frame["data"].split()[0])
    assert pid_alive(pid), "the first frame came only after the program ended"
    rest = response.read().decode()
    conn.close()
    assert "tick 1" in rest and "tick 2" in rest
    assert '"type": "exit", "exitcode": 0' in rest
    del script


def test_http_client_going_away_terminates_the_program(gateway: GatewayProcess) -> None:
    body = {"argv": ["sh", "-c", "echo $$; exec sleep 60"]}
    conn, response = _stream(gateway, body, "application/x-ndjson")
    pid = int(json.loads(response.readline())["data"])
    assert pid_alive(pid)
    conn.close()  # the program prints nothing more: the gateway must notice anyway
    response.close()
    wait_exit(pid, 10)


# trio-websocket leaves its TCP socket to the garbage collector when the server closes
# the connection first (as the gateway does after the exit frame): a client-library
# ResourceWarning, not a leak of ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_websocket_duplex_echo_through_cat(gateway: GatewayProcess) -> None:
    with trio.fail_after(30):
        async with open_websocket_url(f"ws://127.0.0.1:{gateway.port}/v1/exec/ws") as ws:
            await ws.send_message(json.dumps({"argv": ["cat"]}))
            await ws.send_message("hello ")
            assert json.loads(await ws.get_message()) == {"type": "stdout", "data": "hello "}
            await ws.send_message(b"\x00\x01binary")
            assert json.loads(await ws.get_message()) == {
                "type": "stdout",
                "data": "\x00\x01binary",
            }
            await ws.send_message(json.dumps({"type": "close_stdin"}))
            assert json.loads(await ws.get_message()) == {
                "type": "exit",
                "exitcode": 0,
                "termsig": None,
            }
            with pytest.raises(ConnectionClosed):
                await ws.get_message()
            assert ws.closed is not None and ws.closed.code == 1000


async def test_websocket_going_away_terminates_the_program(gateway: GatewayProcess) -> None:
    with trio.fail_after(30):
        async with open_websocket_url(f"ws://127.0.0.1:{gateway.port}/v1/exec/ws") as ws:
            await ws.send_message(json.dumps({"argv": ["sh", "-c", "echo $$; exec sleep 60"]}))
            pid = int(json.loads(await ws.get_message())["data"])
            assert pid_alive(pid)
        await trio.to_thread.run_sync(wait_exit, pid, 10)


def test_one_shot_output_past_max_output_is_413_and_ends_the_program(
    broker: Broker, tmp_path: Path
) -> None:
    limit = 100_000
    gateway = GatewayProcess(broker.path, "--max-output", str(limit))
    try:
        both = "head -c {} /dev/zero; head -c {} /dev/zero >&2"  # stdout and stderr add up
        status, result = _exec(gateway, {"argv": ["sh", "-c", both.format(limit // 2, limit // 2)]})
        assert status == 200 and len(result["stdout"]) + len(result["stderr"]) == limit
        script = both.format(limit // 2, limit // 2 + 1)
        status, result = _exec(gateway, {"argv": ["sh", "-c", script]})
        assert (status, result["error"]) == (413, "output_too_large")
        assert f"{limit} bytes" in result["detail"] and set(result) == {"error", "detail"}
        pid_file = tmp_path / "pid"
        endless = {"argv": ["sh", "-c", f"echo $$ > {pid_file}; exec cat /dev/zero"]}
        status, result = _exec(gateway, endless)
        assert (status, result["error"]) == (413, "output_too_large")
        wait_exit(int(pid_file.read_text()), 10)
        # Streams are not limited in total (backpressure bounds their memory).
        conn, response = _stream(
            gateway, {"argv": ["head", "-c", str(3 * limit), "/dev/zero"]}, NDJSON
        )
        frames = [json.loads(line) for line in response.read().splitlines()]
        conn.close()
        assert sum(len(frame.get("data", "")) for frame in frames) == 3 * limit
        assert frames[-1] == {"type": "exit", "exitcode": 0, "termsig": None}
    finally:
        gateway.stop()


@pytest.mark.parametrize(
    "flag, value",
    [
        *(("--max-output", v) for v in ("0", "-1", "lots")),
        *(("--max-body", v) for v in ("0", "-5", "1e6")),
        *(("--max-timeout", v) for v in ("0", "-1", "nan", "inf")),
        *(("--default-timeout", v) for v in ("0", "-3", "nan")),
    ],
)
def test_limits_must_be_positive(broker: Broker, flag: str, value: str) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "sockexec_py.gateway"),
            *("--socket", str(broker.path), flag, value),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 100, proc.stderr
    assert flag in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


# Leaving after close_stdin, while the program prints nothing: only the client socket
# tells that nobody waits for the answer any more.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_websocket_closed_after_close_stdin_terminates_the_program(
    gateway: GatewayProcess,
) -> None:
    with trio.fail_after(30):
        async with open_websocket_url(f"ws://127.0.0.1:{gateway.port}/v1/exec/ws") as ws:
            await ws.send_message(json.dumps({"argv": ["sh", "-c", "echo $$; exec sleep 30"]}))
            pid = int(json.loads(await ws.get_message())["data"])
            await ws.send_message(json.dumps({"type": "close_stdin"}))
        await trio.to_thread.run_sync(wait_exit, pid, 10)


def test_websocket_dropped_after_close_stdin_terminates_the_program(
    gateway: GatewayProcess,
) -> None:
    url = gateway.base.replace("http://", "ws://")
    session = open_session(url, ["sh", "-c", "echo $$; exec sleep 30"], timeout=30)
    with session:  # leaving closes the TCP connection, no WebSocket close frame
        frame = next(iter(session))
        assert isinstance(frame, Output)
        pid = int(frame.data)
        session.close_stdin()
    wait_exit(pid, 10)


def test_one_shot_client_going_away_terminates_the_program(broker: Broker, tmp_path: Path) -> None:
    gateway = GatewayProcess(broker.path)
    try:
        pid_file = tmp_path / "pid"
        script = f"echo $$ > {pid_file}.new; mv {pid_file}.new {pid_file}; exec sleep 30"
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        body = json.dumps({"argv": ["sh", "-c", script]}).encode()
        conn.request("POST", "/v1/exec", body=body, headers=JSON)
        # The program prints nothing, so only its pid file says it runs.
        wait_until(pid_file.exists, 10, "the program to start")
        pid = int(pid_file.read_text())
        conn.close()
        wait_exit(pid, 10)
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
            sock.sendall(  # and a client that leaves in the middle of its request body
                b"POST /v1/exec HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
        status, result = _exec(gateway, {"argv": ["true"]})  # the gateway is fine
        assert (status, result["exitcode"]) == (200, 0)
        left = 'sockexec_gateway_requests_total{mode="oneshot",status="499"} 2.0'
        wait_until(lambda: left in gateway.request("GET", "/metrics")[2].decode(), 10, left)
        gateway.proc.terminate()
        gateway.proc.wait(20)
        assert gateway.proc.stderr is not None
        log = gateway.proc.stderr.read()
    finally:
        gateway.stop()
    assert "Traceback" not in log, log


def test_auth_with_token_file_and_reload(broker: Broker, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# operators\nfirst-token\n")
    gateway = GatewayProcess(broker.path, "--token-file", str(tokens))
    try:
        body = {"argv": ["true"]}
        status, _, data = _post(gateway, body)
        assert status == 401 and json.loads(data)["error"] == "unauthorized"
        wrong = {"Authorization": "Bearer nope"}
        assert _post(gateway, body, wrong)[0] == 401
        right = {"Authorization": "Bearer first-token"}
        assert _post(gateway, body, right)[0] == 200
        assert gateway.request("GET", "/metrics")[0] == 401
        tokens.write_text("second-token-longer\n")  # rotated without a restart
        assert _post(gateway, body, right)[0] == 401
        new = {"Authorization": "Bearer second-token-longer"}
        assert _post(gateway, body, new)[0] == 200
        assert gateway.request("GET", "/healthz")[0] == 200  # probes need no token
    finally:
        gateway.stop()


def test_non_loopback_without_token_is_refused_at_startup(broker: Broker) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sockexec_py.gateway",
            "--socket",
            str(broker.path),
            "--listen",
            "0.0.0.0:0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 100
    assert "refusing to listen on 0.0.0.0 without --token-file" in proc.stderr


def test_broker_down_is_503_and_recovery_needs_no_restart(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    gateway = GatewayProcess(tmp_path / "broker0.sock")  # nothing there yet
    try:
        status, _, data = gateway.request("GET", "/healthz")
        assert status == 503
        assert json.loads(data) == {"error": "broker_unavailable", "detail": "broker unavailable"}
        status, result = _exec(gateway, {"argv": ["true"]})
        assert status == 503 and result["error"] == "broker_unavailable"
        status, _, _ = _post(gateway, {"argv": ["true"]}, {"Accept": "application/x-ndjson"})
        assert status == 503
        broker = start_broker()
        assert broker.path == tmp_path / "broker0.sock"
        assert gateway.request("GET", "/healthz")[0] == 200
        status, result = _exec(gateway, {"argv": ["true"]})
        assert (status, result["exitcode"]) == (200, 0)
    finally:
        gateway.stop()


def test_healthz_hides_the_broker_path_and_logs_the_reason(tmp_path: Path) -> None:
    socket_path = tmp_path / "secret-place" / "broker.sock"
    gateway = GatewayProcess(socket_path)
    try:
        status, _, data = gateway.request("GET", "/healthz")  # a probe needs no token
        assert status == 503
        assert json.loads(data) == {"error": "broker_unavailable", "detail": "broker unavailable"}
        assert b"secret-place" not in data
        gateway.log_until(f"broker socket {socket_path} does not exist")
    finally:
        gateway.stop()


def test_errors_are_json_with_proper_codes(gateway: GatewayProcess) -> None:
    cases = [
        ("POST", "/v1/exec", b"{not json", 400),
        ("POST", "/v1/exec", json.dumps({"argv": "ls"}).encode(), 400),
        ("POST", "/v1/exec", json.dumps({"argv": ["a"], "bogus": 1}).encode(), 400),
        ("POST", "/v1/exec", json.dumps({"argv": ["a"], "timeout": -1}).encode(), 400),
        ("GET", "/v1/exec", None, 405),
        ("GET", "/nowhere", None, 404),
    ]
    for method, path, raw, expected in cases:
        status, _headers, data = gateway.request(method, path, headers=JSON, raw=raw)
        assert status == expected, (path, raw and raw[:30], data)
        body = json.loads(data)
        assert set(body) == {"error", "detail"} and "Traceback" not in body["detail"]


def test_exec_needs_a_json_content_type(gateway: GatewayProcess) -> None:
    body = {"argv": ["echo", "ran"]}
    # No type, curl -d's default, and the types a web page may POST without a preflight.
    for content_type in (
        None,
        "application/x-www-form-urlencoded",
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/jsonp",
    ):
        headers = {} if content_type is None else {"Content-Type": content_type}
        for accept in ("application/json", "application/x-ndjson"):
            # http.client itself, so that no helper adds a content type
            conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
            conn.request("POST", "/v1/exec", json.dumps(body), {**headers, "Accept": accept})
            response = conn.getresponse()
            status, data = response.status, response.read()
            conn.close()
            assert status == 415, (content_type, accept, data)
            error = json.loads(data)
            assert error["error"] == "unsupported_media_type"
            assert "Content-Type: application/json" in error["detail"]
    for content_type in ("application/json; charset=utf-8", "Application/JSON"):
        status, _, data = _post(gateway, body, {"Content-Type": content_type})
        assert (status, json.loads(data)["stdout"]) == (200, "ran\n")


def test_host_must_be_a_loopback_name_without_tokens(gateway: GatewayProcess) -> None:
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1
    reaches the gateway with ``Host: evil.example`` (and a browser may leave Origin
    out of a same-origin GET)."""
    body = {"argv": ["true"]}
    for host in ("evil.example", "evil.example:8080", "127.0.0.1.evil.example", "10.0.0.1"):
        for method, path in (("POST", "/v1/exec"), ("GET", "/metrics"), ("GET", "/healthz")):
            status, _, data = gateway.request(
                method, path, body if method == "POST" else None, {**JSON, "Host": host}
            )
            assert status == 421, (host, path, data)
            assert json.loads(data)["error"] == "misdirected_request"
    for host in ("localhost", "LOCALHOST:1234", "127.0.0.1", "127.0.0.1:80", "[::1]", "[::1]:8080"):
        status, _, data = _post(gateway, body, {"Host": host})
        assert status == 200, (host, data)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall(
            b"GET /v1/exec/ws HTTP/1.1\r\nHost: evil.example\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        reply = b""
        while b"}" not in reply and (data := sock.recv(65536)):  # headers, then the body
            reply += data
    # The same answer as a POST gets: 421 with the JSON error, not a bare 403.
    assert reply.startswith(b"HTTP/1.1 421"), reply
    assert b"misdirected_request" in reply, reply
    # No Host at all (HTTP/1.0): not a browser, so no rebinding; an empty one is refused.
    for request, expected in (
        (b"GET /healthz HTTP/1.0\r\n\r\n", b"HTTP/1.1 200"),
        (b"GET /healthz HTTP/1.0\r\nHost: \r\n\r\n", b"HTTP/1.1 421"),
    ):
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
            sock.sendall(request)
            reply = b""
            while data := sock.recv(65536):
                reply += data
        assert reply.startswith(expected), (request, reply)


def test_any_host_is_fine_with_tokens(broker: Broker, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("t0ken\n")
    gateway = GatewayProcess(broker.path, "--token-file", str(tokens))
    try:
        headers = {"Host": "gateway.example:443", "Authorization": "Bearer t0ken"}
        status, _, data = _post(gateway, {"argv": ["true"]}, headers)
        assert (status, json.loads(data)["exitcode"]) == (200, 0)
        status, _, _ = _post(gateway, {"argv": ["true"]}, {"Host": "gateway.example"})
        assert status == 401
    finally:
        gateway.stop()


def test_oversized_body_is_refused_before_it_is_read(gateway: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/exec HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n{" % (64 << 20)
        )
        reply = b""
        while b"}" not in reply and (chunk := sock.recv(65536)):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413")
    assert b'"error":"too_large"' in reply


def test_timeout_is_504(gateway: GatewayProcess) -> None:
    status, result = _exec(gateway, {"argv": ["sleep", "30"], "timeout": 0.5})
    assert status == 504 and result["error"] == "timeout"


def test_metrics_and_openapi(gateway: GatewayProcess) -> None:
    _exec(gateway, {"argv": ["true"]})
    status, _headers, data = gateway.request("GET", "/metrics")
    text = data.decode()
    assert status == 200
    assert 'sockexec_gateway_requests_total{mode="oneshot",status="200"} 1.0' in text
    assert 'sockexec_gateway_exits_total{outcome="exitcode 0"} 1.0' in text
    assert "sockexec_gateway_session_seconds_bucket" in text
    status, _, data = gateway.request("GET", "/openapi.json")
    document = json.loads(data)
    assert status == 200 and document["openapi"].startswith("3.")
    assert {"/v1/exec", "/healthz", "/metrics", "/openapi.json"} <= set(document["paths"])
    assert {"403", "415", "421"} <= set(document["paths"]["/v1/exec"]["post"]["responses"])


# -- property test against the OpenAPI document ------------------------------------

_SAFE_PROGRAMS = ["true", "false", "echo", "printf", "cat", "no-such-program"]
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
_exec_bodies = st.one_of(
    st.fixed_dictionaries(
        {
            "argv": st.lists(st.sampled_from(_SAFE_PROGRAMS), min_size=1, max_size=1).flatmap(
                lambda head: st.lists(st.text(max_size=30), max_size=3).map(
                    lambda tail: head + tail
                )
            )
        },
        optional={
            "stdin": st.text(max_size=100),
            "timeout": st.one_of(st.floats(min_value=-5, max_value=100), st.integers(-5, 100)),
            "stdin_b64": st.text(alphabet="QUJDRA==+/", max_size=20),
        },
    ),
    _json_values,
)


_DOCUMENTS: dict[int, dict[str, Any]] = {}


def _documented(gateway: GatewayProcess, status: int, body: Any) -> None:
    """``body`` is valid against the schema /openapi.json gives ``POST /v1/exec``'s
    ``status`` (the document is generated from the models the app validates with)."""
    if gateway.port not in _DOCUMENTS:
        _DOCUMENTS[gateway.port] = json.loads(gateway.request("GET", "/openapi.json")[2])
    document = _DOCUMENTS[gateway.port]
    responses = document["paths"]["/v1/exec"]["post"]["responses"]
    assert str(status) in responses, (status, body)
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    validator = Draft202012Validator({**schema, "components": document["components"]})
    assert not [error.message for error in validator.iter_errors(body)], (status, body)


def _check_against_schema(status: int, body: dict[str, Any], request: Any) -> None:
    """The response matches what /openapi.json documents for that status (the
    document's schema is checked too, by :func:`_documented`)."""
    if status == 200:
        assert isinstance(body.get("exitcode"), int | None)
        assert isinstance(body.get("termsig"), str | None)
        assert (body["exitcode"] is None) != (body["termsig"] is None)
        assert isinstance(body["duration_ms"], int | float)
        assert isinstance(body["stdout"], str) and isinstance(body["stderr"], str)
    else:
        # 504 only for a request that asked for a timeout too short for its program.
        timed = isinstance(request, dict) and "timeout" in request
        assert status in (400, 413) or (status == 504 and timed), (status, body)
        assert set(body) == {"error", "detail"}
        assert all(isinstance(v, str) for v in body.values())


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=_exec_bodies)
def test_any_request_body_gets_a_documented_answer(gateway: GatewayProcess, body: Any) -> None:
    status, _, data = _post(gateway, raw=json.dumps(body).encode())
    _check_against_schema(status, json.loads(data), body)
    _documented(gateway, status, json.loads(data))


def test_browser_requests_and_malformed_text_are_4xx_not_5xx(gateway: GatewayProcess) -> None:
    body = {"argv": ["true"]}
    page = {"Origin": "http://evil.example"}
    status, _, data = _post(gateway, body, page)
    assert status == 403 and json.loads(data)["error"] == "forbidden"
    for raw in (b"[" * 100_000, b'{"argv": ["\\ud800"]}', b'{"argv": ["cat"], "stdin": "\\udc00"}'):
        status, _, data = _post(gateway, raw=raw)
        assert status == 400, (raw[:30], data)
