"""The jobs API's targets (issue 15), measured against a real broker and gateway.

    python -m bench.jobs [--quick] [--seconds N] [--history N] [--follow-bytes N]
                         [--only submit,history,follow] [--json FILE]

(a) submit -> completion of ``true`` jobs, 4 clients for ``--seconds`` (60; 10 with
    ``--quick``): jobs/s and p99 submit latency (targets >= 300 jobs/s, <= 20 ms).
    Every 32 submits a client looks at the totals and, past 128 jobs waiting or
    running, long-polls its last job: the rate is what the gateway sustains, not a
    queue filling up. Completed jobs are counted from the totals at the end.
(b) a history of ``--history`` finished jobs (1,000,000), written straight into the
    store's schema (fast, once; cached under ``--cache``): p99 of one job's status
    and of the first page of the list (<= 10 ms), the gateway's RSS with an empty
    and with that history, and GETs while 4 writers submit: "database is locked"
    must never be seen (0).
(c) following (``?follow=1``, NDJSON) a job that prints ``--follow-bytes`` (1 GiB)
    against ``POST /v1/exec`` NDJSON streaming of the same program: the ratio of
    throughputs (target >= 0.5).

Clients are threads of this process on keep-alive ``http.client`` connections; the
broker and the gateway are ``sockexec_py.testing`` processes, as in the tests.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sockexec_py.testing import BrokerProcess, GatewayProcess

from .jobs_common import CLIENTS, JSON, WINDOW, Client, Row, quantile, report, run_threads
from .jobs_history import add_history_options, bench_history

# -- (a) submit -> completion ---------------------------------------------------------


def bench_submit(socket: Path, work: Path, seconds: float) -> tuple[list[Row], dict[str, Any]]:
    gateway = GatewayProcess(
        socket,
        "--data-dir",
        str(work / "submit"),
        "--jobs-max-running",
        "16",
        "--jobs-limit",
        "true=16",
        "--jobs-max-queue",
        "100000",
    )
    latencies: list[list[float]] = [[] for _ in range(CLIENTS)]
    refused = collections.Counter[int]()
    try:
        start = time.monotonic()
        end = start + seconds

        def client(index: int) -> None:
            http_ = Client(gateway.port)
            submitted = 0
            last = ""

            def wait_for(job_id: str) -> None:
                while True:
                    status, job = http_.request("GET", f"/v1/jobs/{job_id}?wait=30")
                    if status == 200 and job["state"] not in ("queued", "running"):
                        return

            while time.monotonic() < end:
                began = time.monotonic()
                status, answer = http_.request("POST", "/v1/jobs", {"argv": ["true"]})
                latencies[index].append(time.monotonic() - began)
                if status != 202:
                    refused[status] += 1
                    continue
                submitted += 1
                last = answer["id"]
                if submitted % WINDOW == 0:  # keep the backlog bounded
                    _, page = http_.request("GET", "/v1/jobs?limit=1")
                    if page["totals"]["queued"] + page["totals"]["running"] > CLIENTS * WINDOW:
                        wait_for(last)
            if last:
                wait_for(last)
            http_.close()

        run_threads(CLIENTS, client)
        checker = Client(gateway.port)
        while True:  # the last job of each client ended; the others (FIFO) with them
            _, page = checker.request("GET", "/v1/jobs?limit=1")
            totals = page["totals"]
            if totals["queued"] + totals["running"] == 0:
                break
        elapsed = time.monotonic() - start
        completed = totals["succeeded"]
        checker.close()
    finally:
        gateway.stop()
    all_latencies = [value for each in latencies for value in each]
    total = completed
    rate = total / elapsed
    p99 = quantile(all_latencies, 0.99) * 1000
    rows = [
        Row(
            "(a) true jobs, submit -> completion, 4 clients",
            f"{rate:.0f} jobs/s",
            ">= 300",
            rate >= 300,
        ),
        Row(
            "(a) submit latency p50 / p99",
            f"{quantile(all_latencies, 0.5) * 1000:.1f} / {p99:.1f} ms",
            "p99 <= 20 ms",
            p99 <= 20,
        ),
    ]
    return rows, {
        "jobs_per_second": rate,
        "jobs": total,
        "seconds": elapsed,
        "submit_p50_ms": quantile(all_latencies, 0.5) * 1000,
        "submit_p99_ms": p99,
        "refused": dict(refused),
    }


# -- (c) following 1 GiB -----------------------------------------------------------------


def _stream_bytes(port: int, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    """Read a streamed answer to its end: (bytes read, the last line)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    headers = {"Accept": "application/x-ndjson", **(JSON if body else {})}
    conn.request(
        method, path, body=None if body is None else json.dumps(body).encode(), headers=headers
    )
    response = conn.getresponse()
    assert response.status == 200, response.read()[:200]
    total, tail = 0, b""
    while data := response.read1(1 << 20):
        total += len(data)
        tail = (tail + data)[-4096:]
    conn.close()
    return total, tail.rstrip().rsplit(b"\n", 1)[-1]


