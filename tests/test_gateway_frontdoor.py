"""The gateway's front door (gateway/frontdoor.py) and the monitors it serves
itself (gateway/monitor_wire.py), through a real gateway and broker: a monitor
on a connection that first served a request goes through the ASGI route and
gets the same events; pings, the client's close and the gateway's stop; the
requests the door refuses; frames a WebSocket client reads back."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import select
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jobs_support import submit, wait
from test_gateway_monitor import frames, handshake, job_events, read_until, ready, text_frames
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from sockexec_py.gateway.monitor_wire import text_frame

from conftest import Broker, GatewayProcess, wait_until


def upgrade_request(path: str, version: str = "13") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
        f"Upgrade: websocket\r\nSec-WebSocket-Version: {version}\r\n"
        f"Sec-WebSocket-Key: {key}\r\n\r\n"
    ).encode()


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked frame, as a client sends it."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


def read_all(sock: socket.socket) -> bytes:
    """Everything until the gateway closes (each read bounded by 10 s)."""
    sock.settimeout(10)
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def answer(port: int, request: bytes) -> tuple[int, dict[str, str]]:
    """The status and JSON body the gateway answers ``request`` with."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = read_all(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def after_a_request(port: int, path: str) -> socket.socket:
    """A monitor upgrade as a connection's second request (a proxy's kept-alive
    connection): Hypercorn's, the ASGI route."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    health = sock.makefile("rb")
    assert health.readline().startswith(b"HTTP/1.1 200")
    length = 0
    while (line := health.readline()) != b"\r\n":
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    health.read(length)  # the answer read whole: what follows is the monitor's
    health.close()  # (its own reference to the socket: it would keep it open)
    sock.sendall(upgrade_request(path))
    return sock


def test_a_monitor_after_a_request_on_its_connection_goes_through_the_asgi_route(
    broker: Broker, tmp_path: Path
) -> None:
    """The door looks only at a connection's first request: an upgrade after a
    keep-alive request is Hypercorn's (the ASGI route), which serves the same
    messages and is the one ``--monitor-pace`` paces: with 3 s for one monitor,
    the ends of jobs that finish while it waits come together in one array."""
    flags = ("--data-dir", str(tmp_path / "data"), "--monitor-pace", "3")
    with GatewayProcess(broker.path, *flags) as gateway:
        paced = after_a_request(gateway.port, "/v1/monitor?batch=1&types=finished")
        try:
            got = read_until(paced, ready)
            ids = [submit(gateway, argv=["true"], name="paced") for _ in range(4)]
            got = read_until(paced, job_events(4), got)
        finally:
            paced.close()
    arrays = [json.loads(text) for text in text_frames(got)]
    events = [item for array in arrays for item in array if item["type"] == "finished"]
    assert sorted(event["job"] for event in events) == sorted(ids)
    # The first end goes out at once; the three that came during the 3 s, together.
    assert len([array for array in arrays if array[0]["type"] == "finished"]) <= 2


def test_the_front_door_monitor_gets_every_end_as_it_comes(jobs: GatewayProcess) -> None:
    """Through the door (the first request of its connection) one array per round
    of the fan-out: the four ends come, none twice, without the ASGI route's pace."""
    sock = handshake(jobs.port, "/v1/monitor?batch=1&types=finished")
    try:
        got = read_until(sock, ready)
        ids = []
        for _ in range(4):  # one at a time: each end has a round of its own
            ids.append(submit(jobs, argv=["true"], name="door"))
            wait(jobs, ids[-1])
            got = read_until(sock, job_events(len(ids)), got)
    finally:
        sock.close()
    arrays = [json.loads(text) for text in text_frames(got)]
    ends = [[item["job"] for item in array] for array in arrays if array[0]["type"] != "ready"]
    assert ends == [[job_id] for job_id in ids]


