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

The monitors are raw sockets read by one epoll loop in a process of their own,
with a minimal frame reader (a full WebSocket client per message would measure
the client, not the gateway); submitters are threads on keep-alive
``http.client`` connections.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import http.server
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sockexec_py.testing import BrokerProcess, GatewayProcess

from .jobs_common import quantile, row, stamp, submit_at_rate
from .jobs_monitors import bench_monitors

SECRET = b"bench-secret"


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
    parser.add_argument(
        "--pace",
        type=float,
        help="the gateway's --monitor-pace in seconds (default: the gateway's default)",
    )
    parser.add_argument(
        "--stamps",
        action="store_true",
        help="also the kernel's receive time of each end in the monitors' sockets "
        "(row a2b: the delivery without the receivers' own lag, at most; each message "
        "is then read alone, which costs the receivers two calls)",
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
