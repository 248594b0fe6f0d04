"""The monitor WebSocket through a real gateway and broker: each job's events in
order, a name's only, progress rate-limited, a client that reconnects with
``since`` (nothing lost or repeated), a gateway killed and restarted under a
connected monitor, a monitor that never reads (dropped; jobs do not slow), and
the events table added to an old data dir by its migration."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from jobs_support import call, submit, wait

from sockexec_py.client.jobs import MonitorEvent, amonitor, monitor
from sockexec_py.jobs.schema import MIGRATIONS, SCHEMA_VERSION

from conftest import Broker, GatewayProcess, wait_until


def replay(gateway: GatewayProcess, *until_jobs: str, **options: Any) -> list[MonitorEvent]:
    """Every event from the start until each of ``until_jobs`` finished."""
    events = []
    waiting = set(until_jobs)
    with contextlib.closing(monitor(gateway.base, since=0, reconnect=False, **options)) as stream:
        for event in stream:
            events.append(event)
            if event.type == "finished" and event.step is None:
                waiting.discard(event.job)
                if not waiting:
                    return events
    raise AssertionError("the monitor ended")


def test_events_of_jobs_and_steps(jobs: GatewayProcess) -> None:
    script = "for i in $(seq 1 200); do echo \"[$i/200] part\"; done; sleep 0.3; echo '[200/200] x'"
    busy = submit(jobs, argv=["sh", "-c", script], name="busy")
    other = submit(jobs, argv=["sh", "-c", "exit 4"], name="other")
    task = submit(
        jobs, name="task", steps=[{"name": "a", "argv": ["true"]}, {"name": "b", "argv": ["false"]}]
    )
    for job_id in (busy, other, task):
        wait(jobs, job_id)
    events = replay(jobs, busy, other, task)
    ids = [event.id for event in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    by_job: dict[str, list[MonitorEvent]] = {}
    for event in events:
        by_job.setdefault(event.job, []).append(event)
    kinds = [event.type for event in by_job[other]]
    assert kinds == ["queued", "started", "finished"]
    end = by_job[other][-1]
    assert (end.state, end.exitcode, end.termsig, end.name) == ("failed", 4, None, "other")
    assert end.duration is not None and end.data["reason"] is None and end.time.endswith("Z")
    progress = [event for event in by_job[busy] if event.type == "progress"]
    assert 1 <= len(progress) <= 4  # 201 progress lines in ~0.3 s: rate-limited
    assert progress[0].progress is not None and progress[0].progress["title"] == "part"
    assert call(jobs, "GET", f"/v1/jobs/{busy}")[1]["progress"]["title"] == "x"
    # The last progress line came 0.3 s after the others: the end carries it.
    last = by_job[busy][-1]
    assert last.type == "finished" and last.progress is not None
    assert (last.progress["task"], last.progress["title"]) == (200, "x")
    steps = [(e.step, e.type, e.state) for e in by_job[task] if e.step is not None]
    assert steps == [
        ("a", "started", "running"),
        ("a", "finished", "succeeded"),
        ("b", "started", "running"),
        ("b", "finished", "failed"),
    ]
    assert by_job[task][-1].step is None and by_job[task][-1].state == "failed"
    # A name's monitor gets that name's events only.
    only = replay(jobs, other, name="other")
    assert {event.name for event in only} == {"other"}
    assert [event.id for event in only] == [event.id for event in by_job[other]]


def test_a_client_that_reconnects_with_since_loses_nothing(jobs: GatewayProcess) -> None:
    first = submit(jobs, argv=["true"])
    wait(jobs, first)
    before = replay(jobs, first)
    missed = [submit(jobs, argv=["echo", str(i)], name="later") for i in range(3)]
    for job_id in missed:
        wait(jobs, job_id)
    everything = replay(jobs, missed[-1])

    async def resume() -> list[MonitorEvent]:
        got = []
        async with amonitor(jobs.base, since=before[-1].id) as events:
            async for event in events:
                got.append(event)
                if event.job == missed[-1] and event.type == "finished":
                    return got
        raise AssertionError("ended")

    resumed = trio.run(resume)
    assert [e.id for e in before] + [e.id for e in resumed] == [e.id for e in everything]


def test_a_since_ahead_of_the_gateways_history_gets_all_of_it(jobs: GatewayProcess) -> None:
    """A monitor that comes back with an id from another data dir (a restored or
    new one) would wait for ids this gateway has not reached: it gets a gap, then
    every event this one has (a review found it got nothing)."""
    first = submit(jobs, argv=["true"], name="ahead")
    wait(jobs, first)
    everything = replay(jobs, first)

    async def resume() -> list[MonitorEvent]:
        got = []
        with trio.fail_after(10):
            async with amonitor(jobs.base, since=10**9) as events:
                async for event in events:
                    got.append(event)
                    if event.job == first and event.type == "finished":
                        return got
        raise AssertionError("ended")

    assert [e.id for e in trio.run(resume)] == [e.id for e in everything]
    # Raw, the gap says where this history starts.
    conn = http.client.HTTPConnection("127.0.0.1", jobs.port, timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    conn.request(
        "GET",
        "/v1/monitor?since=1000000000&types=finished",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": key,
        },
    )
    response = conn.getresponse()
    assert response.status == 101
    data = b""
    while b'"ready"' not in data:
        data += response.fp.read1(65536)
    conn.close()
    assert b'{"type": "gap", "since": 1000000000, "first_id": ' in data


def test_a_gateway_restart_under_a_monitor(broker: Broker, tmp_path: Path) -> None:
    """kill -9 of the gateway while a monitor is connected and a job runs: the
    monitor reconnects (same port) with since and receives, without a gap or a
    repeat, the lost job's end and what ran after the restart."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flags = ("--data-dir", str(tmp_path / "data"), "--listen", f"127.0.0.1:{port}")
    flags += ("--jobs-max-running", "1")
    gateway = GatewayProcess(broker.path, *flags)
    received: list[MonitorEvent] = []
    done = threading.Event()

    def watch() -> None:
        with contextlib.closing(monitor(gateway.base)) as events:
            for event in events:
                received.append(event)
                if event.name == "after" and event.type == "finished":
                    done.set()
                    return

    thread = threading.Thread(target=watch, daemon=True)
    try:
        thread.start()
        wait_until(
            lambda: b"sockexec_gateway_monitors 1.0" in gateway.request("GET", "/metrics")[2],
            10,
            "the monitor",
        )
        running = submit(gateway, argv=["sh", "-c", "echo up; exec sleep 60"], name="long")
        after = submit(gateway, argv=["echo", "after"], name="after")
        wait_until(
            lambda: any(e.job == running and e.type == "started" for e in received), 10, "start"
        )
    except BaseException:
        gateway.stop()
        raise
    gateway.kill()
    with GatewayProcess(broker.path, *flags) as restarted:
        assert done.wait(30), received
        thread.join(10)
        everything = replay(restarted, after)
    assert [e.id for e in received] == [e.id for e in everything]
    lost = [e for e in received if e.job == running and e.type == "finished"]
    assert [e.state for e in lost] == ["lost"]


UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def handshake(port: int, path: str) -> socket.socket:
    """A WebSocket client that connects and then never reads (a tiny receive
    buffer, so the gateway's sends block soon)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {key}\r\n\r\n".encode()
    )
    return sock


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each whole server frame after the handshake."""
    view = memoryview(data)[data.index(b"\r\n\r\n") + 4 :]
    out = []
    while len(view) >= 2:
        opcode, length, start = view[0] & 0x0F, view[1] & 0x7F, 2
        if length == 126:
            length, start = int.from_bytes(view[2:4], "big"), 4
        elif length == 127:
            length, start = int.from_bytes(view[2:10], "big"), 10
        if len(view) < start + length:
            break
        out.append((opcode, bytes(view[start : start + length])))
        view = view[start + length :]
    return out


def text_frames(data: bytes) -> list[str]:
    """The text messages of a server's WebSocket bytes (after its handshake)."""
    return [payload.decode() for opcode, payload in frames(data) if opcode == 0x1]


def test_a_monitor_that_never_reads_is_dropped(broker: Broker, tmp_path: Path) -> None:
    """Its queue (16 here) overflows once the socket buffers are full: it leaves the
    live feed while the jobs go on at full speed; when it reads again it gets what
    was sent, the overflow message with the last id, and reads the rest with since."""
    flags = ("--data-dir", str(tmp_path / "data"), "--monitor-queue", "16")

    def metric(gateway: GatewayProcess, line: bytes) -> bool:
        return line in gateway.request("GET", "/metrics")[2]

    with GatewayProcess(broker.path, *flags, "--jobs-max-running", "8") as gateway:
        stuck = handshake(gateway.port, "/v1/monitor")
        try:
            wait_until(lambda: metric(gateway, b"sockexec_gateway_monitors 1.0"), 10, "it")
            ids = [submit(gateway, argv=["true"], name=f"n{i % 4}") for i in range(150)]
            for job_id in ids:  # the jobs are not held up by the monitor
                assert wait(gateway, job_id)["state"] == "succeeded"
            overflowed = b"sockexec_gateway_monitor_overflows_total 1.0"
            wait_until(lambda: metric(gateway, overflowed), 20, "the overflow")
            assert metric(gateway, b"sockexec_gateway_monitors 0.0")
            stuck.settimeout(10)
            received = bytearray()
            while b"\r\n\r\n" not in received or all(
                opcode != 0x8 for opcode, _ in frames(bytes(received))
            ):
                chunk = stuck.recv(65536)  # (a timeout: no close frame came)
                assert chunk, "closed without a close frame"
                received += chunk
        finally:
            stuck.close()
        closing = [payload for opcode, payload in frames(bytes(received)) if opcode == 0x8]
        assert closing[0][:2] == (1013).to_bytes(2, "big"), closing
        messages = [json.loads(text) for text in text_frames(bytes(received))]
        assert messages[0]["type"] == "ready" and messages[-1]["type"] == "overflow"
        events = messages[1:-1]
        assert [e["id"] for e in events] == list(range(1, len(events) + 1))
        last = messages[-1]["last_id"]
        assert last == len(events) < 150 * 3
        rest = []
        with contextlib.closing(monitor(gateway.base, since=last, reconnect=False)) as stream:
            for event in stream:  # every job has ended: its events are all stored
                rest.append(event)
                if event.id == 150 * 3:
                    break
        assert [e.id for e in rest] == list(range(last + 1, 150 * 3 + 1))