def test_pings_are_answered_and_a_close_is_returned(jobs: GatewayProcess) -> None:
    sock = handshake(jobs.port, "/v1/monitor")
    try:
        got = read_until(sock, ready)
        sock.sendall(client_frame(0x9, b"are you there"))
        sock.sendall(client_frame(0x8, struct.pack("!H", 1000) + b"bye"))
        got += read_all(sock)
    finally:
        sock.close()
    answers = [(op, payload) for op, payload in frames(got) if op != 0x1]
    assert answers[0] == (0xA, b"are you there")
    assert answers[1][0] == 0x8 and answers[1][1][:2] == struct.pack("!H", 1000)

    def counted() -> bool:
        metrics = jobs.request("GET", "/metrics")[2]
        return b'sockexec_gateway_requests_total{mode="monitor",status="499"} 1.0' in metrics

    wait_until(counted, 10, "the monitor counted as left by its client")


def test_a_stopping_gateway_closes_its_monitors_with_1001(broker: Broker, tmp_path: Path) -> None:
    """Both routes' monitors get a 1001 close (Hypercorn alone would leave the ASGI
    route's open, then cut it after its graceful timeout: a review found it)."""
    gateway = GatewayProcess(broker.path, "--data-dir", str(tmp_path / "data"))
    got: dict[str, bytes] = {}
    try:
        socks = {
            "door": handshake(gateway.port, "/v1/monitor"),
            "asgi": after_a_request(gateway.port, "/v1/monitor"),
        }
        for route, sock in socks.items():
            got[route] = read_until(sock, ready)
        gateway.proc.send_signal(signal.SIGTERM)
        for route, sock in socks.items():
            data = bytearray(got[route])
            while not any(op == 0x8 for op, _ in frames(bytes(data))):  # its close frame
                chunk = sock.recv(65536)  # (the 10 s timeout read_until set)
                assert chunk, (route, bytes(data[-200:]))
                data += chunk
            sock.sendall(client_frame(0x8, struct.pack("!H", 1000)))  # the close handshake
            got[route] = bytes(data) + read_all(sock)
            sock.close()
        assert gateway.proc.wait(timeout=20) == 0
    finally:
        gateway.stop()
    for route, data in got.items():
        closes = [payload for op, payload in frames(data) if op == 0x8]
        assert closes and closes[0][:2] == struct.pack("!H", 1001), route


