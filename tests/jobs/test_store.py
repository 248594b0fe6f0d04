"""The store on real SQLite files: migrations, the one-writer path, faults (locked
data dir, unwritable dir, full disk, kill -9), and each query."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from jobs_support import immutable

from sockexec_py.jobs.errors import (
    DataDirLocked,
    IllegalTransition,
    InvalidField,
    JobNotFound,
    QueueFull,
    SchemaError,
    StoreUnavailable,
)
from sockexec_py.jobs.listing import ListQuery, Page
from sockexec_py.jobs.model import Job, JobState
from sockexec_py.jobs.request import parse_submit
from sockexec_py.jobs.schema import SCHEMA_VERSION, connect, migrate
from sockexec_py.jobs.store import DATABASE, Store, open_store

from .support import EPOCH, trio_clock

S = JobState
# Tests that take ``autojump_clock`` record exact times (EPOCH + trio's mock time) and
# cross scheduled starts and retention ages without waiting.
ROOT = Path(__file__).resolve().parents[2]


def submit_body(*argv: str, **fields: object) -> object:
    return parse_submit({"argv": list(argv or ["true"]), **fields})


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


async def test_submit_get_position_counts(store: Store, autojump_clock: object) -> None:
    first = await store.submit(submit_body("echo", labels={"team": "a"}, stdin="in"))
    second = await store.submit(submit_body("echo"))
    other = await store.submit(submit_body("ls"))
    later = await store.submit(submit_body("echo", start_at=EPOCH + 3600))
    assert first.state is S.QUEUED and later.state is S.SCHEDULED
    assert await store.get(first.id) == first
    assert first.labels == {"team": "a"} and first.created_at == EPOCH
    assert await store.stdin(first.id) == b"in" and await store.stdin(second.id) == b""
    assert [await store.position(j.id) for j in (first, second, other, later)] == [0, 1, 0, None]
    counts = await store.counts()
    assert counts[S.QUEUED] == 3 and counts[S.SCHEDULED] == 1 and sum(counts.values()) == 4
    assert await store.queue_lengths() == {"echo": 2, "ls": 1}
    assert await store.next_start() == EPOCH + 3600
    with pytest.raises(JobNotFound):
        await store.get("0" * 26)
    with pytest.raises(JobNotFound):
        await store.position("0" * 26)


async def test_claim_is_fifo_per_name_within_limits(store: Store, autojump_clock: object) -> None:
    jobs = [await store.submit(submit_body(name)) for name in "aabbbc"]
    claimed = await store.claim(10, running={"c": 1}, limits={"b": 2}, default_limit=1)
    # a: limit 1; b: limit 2; c: already running its one.
    assert [job.id for job in claimed] == [jobs[0].id, jobs[2].id, jobs[3].id]
    assert all(job.state is S.RUNNING and job.started_at == EPOCH for job in claimed)
    assert await store.claim(1, running={}, limits={}, default_limit=5) == [
        await store.get(jobs[1].id)
    ]
    assert await store.claim(5, running={}, limits={"b": 0, "c": 0}, default_limit=5) == []


async def test_requeue_keeps_the_place_in_the_queue(store: Store) -> None:
    first = await store.submit(submit_body("a"))
    second = await store.submit(submit_body("a"))
    [claimed] = await store.claim(1, {}, {}, 1)
    assert claimed.id == first.id and await store.position(second.id) == 0
    await store.requeue(first.id)
    assert await store.position(first.id) == 0 and await store.position(second.id) == 1
    with pytest.raises(IllegalTransition):
        await store.requeue(first.id)  # queued -> queued is not a change


async def test_promote_due_mark_lost_cancel_delete(store: Store, autojump_clock: object) -> None:
    soon = await store.submit(submit_body("a", start_at=EPOCH + 10))
    later = await store.submit(submit_body("a", start_at=EPOCH + 20))
    assert await store.promote_due() == []
    await trio.sleep(15)
    assert await store.promote_due() == [soon.id]
    assert (await store.get(soon.id)).state is S.QUEUED
    assert await store.next_start() == EPOCH + 20
    [running] = await store.claim(5, {}, {}, 5)
    assert await store.mark_lost("lost: test") == [running.id]
    lost = await store.get(running.id)
    assert lost.state is S.LOST and lost.reason == "lost: test" and lost.ended_at == EPOCH + 15
    cancelled = await store.cancel_waiting(later.id, "cancelled before it started")
    assert cancelled.state is S.CANCELLED and await store.next_start() is None
    with pytest.raises(IllegalTransition) as info:
        await store.cancel_waiting(later.id, "again")
    assert info.value.current == "cancelled"
    waiting = await store.submit(submit_body("b", labels={"k": "v"}, stdin="x"))
    with pytest.raises(IllegalTransition):
        await store.delete(waiting.id)  # not finished
    await store.delete(lost.id)
    with pytest.raises(JobNotFound):
        await store.get(lost.id)
    counts = await store.counts()
    assert counts[S.LOST] == 0 and counts[S.CANCELLED] == 1 and counts[S.QUEUED] == 1


async def test_finish_and_keep_false(store: Store) -> None:
    a = await store.submit(submit_body("a", stdin="x"))
    b = await store.submit(submit_body("b", keep=False))
    claimed = {job.id: job for job in await store.claim(2, {}, {}, 1)}
    ended = Job(**{**_fields(claimed[a.id]), "state": S.FAILED, "exitcode": 2, "ended_at": 1.0})
    await store.finish(ended)
    stored = await store.get(a.id)
    assert stored.state is S.FAILED and stored.exitcode == 2 and await store.stdin(a.id) == b""
    await store.finish(Job(**{**_fields(claimed[b.id]), "state": S.SUCCEEDED}), remove=True)
    with pytest.raises(JobNotFound):
        await store.get(b.id)
    with pytest.raises(IllegalTransition):
        await store.finish(ended)  # failed -> failed


def _fields(job: Job) -> dict[str, object]:
    return {name: getattr(job, name) for name in Job.__dataclass_fields__}


async def test_queue_full_counts_queued_and_scheduled(store: Store) -> None:
    await store.submit(submit_body("a"), max_waiting=2)
    await store.submit(submit_body("a", start_at=EPOCH + 99), max_waiting=2)
    with pytest.raises(QueueFull, match="'a'"):
        await store.submit(submit_body("a"), max_waiting=2)
    await store.submit(submit_body("b"), max_waiting=2)  # other names are not affected
    assert sum((await store.counts()).values()) == 3


async def test_concurrent_submits_share_commits_and_fail_alone(store: Store) -> None:
    """Many submits at once (group commit): the ones past the queue limit fail, the
    others are all committed."""
    results: list[object] = []

    async def submit(index: int) -> None:
        try:
            results.append(
                await store.submit(submit_body("a", labels={"i": str(index)}), max_waiting=30)
            )
        except QueueFull as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        for index in range(50):
            nursery.start_soon(submit, index)
    assert sum(isinstance(r, Job) for r in results) == 30
    assert sum(isinstance(r, QueueFull) for r in results) == 20
    assert (await store.counts())[S.QUEUED] == 30
    assert rows(store.path, "SELECT count(*) FROM job_labels") == [(30,)]


async def test_list_filters_sorts_and_cursor(store: Store, autojump_clock: object) -> None:
    jobs = []
    for index in range(12):
        name = "even" if index % 2 == 0 else "odd"
        jobs.append(await store.submit(submit_body(name, labels={"n": str(index % 3)})))
        await trio.sleep(1)
    page = await store.list_jobs(ListQuery(limit=5))
    assert [j.id for j in page.jobs] == [j.id for j in reversed(jobs)][:5]
    seen = list(page.jobs)
    while page.next_cursor:
        page = await store.list_jobs(ListQuery(limit=5, cursor=page.next_cursor))
        seen.extend(page.jobs)
    assert [j.id for j in seen] == [j.id for j in reversed(jobs)]
    ascending = await store.list_jobs(ListQuery(limit=100, descending=False))
    assert [j.id for j in ascending.jobs] == [j.id for j in jobs] and ascending.next_cursor is None
    odd = await store.list_jobs(ListQuery(name="odd", labels={"n": "0"}))
    assert [j.id for j in odd.jobs] == [jobs[9].id, jobs[3].id]
    ranged = await store.list_jobs(ListQuery(created_from=EPOCH + 2, created_to=EPOCH + 4))
    assert [j.id for j in ranged.jobs] == [jobs[3].id, jobs[2].id]
    by_label = ListQuery(labels={"n": "1"}, created_from=EPOCH + 2, limit=2)
    first = await store.list_jobs(by_label)
    rest = await store.list_jobs(replace(by_label, cursor=first.next_cursor))
    assert [j.id for j in first.jobs + rest.jobs] == [jobs[i].id for i in (10, 7, 4)]
    assert rest.next_cursor is None
    await store.claim(2, {}, {}, 1)
    started = await store.list_jobs(ListQuery(sort="started"))
    assert {j.id for j in started.jobs} == {jobs[0].id, jobs[1].id}
    running = await store.list_jobs(ListQuery(states=frozenset({S.RUNNING})))
    assert {j.id for j in running.jobs} == {jobs[0].id, jobs[1].id}
    assert (await store.list_jobs(ListQuery(sort="ended"))).jobs == []
    started_0 = await store.list_jobs(ListQuery(sort="started", labels={"n": "0"}))
    assert [j.id for j in started_0.jobs] == [jobs[0].id]
    never = ListQuery(sort="ended", states=frozenset({S.RUNNING, S.QUEUED}))
    assert await store.list_jobs(never) == Page([], None)
    with pytest.raises(InvalidField) as info:
        await store.list_jobs(ListQuery(sort="started", cursor=page.next_cursor or "xyz"))
    assert info.value.field == "cursor"
    with pytest.raises(InvalidField, match="limit"):
        await store.list_jobs(ListQuery(limit=0))


async def test_pagination_is_stable_under_concurrent_inserts(store: Store) -> None:
    """Pages read while other tasks insert: no job is repeated or skipped."""
    before = [await store.submit(submit_body("a", labels={"k": "v"})) for _ in range(100)]
    seen: list[str] = []
    async with trio.open_nursery() as nursery:

        async def insert() -> None:
            for _ in range(60):
                await store.submit(submit_body("a", labels={"k": "v"}))

        for _ in range(3):
            nursery.start_soon(insert)
        for descending in (True, False):
            seen.clear()
            page = await store.list_jobs(
                ListQuery(limit=7, descending=descending, labels={"k": "v"})
            )
            while True:
                seen.extend(job.id for job in page.jobs)
                if page.next_cursor is None:
                    break
                page = await store.list_jobs(
                    ListQuery(
                        limit=7, descending=descending, labels={"k": "v"}, cursor=page.next_cursor
                    )
                )
            assert len(seen) == len(set(seen))
            assert {job.id for job in before} <= set(seen)


async def test_purge_in_batches(
    store: Store, autojump_clock: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sockexec_py.jobs.store as store_module

    monkeypatch.setattr(store_module, "PURGE_BATCH", 3)
    jobs = [await store.submit(submit_body("a")) for _ in range(10)]
    for _ in jobs:
        [claimed] = await store.claim(1, {}, {}, 1)
        await store.finish(
            Job(**{**_fields(claimed), "state": S.SUCCEEDED, "ended_at": trio_clock()})
        )
        await trio.sleep(10)
    waiting = await store.submit(submit_body("b"))
    # Ended at EPOCH+0..90; now EPOCH+100: older than 35 s are the first 7.
    assert await store.purge(older_than=35) == [job.id for job in jobs[:7]]
    assert await store.purge(keep_max=1) == [job.id for job in jobs[7:9]]
    assert await store.purge(keep_max=1, older_than=1000) == []
    counts = await store.counts()
    assert counts[S.SUCCEEDED] == 1 and counts[S.QUEUED] == 1
    assert (await store.get(waiting.id)).state is S.QUEUED


# ---- schema ----


def v1_file(path: Path) -> None:
    """A data file as version 1 wrote it, with jobs in several states."""
    conn = connect(path)
    migrate(conn, path, target=1)
    for index, state in enumerate(["queued", "queued", "running", "succeeded"]):
        conn.execute(
            """INSERT INTO jobs (id, name, argv, labels, state, created_at, queued_at, keep)
                VALUES (?, 'a', '["true"]', '{"k": "v"}', ?, ?, ?, 1)""",
            (f"01J{index:023d}", state, EPOCH + index, EPOCH + index),
        )
        conn.execute("INSERT INTO job_labels VALUES ('k', 'v', last_insert_rowid())")
    conn.close()


async def test_upgrade_from_v1(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    v1_file(data / DATABASE)
    assert rows(data / DATABASE, "PRAGMA user_version") == [(1,)]
    async with open_store(data, clock=trio_clock) as store:
        assert rows(data / DATABASE, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        counts = await store.counts()
        assert counts[S.QUEUED] == 2 and counts[S.RUNNING] == 1 and counts[S.SUCCEEDED] == 1
        job = await store.get("01J" + "0" * 23)
        assert job.progress.task is None and job.labels == {"k": "v"}
        assert len(await store.mark_lost()) == 1
        assert (await store.counts())[S.LOST] == 1
        # The labels moved to v2's table, found by label in creation order.
        labelled = await store.list_jobs(ListQuery(labels={"k": "v"}, limit=3))
        assert [j.id for j in labelled.jobs] == [f"01J{i:023d}" for i in (3, 2, 1)]
        assert labelled.next_cursor is not None
        rest = await store.list_jobs(ListQuery(labels={"k": "v"}, cursor=labelled.next_cursor))
        assert [j.id for j in rest.jobs] == ["01J" + "0" * 23]


def test_a_failing_migration_leaves_the_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sockexec_py.jobs.schema as schema

    path = tmp_path / DATABASE
    v1_file(path)
    broken = (schema.MIGRATIONS[0], (*schema.MIGRATIONS[1][:3], "CREATE TABLE jobs (x)"))
    monkeypatch.setattr(schema, "MIGRATIONS", broken)
    conn = connect(path)
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, path)
    assert conn.execute("PRAGMA user_version").fetchone() == (1,)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
    assert "progress_task" not in columns  # the ALTERs were rolled back too
    conn.close()


async def test_newer_or_foreign_files_are_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer"
    newer.mkdir()
    with sqlite3.connect(newer / DATABASE) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaError, match="newer"):
        async with open_store(newer):
            pass
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with sqlite3.connect(foreign / DATABASE) as conn:
        conn.execute("CREATE TABLE mine (x)")
    with pytest.raises(SchemaError, match="did not create"):
        async with open_store(foreign):
            pass
    async with open_store(newer.parent / "fresh"):  # the lock was released on failure
        pass


# ---- faults ----

HOLD = textwrap.dedent(
    """
    import sys, trio
    from sockexec_py.jobs.store import open_store
    from sockexec_py.jobs.request import parse_submit

    async def main():
        async with open_store(sys.argv[1]) as store:
            job = await store.submit(parse_submit({"argv": ["true"], "stdin": "x"}))
            print(job.id, flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


def hold(data: Path) -> tuple[subprocess.Popen[str], str]:
    """A process that opens the store, commits one job, prints its id and waits."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(data)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    assert len(line) == 26, line
    return process, line


async def test_one_gateway_per_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    process, _ = hold(data)
    try:
        with pytest.raises(DataDirLocked) as info:
            async with open_store(data):
                pass
        message = str(info.value)
        assert f"pid {process.pid}" in message and str(data) in message and "\n" not in message
    finally:
        process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()
    async with open_store(data):  # the kernel released the lock with the process
        pass


async def test_kill_9_right_after_a_commit_keeps_the_job(tmp_path: Path) -> None:
    data = tmp_path / "data"
    process, job_id = hold(data)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.stdout is not None
    process.stdout.close()
    async with open_store(data) as store:
        job = await store.get(job_id)
        assert job.state is S.QUEUED and await store.stdin(job_id) == b"x"


async def test_unwritable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if os.geteuid() == 0:
        immutable(data, True)
    else:
        data.chmod(0o555)
    try:
        with pytest.raises(StoreUnavailable) as info:
            async with open_store(data):
                pass
        assert str(data) in str(info.value) and "\n" not in str(info.value)
    finally:
        if os.geteuid() == 0:
            immutable(data, False)
        data.chmod(0o755)
    file_in_the_way = tmp_path / "file"
    file_in_the_way.write_text("")
    with pytest.raises(StoreUnavailable):
        async with open_store(file_in_the_way / "data"):
            pass


async def test_full_disk_refuses_the_submit_and_writes_nothing(store: Store) -> None:
    kept = await store.submit(submit_body("a"))
    pages = await store._writer.run(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
    await store._writer.run(lambda conn: conn.execute(f"PRAGMA max_page_count = {pages}"))
    big = {f"k{i}": "x" * 256 for i in range(32)}
    with pytest.raises(StoreUnavailable) as info:
        for _ in range(50):  # until a page must be added
            await store.submit(submit_body("b", labels=big, stdin="y" * 100_000))
    assert "full" in str(info.value) and "\n" not in str(info.value)
    await store._writer.run(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823"))
    # Whatever went in before the failure is whole; the failed submit left nothing.
    counts = await store.counts()
    listed = await store.list_jobs(ListQuery(limit=1000))
    assert sum(counts.values()) == len(listed.jobs)
    assert rows(store.path, "SELECT count(*) FROM job_labels")[0][0] == 32 * (len(listed.jobs) - 1)
    assert rows(store.path, "SELECT count(*) FROM job_stdin")[0][0] == len(listed.jobs) - 1
    assert (await store.get(kept.id)).state is S.QUEUED
    await store.submit(submit_body("c"))  # and the store works again


async def test_io_error_mid_run_is_unavailable_then_recovers(store: Store) -> None:
    await store.submit(submit_body("a"))
    wal = store.path.with_name(DATABASE + "-wal")
    immutable(wal, True)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.submit(submit_body("b", labels={"k": "v"}))
        assert "\n" not in str(info.value)
    finally:
        immutable(wal, False)
    job = await store.submit(submit_body("c"))
    counts = await store.counts()
    assert counts[S.QUEUED] == 2 and (await store.get(job.id)).name == "c"
    assert rows(store.path, "SELECT count(*) FROM job_labels") == [(0,)]


async def test_reads_never_see_locked_while_writers_submit(store: Store) -> None:
    """4 writers submit while readers read: no 'database is locked'."""
    first = await store.submit(submit_body("a"))
    done = trio.Event()

    async def write() -> None:
        for _ in range(100):
            await store.submit(submit_body("a", labels={"x": "y"}))

    async def read() -> None:
        while not done.is_set():
            assert (await store.get(first.id)).id == first.id
            await store.list_jobs(ListQuery(limit=20))
            await store.counts()

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(read)
        async with trio.open_nursery() as writers:
            for _ in range(4):
                writers.start_soon(write)
        done.set()
    assert (await store.counts())[S.QUEUED] == 401
    assert json.loads(rows(store.path, "SELECT labels FROM jobs LIMIT 1 OFFSET 1")[0][0]) == {
        "x": "y"
    }
