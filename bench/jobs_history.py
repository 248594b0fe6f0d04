"""(b) of ``python -m bench.jobs``: a large history (``--history`` finished jobs,
written straight into the store's schema and cached), the status and list latency
over it, the gateway's RSS, and reads while writers submit ("database is locked"
must never be seen). :func:`build_history` is shared with ``bench.dashboard``."""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sockexec_py.jobs.model import new_job_id
from sockexec_py.jobs.schema import connect, migrate
from sockexec_py.jobs.store import DATABASE
from sockexec_py.testing import GatewayProcess

from .jobs_common import CLIENTS, Client, Row, quantile, run_threads

# -- (b) a large history --------------------------------------------------------------

NAMES = [f"script-{n}" for n in range(50)]


def add_history_options(parser: argparse.ArgumentParser, history_help: str) -> None:
    """``--cache`` (where a history is kept between runs, shared by bench.jobs and
    bench.dashboard) and ``--json``."""
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "sockexec-bench-jobs",
        help=history_help,
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")


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