@pytest.mark.parametrize(
    ("request_bytes", "detail"),
    [
        (b"GET /v1/monitor HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "expected an upgrade"),
        (upgrade_request("/v1/monitor", version="8"), "Sec-WebSocket-Version: 13"),
        (
            upgrade_request("/v1/monitor").replace(b"Sec-WebSocket-Key: ", b"X-Key: "),
            "one Sec-WebSocket-Key",
        ),
        (b"GET /v1/monitor HTTP/1.1\r\nno colon here\r\n\r\n", "not an HTTP/1.1 request"),
        (
            b"GET /v1/monitor HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
            "the request head is over 16384 bytes",
        ),
        (upgrade_request("/v1/monitor?batch=2"), "batch: expected 0 or 1"),
        (upgrade_request("/v1/monitor?since=%C2%B2"), "since: expected an event id"),
        (
            upgrade_request("/v1/monitor").replace(b"HTTP/1.1", b"HTTP/1.0"),
            "needs HTTP/1.1",
        ),
        (
            upgrade_request("/v1/monitor").replace(b"\r\n\r\n", b"\r\nContent-Length: 2\r\n\r\nhi"),
            "has no body",
        ),
        (
            upgrade_request("/v1/monitor").replace(b"Sec-WebSocket-Key: ", b"Sec-WebSocket-Key: !"),
            "16 bytes, base64",
        ),
    ],
    ids=[
        "no-upgrade",
        "version-8",
        "no-key",
        "bad-header",
        "head-over-16k",
        "bad-batch",
        "since-not-ascii",
        "http-1.0",
        "a-body",
        "key-not-base64",
    ],
)
def test_the_door_refuses_what_is_not_a_monitor_upgrade(
    jobs: GatewayProcess, request_bytes: bytes, detail: str
) -> None:
    status, body = answer(jobs.port, request_bytes)
    assert status == 400 and body["error"] == "bad_request" and detail in body["detail"]


def test_a_refused_version_is_told_the_one_we_speak(jobs: GatewayProcess) -> None:
    """RFC 6455 4.2.2: the refusal of a handshake names the version we speak."""
    with socket.create_connection(("127.0.0.1", jobs.port), timeout=10) as sock:
        sock.sendall(upgrade_request("/v1/monitor", version="8"))
        head = read_all(sock).partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 400") and b"\r\nsec-websocket-version: 13" in head


def test_a_bad_frame_is_answered_with_1002(jobs: GatewayProcess) -> None:
    sock = handshake(jobs.port, "/v1/monitor")
    try:
        got = read_until(sock, ready)
        sock.sendall(b"\x81\x02hi")  # a client's frame must be masked
        got += read_all(sock)
    finally:
        sock.close()
    closes = [payload for op, payload in frames(got) if op == 0x8]
    assert closes and closes[0][:2] == struct.pack("!H", 1002)


def test_a_client_that_pings_and_never_reads_is_not_read_either(jobs: GatewayProcess) -> None:
    """Pongs wait for the client to read them; past 64 KiB of them the gateway stops
    reading its frames, so its sends block: the gateway's memory does not grow with
    what the client sends."""
    sock = handshake(jobs.port, "/v1/monitor")
    try:
        read_until(sock, ready)
        rss = jobs.rss_kib()
        pings = client_frame(0x9, b"p" * 125) * 8000  # ~1 MiB a send
        sent = 0
        sock.setblocking(False)
        while sent < 48 << 20:
            if not select.select([], [sock], [], 3)[1]:
                break  # blocked for 3 s: the gateway stopped reading
            with contextlib.suppress(BlockingIOError):
                sent += sock.send(pings)
        grown = jobs.rss_kib() - rss
    finally:
        sock.close()
    assert sent < 32 << 20, f"the gateway read {sent >> 20} MiB of pings nobody reads"
    assert grown < 32 << 10, f"the gateway grew by {grown >> 10} MiB"


def test_a_silent_connection_does_not_hold_up_a_stop(broker: Broker, tmp_path: Path) -> None:
    """A connection that never sent a byte is closed when the gateway stops, as
    Hypercorn closes its idle ones (not after the 5 s keep-alive wait)."""
    gateway = GatewayProcess(broker.path, "--data-dir", str(tmp_path / "data"))
    try:
        silent = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        wait_until(lambda: bool(gateway.request("GET", "/healthz")), 10, "the gateway")
        began = time.monotonic()
        gateway.proc.send_signal(signal.SIGTERM)
        assert silent.recv(1) == b""  # closed by the stop
        assert gateway.proc.wait(timeout=20) == 0
        assert time.monotonic() - began < 4.5
        silent.close()
    finally:
        gateway.stop()


def test_a_plain_get_is_refused_alike_by_the_door_and_the_asgi_route(
    jobs: GatewayProcess,
) -> None:
    plain = b"GET /v1/monitor HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    door = answer(jobs.port, plain)
    conn = http.client.HTTPConnection("127.0.0.1", jobs.port, timeout=10)
    try:
        conn.request("GET", "/healthz")  # the connection's first request: Hypercorn's
        conn.getresponse().read()
        conn.request("GET", "/v1/monitor")
        response = conn.getresponse()
        route = response.status, json.loads(response.read())
    finally:
        conn.close()
    assert door == route
    assert route[0] == 400 and "is a WebSocket: expected an upgrade" in route[1]["detail"]


def test_other_paths_that_start_alike_are_hypercorns(jobs: GatewayProcess) -> None:
    status, body = answer(
        jobs.port, b"GET /v1/monitors HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    assert status == 404 and body["error"] == "not_found"


def test_without_jobs_the_door_answers_404(broker: Broker) -> None:
    with GatewayProcess(broker.path) as gateway:
        status, body = answer(gateway.port, upgrade_request("/v1/monitor"))
    assert status == 404 and body["error"] == "jobs_disabled"


@given(
    st.text(max_size=300)
    | st.sampled_from([125, 126, 127, 65535, 65536, 65537]).map(lambda size: "x" * size)
)
def test_text_frames_read_back_by_a_websocket_client(text: str) -> None:
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(text_frame(text.encode()))
    messages = list(client.events())
    assert all(isinstance(m, TextMessage) for m in messages)
    assert "".join(m.data for m in messages if isinstance(m, TextMessage)) == text
