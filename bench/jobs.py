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
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockexec_py.jobs.model import new_job_id
from sockexec_py.jobs.schema import connect, migrate
from sockexec_py.jobs.store import DATABASE
from sockexec_py.testing import BrokerProcess, GatewayProcess

CLIENTS = 4
WINDOW = 32
JSON = {"Content-Type": "application/json"}


@dataclass
class Row:
    name: str
    value: str
    target: str = ""
    met: bool | None = None


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Client:
    """One keep-alive connection to the gateway (reconnects when it is dropped)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        payload = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=payload, headers=JSON if body else {})
                response = self.conn.getresponse()
                data = response.read()
                return response.status, json.loads(data) if data else None
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


def run_threads(count: int, work: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            work(index)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


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


# -- (b) a large history --------------------------------------------------------------

NAMES = [f"script-{n}" for n in range(50)]


def build_history(data: Path, count: int) -> list[str]:
    """A store of ``count`` finished jobs over 30 days (10% labelled), written with
    the store's own schema and migrations; returns a sample of ids. Cached: a dir
    that holds a history of this size is reused."""
    stamp = data / f"history-{count}.json"
    if stamp.exists():
        return list(json.loads(stamp.read_text()))
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    path = data / DATABASE
    conn = connect(path)
    migrate(conn, path)
    conn.execute("PRAGMA synchronous = OFF")
    rng = random.Random(15)
    start = time.time() - 30 * 86400
    sample: list[str] = []
    batch = 50_000
    seq = 0
    for first in range(0, count, batch):
        jobs, labels = [], []
        for index in range(first, min(count, first + batch)):
            seq += 1
            created = start + index * (30 * 86400 / count)
            job_id = new_job_id(created)
            if index % max(1, count // 2000) == 0:
                sample.append(job_id)
            name = rng.choice(NAMES)
            failed = rng.random() < 0.1
            label = {"team": rng.choice("abcdefgh")} if index % 10 == 0 else {}
            jobs.append(
                (
                    seq,
                    job_id,
                    name,
                    json.dumps([name, "--flag", str(index)]),
                    json.dumps(label),
                    "failed" if failed else "succeeded",
                    created,
                    created,
                    created + 0.01,
                    created + 0.01 + rng.random() * 60,
                    1 if failed else 0,
                    rng.randrange(10_000),
                )
            )
            labels += [(key, value, created, job_id, seq) for key, value in label.items()]
        conn.execute("BEGIN")
        conn.executemany(
            """INSERT INTO jobs (seq, id, name, argv, labels, state, created_at, queued_at,
                started_at, ended_at, keep, exitcode, stdout_bytes)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)""",
            jobs,
        )
        conn.executemany("INSERT INTO job_labels VALUES (?, ?, ?, ?, ?)", labels)
        conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    stamp.write_text(json.dumps(sample))
    return sample


def _latencies(port: int, paths: Sequence[str], requests: int) -> list[float]:
    client = Client(port)
    values = []
    try:
        for number in range(requests):
            path = paths[number % len(paths)]
            began = time.monotonic()
            status, _ = client.request("GET", path)
            values.append(time.monotonic() - began)
            if status != 200:
                raise RuntimeError(f"GET {path}: {status}")
    finally:
        client.close()
    return values


def _rss_after_reads(gateway: GatewayProcess, paths: Sequence[str]) -> int:
    _latencies(gateway.port, paths, 500)  # warm: caches and pools as in service
    return gateway.rss_kib()


def bench_history(
    socket: Path, work: Path, cache: Path, count: int, seconds: float
) -> tuple[list[Row], dict[str, Any]]:
    built = time.monotonic()
    sample = build_history(cache, count)
    build_seconds = time.monotonic() - built
    keep = ("--jobs-keep", "3650d")  # the history is 30 days old: nothing is purged
    with GatewayProcess(socket, "--data-dir", str(work / "empty"), *keep) as empty:
        empty_rss = _rss_after_reads(empty, ["/v1/jobs?limit=50", "/v1/jobs?state=failed"])
    gateway = GatewayProcess(socket, "--data-dir", str(cache), *keep)
    try:
        status_paths = [f"/v1/jobs/{job_id}" for job_id in random.Random(1).sample(sample, 200)]
        list_paths = [
            "/v1/jobs?limit=50",
            "/v1/jobs?state=failed&limit=50",
            "/v1/jobs?label=team=c&limit=50",
        ]
        full_rss = _rss_after_reads(gateway, status_paths + list_paths)
        status_p99 = quantile(_latencies(gateway.port, status_paths, 2000), 0.99) * 1000
        page_p99 = quantile(_latencies(gateway.port, list_paths[:1], 2000), 0.99) * 1000
        filtered_p99 = quantile(_latencies(gateway.port, list_paths[1:], 1000), 0.99) * 1000
        # GETs while 4 writers submit (jobs deleted when they succeed: keep=false).
        locked = collections.Counter[str]()
        stop = time.monotonic() + min(seconds, 10)
        reads = [0]

        def mixed(index: int) -> None:
            client = Client(gateway.port)
            try:
                while time.monotonic() < stop:
                    if index < CLIENTS:
                        status, answer = client.request(
                            "POST",
                            "/v1/jobs",
                            {"argv": ["true"], "keep": False, "name": f"w{index}"},
                        )
                    else:
                        status, answer = client.request(
                            "GET", random.choice(status_paths + list_paths)
                        )
                        reads[0] += 1
                    if "locked" in json.dumps(answer):
                        locked["answers"] += 1
                    if status >= 500:
                        locked[f"status {status}"] += 1
            finally:
                client.close()

        run_threads(CLIENTS + 2, mixed)
        gateway.proc.terminate()
        gateway.proc.wait(30)
        assert gateway.proc.stderr is not None
        log = "".join(gateway.lines) + gateway.proc.stderr.read()
        locked["log lines"] += log.count("database is locked")
    finally:
        gateway.stop()
    rss_growth = full_rss - empty_rss
    locked_total = locked["answers"] + locked["log lines"]
    rows = [
        Row(
            f"(b) status of one job, {count:,} jobs, p99",
            f"{status_p99:.2f} ms",
            "<= 10 ms",
            status_p99 <= 10,
        ),
        Row(
            "(b) first page of the list (50), p99", f"{page_p99:.2f} ms", "<= 10 ms", page_p99 <= 10
        ),
        Row(
            "(b) filtered page (state, label), p99",
            f"{filtered_p99:.2f} ms",
            "<= 10 ms",
            filtered_p99 <= 10,
        ),
        Row(
            "(b) gateway RSS: empty / with the history",
            f"{empty_rss / 1024:.0f} / {full_rss / 1024:.0f} MiB",
            "independent of history",
            rss_growth < 64 * 1024,
        ),
        Row(
            "(b) 'database is locked' while 4 writers submit",
            f"{locked_total} ({reads[0]} GETs)",
            "0",
            locked_total == 0 and not any(k.startswith("status") for k in locked),
        ),
    ]
    return rows, {
        "history": count,
        "history_build_seconds": build_seconds,
        "status_p99_ms": status_p99,
        "page_p99_ms": page_p99,
        "filtered_page_p99_ms": filtered_p99,
        "rss_empty_kib": empty_rss,
        "rss_history_kib": full_rss,
        "locked": dict(locked),
        "gets_during_writes": reads[0],
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


def render(rows: Sequence[Row]) -> str:
    header = ("measure", "value", "target", "")
    table = [header] + [
        (
            row.name,
            row.value,
            row.target,
            "" if row.met is None else ("met" if row.met else "MISSED"),
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in table) for column in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 s of submits instead of 60")
    parser.add_argument("--seconds", type=float, help="how long (a) submits")
    parser.add_argument("--history", type=int, default=1_000_000, help="jobs in (b)'s history")
    parser.add_argument("--follow-bytes", type=int, default=1 << 30, help="what (c)'s job prints")
    parser.add_argument("--rounds", type=int, help="(c)'s runs of each kind (3; 2 quick)")
    parser.add_argument("--only", default="submit,history,follow", help="which of the three")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "sockexec-bench-jobs",
        help="where (b)'s history is kept between runs",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
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
    print(render(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if all(row.met is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