def bench_follow(
    socket: Path, work: Path, size: int, rounds: int
) -> tuple[list[Row], dict[str, Any]]:
    """Alternate /v1/exec streams and followed jobs, ``rounds`` of each; medians
    (the VM is shared: one run of each says little)."""
    program = ["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x"]
    gateway = GatewayProcess(
        socket, "--data-dir", str(work / "follow"), "--job-output-max", str(2 * size)
    )
    exec_rates: list[float] = []
    follow_rates: list[float] = []
    try:
        client = Client(gateway.port)
        for _ in range(rounds):
            began = time.monotonic()
            _, last = _stream_bytes(
                gateway.port, "POST", "/v1/exec", {"argv": program, "timeout": 3600}
            )
            exec_rates.append(size / (time.monotonic() - began) / (1 << 20))
            assert b'"exit"' in last, last
            began = time.monotonic()
            _, job = client.request("POST", "/v1/jobs", {"argv": program})
            _, last = _stream_bytes(gateway.port, "GET", f"/v1/jobs/{job['id']}/output?follow=1")
            follow_rates.append(size / (time.monotonic() - began) / (1 << 20))
            assert b'"exit"' in last and b'"succeeded"' in last, last
            client.request("DELETE", f"/v1/jobs/{job['id']}")
        client.close()
    finally:
        gateway.stop()
    exec_rate = statistics.median(exec_rates)
    follow_rate = statistics.median(follow_rates)
    ratio = follow_rate / exec_rate
    rows = [
        Row(
            f"(c) /v1/exec NDJSON of {size >> 20} MiB, median of {rounds}", f"{exec_rate:.0f} MiB/s"
        ),
        Row(f"(c) following a job printing {size >> 20} MiB", f"{follow_rate:.0f} MiB/s"),
        Row("(c) follow / exec throughput", f"{ratio:.2f}", ">= 0.5", ratio >= 0.5),
    ]
    return rows, {
        "bytes": size,
        "exec_mib_s": exec_rates,
        "follow_mib_s": follow_rates,
        "ratio": ratio,
    }


# -- the run --------------------------------------------------------------------------------


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 s of submits instead of 60")
    parser.add_argument("--seconds", type=float, help="how long (a) submits")
    parser.add_argument("--history", type=int, default=1_000_000, help="jobs in (b)'s history")
    parser.add_argument("--follow-bytes", type=int, default=1 << 30, help="what (c)'s job prints")
    parser.add_argument("--rounds", type=int, help="(c)'s runs of each kind (3; 2 quick)")
    parser.add_argument("--only", default="submit,history,follow", help="which of the three")
    add_history_options(parser, "where (b)'s history is kept between runs")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench.jobs") -> int:
    args = build_parser(prog).parse_args(argv)
    seconds = args.seconds or (10.0 if args.quick else 60.0)
    only = set(args.only.split(","))
    rows: list[Row] = []
    figures: dict[str, Any] = {"seconds": seconds}
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        work = Path(tmp)
        broker = BrokerProcess(work / "broker.sock", ["-m", "100", "-t", "0"])
        try:
            if "submit" in only:
                more, figures["submit"] = bench_submit(broker.path, work, seconds)
                rows += more
            if "history" in only:
                cache = args.cache / f"history-{args.history}"
                more, figures["history"] = bench_history(
                    broker.path, work, cache, args.history, seconds
                )
                rows += more
            if "follow" in only:
                rounds = args.rounds or (2 if args.quick else 3)
                more, figures["follow"] = bench_follow(broker.path, work, args.follow_bytes, rounds)
                rows += more
        finally:
            broker.stop()
    return report(rows, figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