def read_until(
    sock: socket.socket, done: Callable[[list[str]], bool], received: bytes = b""
) -> bytes:
    """What the gateway sent (after ``received``, its start) until ``done`` holds
    of the whole text messages in it; each read bounded by a 10 s timeout."""
    sock.settimeout(10)
    data = bytearray(received)
    while not (b"\r\n\r\n" in data and done(text_frames(bytes(data)))):
        chunk = sock.recv(65536)
        assert chunk, bytes(data[-200:])
        data += chunk
    return bytes(data)


def ready(texts: list[str]) -> bool:
    return any('"ready"' in text for text in texts)


def job_events(count: int) -> Callable[[list[str]], bool]:
    """Done once ``count`` job events came (in whole messages)."""
    return lambda texts: sum(text.count('"job":') for text in texts) >= count


def test_types_and_batch(jobs: GatewayProcess) -> None:
    """``types=finished&batch=1``: every message an array; only finished events and
    the control messages, in id order; the same events as the unfiltered feed."""
    ids = [submit(jobs, argv=["sh", "-c", f"exit {i}"], name=f"b{i}") for i in range(5)]
    for job_id in ids:
        wait(jobs, job_id)
    everything = replay(jobs, *ids)
    sock = handshake(jobs.port, "/v1/monitor?since=0&types=finished&batch=1")
    try:
        messages = [json.loads(t) for t in text_frames(read_until(sock, ready))]
    finally:
        sock.close()
    assert messages and all(isinstance(message, list) and message for message in messages)
    flat = [item for message in messages for item in message]
    assert flat[-1]["type"] == "ready"
    finished = [e.id for e in everything if e.type == "finished"]
    assert [item["id"] for item in flat[:-1]] == finished
    assert len(messages) < len(flat)  # a replayed page goes out as one message
    # The client asks for arrays and hands out events one by one, types filtered.
    with contextlib.closing(
        monitor(jobs.base, since=0, reconnect=False, types=["started"])
    ) as stream:
        started = [next(stream) for _ in ids]
    assert [e.type for e in started] == ["started"] * len(ids)
    assert sorted(e.job for e in started) == sorted(ids)
    with pytest.raises(ValueError, match="unknown event types: nope"):
        next(monitor(jobs.base, types="finished,nope"))


