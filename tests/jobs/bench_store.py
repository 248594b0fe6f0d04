"""Measure the store on a large history (not a test: run it by hand).

    PYTHONPATH=. python tests/jobs/bench_store.py [--jobs 1000000] [--dir /tmp/jobs-bench]

Builds (once, then reuses) a data dir holding ``--jobs`` finished and waiting jobs,
then reports p50/p99 latencies of what the HTTP layer will call, through the async
facade (thread hop included): status by id, list pages (first, deep through the
cursor, filtered, sorted by end), counts, queue position; then 4 concurrent
writers submitting while 4 readers read (throughput, latencies, errors).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from sockexec_py.jobs.listing import ListQuery
from sockexec_py.jobs.model import JobState, new_job_id
from sockexec_py.jobs.request import parse_submit
from sockexec_py.jobs.schema import connect, migrate
from sockexec_py.jobs.store import DATABASE, Store, open_store

NAMES = [f"script-{n}" for n in range(50)]


def build(data: Path, count: int) -> list[str]:
    """A history of ``count`` jobs over ~30 days; returns a sample of ids."""
    ids_file = data / "bench-ids.json"
    if ids_file.exists():
        return list(json.loads(ids_file.read_text()))
    data.mkdir(parents=True, exist_ok=True)
    path = data / DATABASE
    conn = connect(path)
    migrate(conn, path)
    conn.execute("PRAGMA synchronous = OFF")
    rng = random.Random(1)
    start = time.time() - 30 * 86400
    sample: list[str] = []
    conn.execute("BEGIN")
    for index in range(count):
        created = start + index * (30 * 86400 / count)
        job_id = new_job_id(created)
        if index % (count // 2000 or 1) == 0:
            sample.append(job_id)
        name = rng.choice(NAMES)
        state = "queued" if index >= count - 500 else rng.choice(["succeeded"] * 8 + ["failed"])
        labels = {"team": rng.choice("abcdefgh")} if index % 10 == 0 else {}
        ended = None if state == "queued" else created + rng.random() * 60
        cursor = conn.execute(
            """INSERT INTO jobs (id, name, argv, labels, state, created_at, queued_at,
                started_at, ended_at, keep, exitcode, stdout_bytes)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)""",
            (
                job_id,
                name,
                json.dumps([name, "--flag", str(index)]),
                json.dumps(labels),
                state,
                created,
                created,
                None if ended is None else created + 0.01,
                ended,
                None if ended is None else (0 if state == "succeeded" else 1),
                rng.randrange(10_000),
            ),
        )
        for key, value in labels.items():
            conn.execute(
                "INSERT INTO job_labels VALUES (?, ?, ?, ?, ?)",
                (key, value, created, job_id, cursor.lastrowid),
            )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    ids_file.write_text(json.dumps(sample))
    return sample


def report(what: str, samples: list[float]) -> None:
    samples = sorted(samples)
    p50 = statistics.median(samples) * 1000
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000
    print(f"{what:<44} n={len(samples):>5}  p50 {p50:7.3f} ms  p99 {p99:7.3f} ms")


async def timed(n: int, call: Callable[[int], Awaitable[object]]) -> list[float]:
    samples = []
    for index in range(n):
        begin = time.perf_counter()
        await call(index)
        samples.append(time.perf_counter() - begin)
    return samples


async def reads(store: Store, ids: list[str]) -> None:
    rng = random.Random(2)
    report("status by id (get)", await timed(2000, lambda i: store.get(rng.choice(ids))))
    report("list: first page of 50", await timed(500, lambda i: store.list_jobs(ListQuery())))
    deep = await store.list_jobs(ListQuery(limit=1000))
    for _ in range(200):  # 200,000 rows deep
        assert deep.next_cursor is not None
        deep = await store.list_jobs(ListQuery(limit=1000, cursor=deep.next_cursor))
    cursor = deep.next_cursor
    report(
        "list: a page 200,000 rows deep (cursor)",
        await timed(500, lambda i: store.list_jobs(ListQuery(cursor=cursor))),
    )
    failed = ListQuery(states=frozenset({JobState.FAILED}))
    report("list: state=failed", await timed(500, lambda i: store.list_jobs(failed)))
    named = ListQuery(name="script-7")
    report("list: name=script-7", await timed(500, lambda i: store.list_jobs(named)))
    labelled = ListQuery(labels={"team": "c"})
    report("list: label team=c", await timed(500, lambda i: store.list_jobs(labelled)))
    ended = ListQuery(sort="ended")
    report("list: sort=ended", await timed(500, lambda i: store.list_jobs(ended)))
    ended_failed = ListQuery(sort="ended", states=frozenset({JobState.FAILED}))
    report(
        "list: state=failed sort=ended", await timed(500, lambda i: store.list_jobs(ended_failed))
    )
    two = ListQuery(states=frozenset({JobState.FAILED, JobState.SUCCEEDED}), name="script-3")
    report("list: 2 states + name", await timed(500, lambda i: store.list_jobs(two)))
    report("counts per state", await timed(500, lambda i: store.counts()))
    queued = (await store.list_jobs(ListQuery(states=frozenset({JobState.QUEUED})))).jobs
    report(
        "queue position",
        await timed(500, lambda i: store.position(queued[i % len(queued)].id)),
    )


async def writers(store: Store, ids: list[str], per_writer: int, pause: float) -> None:
    submits: list[float] = []
    gets: list[float] = []
    errors: list[BaseException] = []
    done = trio.Event()

    async def write(number: int) -> None:
        for index in range(per_writer):
            request = parse_submit({"argv": ["true", str(index)], "name": f"w{number}"})
            begin = time.perf_counter()
            try:
                await store.submit(request)
            except Exception as exc:
                errors.append(exc)
            submits.append(time.perf_counter() - begin)

    async def read() -> None:
        rng = random.Random(3)
        while not done.is_set():
            begin = time.perf_counter()
            try:
                await store.get(rng.choice(ids))
                await store.list_jobs(ListQuery())
            except Exception as exc:
                errors.append(exc)
            gets.append(time.perf_counter() - begin)
            await trio.sleep(pause)

    begin = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(read)
        async with trio.open_nursery() as writing:
            for number in range(4):
                writing.start_soon(write, number)
        elapsed = time.perf_counter() - begin
        done.set()
    print(f"4 writers, 4 readers pausing {pause * 1000:g} ms between reads:")
    print(f"  {len(submits)} submits in {elapsed:.2f} s = {len(submits) / elapsed:.0f}/s")
    report("  submit latency (committed, FULL sync)", submits)
    report("  get + first page, while writing", gets)
    print(f"  errors: {len(errors)} {sorted({str(e) for e in errors})[:3]}")


async def main(data: Path, count: int) -> None:
    begin = time.perf_counter()
    ids = build(data, count)
    print(f"history: {count} jobs in {data} (ready in {time.perf_counter() - begin:.1f} s)")
    async with open_store(data) as store:
        print(f"counts: { {s.value: n for s, n in (await store.counts()).items() if n} }")
        await reads(store, ids)
        for pause in (0.005, 0.0):  # readers at ~200 reads/s each, then flat out
            await writers(store, ids, 500, pause)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/jobs-bench"))
    arguments = parser.parse_args()
    trio.run(main, arguments.dir, arguments.jobs)
