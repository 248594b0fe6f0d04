"""Issue 16's targets, measured against a real broker and gateway.

    python -m bench.jobs_two [--quick] [--monitors N] [--rate JOBS_PER_S]
                             [--seconds S] [--only monitors,callbacks]
                             [--query 'batch=1&types=finished'] [--json FILE]

(a) ``--monitors`` (1,000) monitor WebSockets connected to ``/v1/monitor`` while
    ``true`` jobs are submitted at ``--rate`` (100/s) for ``--seconds`` (20; 5 with
    ``--quick``): every monitor must get every ``finished`` event (a monitor that
    overflows reconnects with ``since`` and counts what it then reads), p99 of the
    delivery delay (arrival at the monitor minus the event's time, the job's end as
    the gateway recorded it) <= 50 ms, and the gateway's RSS <= 200 MiB. ``--query``
    gives the monitors' options (default none: one message per event, all types).
(b) callbacks: ``true`` jobs with a callback at ``--rate`` for ``--seconds`` to a
    receiver on loopback (this process) that checks every signature with ``hmac``:
    all delivered, each once, every signature right; p99 from the job's end to the
    receiver.

The monitors are trio tasks of this process on raw sockets with a minimal frame
reader (a full WebSocket client per message would measure this process, not the
gateway); submitters are threads on keep-alive ``http.client`` connections.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import hmac
import http.client
import http.server
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from sockexec_py.testing import BrokerProcess, GatewayProcess

SECRET = b"bench-secret"
JSON = {"Content-Type": "application/json"}
SUBMITTERS = 4


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@functools.lru_cache(maxsize=4096)  # a thousand monitors read the same stamps
def stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def submit_at_rate(port: int, rate: float, seconds: float, body: dict[str, Any]) -> list[str]:
    """Submit ``body`` ``rate`` times a second for ``seconds`` from a few threads."""
    total = int(rate * seconds)
    ids: list[str] = []
    lock = threading.Lock()
    start = time.monotonic() + 0.2

    def submitter(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        payload = json.dumps(body).encode()
        for n in range(offset, total, SUBMITTERS):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                conn.request("POST", "/v1/jobs", body=payload, headers=JSON)
                response = conn.getresponse()
                answer = json.loads(response.read())
            except OSError:  # an overloaded gateway: counted, not fatal
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            if response.status != 202:
                raise RuntimeError(f"submit: {response.status} {answer}")
            with lock:
                ids.append(answer["id"])
        conn.close()

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(SUBMITTERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ids


def all_ended(port: int, count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", "/v1/jobs?limit=1")
            totals = json.loads(conn.getresponse().read())["totals"]
        except OSError:
            continue
        finally:
            conn.close()
        if sum(totals[state] for state in ("succeeded", "failed", "cancelled", "lost")) >= count:
            return True
        time.sleep(0.1)
    return False


# -- (a) monitors ----------------------------------------------------------------------


class Monitor:
    """One monitor connection on a raw socket: the handshake, then frames read with
    the least work (only ``finished`` events are decoded)."""

    def __init__(self, query: str = "") -> None:
        self.query = query
        self.finished: dict[str, float] = {}  # job id -> delay (s)
        self.last_id = 0
        self.messages = 0
        self.ready = trio.Event()
        self.overflows = 0

    async def run(self, port: int, stop: trio.Event) -> None:
        while not stop.is_set():
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            key = base64.b64encode(os.urandom(16)).decode()
            params = [f"since={self.last_id}"] if self.last_id else []
            params += [self.query] if self.query else []
            target = "/v1/monitor" + ("?" + "&".join(params) if params else "")
            await stream.send_all(
                f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Key: {key}\r\n\r\n".encode()
            )
            buffer = bytearray()
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive_some(65536)
            del buffer[: buffer.index(b"\r\n\r\n") + 4]
            async with stream:
                with trio.move_on_at(trio.current_time() + 1e9) as scope:
                    stop_task = scope
                    closed = await self._read(stream, buffer, stop, stop_task)
                if not closed:
                    return

    async def _read(
        self, stream: trio.SocketStream, buffer: bytearray, stop: trio.Event, scope: Any
    ) -> bool:
        """Read frames until the gateway closes (True) or ``stop`` (False)."""
        async with trio.open_nursery() as nursery:

            async def stopper() -> None:
                await stop.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(stopper)
            while True:
                while len(buffer) >= 2:
                    length, start = buffer[1] & 0x7F, 2
                    if length == 126:
                        if len(buffer) < 4:
                            break
                        length, start = int.from_bytes(buffer[2:4], "big"), 4
                    elif length == 127:
                        if len(buffer) < 10:
                            break
                        length, start = int.from_bytes(buffer[2:10], "big"), 10
                    if len(buffer) < start + length:
                        break
                    opcode = buffer[0] & 0x0F
                    payload = bytes(buffer[start : start + length])
                    del buffer[: start + length]
                    if opcode == 8:
                        nursery.cancel_scope.cancel()
                        return True
                    self._message(payload)
                data = await stream.receive_some(1 << 20)
                if not data:
                    nursery.cancel_scope.cancel()
                    return True
                buffer += data
        return False

    def _message(self, payload: bytes) -> None:
        now = time.time()
        self.messages += 1
        if payload.startswith(b"["):  # batch=1: an array of messages, decoded once
            for item in json.loads(payload):
                self._item(item, now)
        elif payload.startswith(b'{"id":'):
            self.last_id = int(payload[6 : payload.index(b",")])
            if b'"type":"finished"' in payload:
                event = json.loads(payload)
                self.finished[event["job"]] = now - stamp(event["time"])
        elif b'"ready"' in payload:
            self.ready.set()
        elif b'"overflow"' in payload:
            self.overflows += 1

    def _item(self, item: dict[str, Any], now: float) -> None:
        kind = item["type"]
        if "id" in item:
            self.last_id = item["id"]
            if kind == "finished":
                self.finished[item["job"]] = now - stamp(item["time"])
        elif kind == "ready":
            self.ready.set()
        elif kind == "overflow":
            self.overflows += 1


def bench_monitors(args: argparse.Namespace, socket_path: Path, data: Path) -> list[dict[str, Any]]:
    flags = ("--data-dir", str(data), "--jobs-max-running", "16", "--jobs-limit", "true=16")
    with GatewayProcess(socket_path, *flags) as gateway:
        gateway.log_until("listening")  # its log is drained from here on
        monitors = [Monitor(args.query) for _ in range(args.monitors)]
        ids: list[str] = []

        async def main() -> None:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for monitor in monitors:
                    nursery.start_soon(monitor.run, gateway.port, stop)
                for monitor in monitors:
                    await monitor.ready.wait()
                rss_idle = gateway.rss_kib()
                ids.extend(
                    await trio.to_thread.run_sync(
                        submit_at_rate, gateway.port, args.rate, args.seconds, {"argv": ["true"]}
                    )
                )
                await trio.to_thread.run_sync(all_ended, gateway.port, len(ids), 120)
                with trio.move_on_after(30):
                    for monitor in monitors:
                        while len(monitor.finished) < len(ids):
                            await trio.sleep(0.05)
                results["rss_idle"] = rss_idle
                results["rss"] = gateway.rss_kib()
                stop.set()

        results: dict[str, Any] = {}
        started = time.monotonic()
        trio.run(main)
        elapsed = time.monotonic() - started
    wanted = set(ids)
    complete = sum(1 for monitor in monitors if wanted <= set(monitor.finished))
    refused = int(args.rate * args.seconds) - len(ids)
    delays = [delay for monitor in monitors for delay in monitor.finished.values()]
    messages = sum(monitor.messages for monitor in monitors)
    p99 = quantile(delays, 0.99) * 1000
    rss = results["rss"] / 1024
    return [
        row(
            "a1",
            f"monitors with every finished event ({len(ids)} jobs)",
            f"{complete}/{len(monitors)}",
            "all",
            complete == len(monitors),
        ),
        row(
            "a2",
            "finished-event delivery p50 / p99",
            f"{quantile(delays, 0.5) * 1000:.1f} / {p99:.1f} ms",
            "p99 <= 50 ms",
            p99 <= 50,
        ),
        row(
            "a3",
            "gateway RSS idle / under load",
            f"{results['rss_idle'] / 1024:.0f} / {rss:.0f} MiB",
            "<= 200 MiB",
            rss <= 200,
        ),
        row(
            "a4",
            "monitor overflows (reconnected with since)",
            str(sum(m.overflows for m in monitors)),
            "",
            None,
        ),
        row(
            "a5", "submits that timed out (an overloaded gateway)", str(refused), "0", refused == 0
        ),
        row(
            "a6",
            "messages received by the monitors (all, per monitor)",
            f"{messages} ({messages / len(monitors):.0f})",
            "",
            None,
        ),
        row("a7", "run time", f"{elapsed:.1f} s", "", None),
    ]


# -- (b) callbacks ---------------------------------------------------------------------


def bench_callbacks(
    args: argparse.Namespace, socket_path: Path, data: Path
) -> list[dict[str, Any]]:
    hits: list[tuple[str, bool, float]] = []
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            when = time.time()
            ts = self.headers["X-Sockexec-Timestamp"]
            mac = hmac.new(SECRET, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
            ok = hmac.compare_digest("sha256=" + mac, self.headers["X-Sockexec-Signature"])
            job = json.loads(body)
            with lock:
                hits.append(
                    (self.headers["X-Sockexec-Delivery"], ok, when - stamp(job["ended_at"]))
                )
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *rest: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    secret = data.parent / "secret"
    secret.write_bytes(SECRET)
    flags = (
        "--data-dir",
        str(data),
        "--jobs-max-running",
        "16",
        "--jobs-limit",
        "true=16",
        "--callback-secret-file",
        str(secret),
        "--callback-allow",
        f"loopback=http://127.0.0.1:{port}/",
    )
    try:
        with GatewayProcess(socket_path, *flags) as gateway:
            gateway.log_until("listening")
            body = {"argv": ["true"], "callback": {"url": f"http://127.0.0.1:{port}/hook"}}
            ids = submit_at_rate(gateway.port, args.rate, args.seconds, body)
            deadline = time.monotonic() + 120
            while len(hits) < len(ids) and time.monotonic() < deadline:
                time.sleep(0.1)
            rss = gateway.rss_kib() / 1024
    finally:
        server.shutdown()
        server.server_close()
    deliveries = [hit[0] for hit in hits]
    once = len(set(deliveries)) == len(deliveries) == len(ids) and set(deliveries) == set(ids)
    signed = all(hit[1] for hit in hits)
    delays = [hit[2] for hit in hits]
    return [
        row(
            "b1",
            f"callbacks delivered, each once ({len(ids)} jobs)",
            f"{len(set(deliveries))}/{len(ids)}, {len(deliveries) - len(set(deliveries))} repeats",
            "all, once",
            once,
        ),
        row("b2", "signatures right", f"{sum(hit[1] for hit in hits)}/{len(hits)}", "all", signed),
        row(
            "b3",
            "job end -> receiver p50 / p99",
            f"{quantile(delays, 0.5) * 1000:.1f} / {quantile(delays, 0.99) * 1000:.1f} ms",
            "",
            None,
        ),
        row("b4", "gateway RSS", f"{rss:.0f} MiB", "", None),
    ]


def row(key: str, name: str, value: str, target: str, met: bool | None) -> dict[str, Any]:
    return {"key": key, "name": name, "value": value, "target": target, "met": met}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.jobs_two", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="5 s of jobs instead of 20")
    parser.add_argument("--monitors", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="jobs submitted per second")
    parser.add_argument("--seconds", type=float, help="how long jobs are submitted")
    parser.add_argument("--only", default="monitors,callbacks")
    parser.add_argument(
        "--query",
        default="",
        help="the monitors' options, e.g. batch=1&types=finished (default: none, "
        "one message per event of every type)",
    )
    parser.add_argument("--json", help="write the rows and the settings there")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 5.0 if args.quick else 20.0
    rows: list[dict[str, Any]] = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-jobs-two-"))
    broker = BrokerProcess(scratch / "broker.sock", ("-m", "64"))
    try:
        if "monitors" in args.only:
            rows += bench_monitors(args, broker.path, scratch / "monitors")
        if "callbacks" in args.only:
            rows += bench_callbacks(args, broker.path, scratch / "callbacks")
    finally:
        broker.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    query = f", monitors with ?{args.query}" if args.query else ", one message per event"
    print(
        f"# issue 16: {args.monitors} monitors, {args.rate:g} jobs/s for {args.seconds:g} s{query}"
    )
    print(f"{'':4}{'measure':58}{'value':26}target")
    for each in rows:
        verdict = "" if each["met"] is None else ("met" if each["met"] else "MISSED")
        print(f"{each['key']:4}{each['name']:58}{each['value']:26}{each['target']} {verdict}")
    if args.json:
        settings = {
            "monitors": args.monitors,
            "rate": args.rate,
            "seconds": args.seconds,
            "query": args.query,
        }
        Path(args.json).write_text(json.dumps({"config": settings, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