def test_live_batches_carry_what_queued_up(jobs: GatewayProcess) -> None:
    """Live, a batch monitor gets the events of jobs that end while it is
    connected, in arrays, none lost or repeated; a non-batch one gets one each."""
    batch = handshake(jobs.port, "/v1/monitor?batch=1&types=queued,finished")
    single = handshake(jobs.port, "/v1/monitor?types=finished")
    try:
        head_batch = read_until(batch, ready)
        head_single = read_until(single, ready)
        ids = [submit(jobs, argv=["true"], name="live") for _ in range(20)]
        for job_id in ids:
            wait(jobs, job_id)
        got_batch = read_until(batch, job_events(40), head_batch)
        got_single = read_until(single, job_events(20), head_single)
    finally:
        batch.close()
        single.close()
    arrays = [json.loads(t) for t in text_frames(got_batch)]
    assert all(isinstance(message, list) and message for message in arrays)
    flat = [item for message in arrays for item in message if item["type"] != "ready"]
    assert [e["id"] for e in flat] == sorted({e["id"] for e in flat})
    assert sorted((e["job"], e["type"]) for e in flat) == sorted(
        (job_id, kind) for job_id in ids for kind in ("queued", "finished")
    )
    singles = [json.loads(t) for t in text_frames(got_single)]
    assert all(isinstance(m, dict) for m in singles)
    assert sorted(m["job"] for m in singles if m["type"] == "finished") == sorted(ids)


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("types=finished,bogus", "types: 'bogus' is not one of finished, progress, queued"),
        ("types=,", "types: '' is not one of"),
        ("batch=2", "batch: expected 0 or 1"),
        ("batch=true", "batch: expected 0 or 1"),
    ],
)
def test_bad_types_or_batch_are_refused(jobs: GatewayProcess, query: str, detail: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", jobs.port, timeout=10)
    try:
        conn.request("GET", f"/v1/monitor?{query}", headers=UPGRADE)
        response = conn.getresponse()
        status, body = response.status, json.loads(response.read())
    finally:
        conn.close()
    assert status == 400 and body["error"] == "bad_request" and detail in body["detail"]


def test_the_events_table_comes_with_the_migration(broker: Broker, tmp_path: Path) -> None:
    """A data dir written by the previous version (schema 2, with a job) is
    upgraded in place: its jobs are kept, events are recorded from then on."""
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "jobs.db") as conn:
        for migration in MIGRATIONS[:2]:
            for statement in migration:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 2")
        conn.execute(
            """INSERT INTO jobs (id, name, argv, labels, state, created_at, keep, ended_at,
                exitcode) VALUES (?, 'old', '["true"]', '{}', 'succeeded', ?, 1, ?, 0)""",
            ("01ARZ3NDEKTSV4RRFFQ69G5FAV", time.time(), time.time()),
        )
    conn.close()
    with GatewayProcess(broker.path, "--data-dir", str(data)) as gateway:
        status, old = call(gateway, "GET", "/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV")
        assert status == 200 and (old["state"], old["mode"]) == ("succeeded", None)
        new = submit(gateway, argv=["true"])
        wait(gateway, new)
        events = replay(gateway, new)
        assert [event.id for event in events] == [1, 2, 3]
    with sqlite3.connect(data / "jobs.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    conn.close()
