"""Job output files: per-stream and arrival-order reads from any offset, the cap and
its marker, and live followers."""

from __future__ import annotations

import tempfile
from pathlib import Path

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from sockexec_py.jobs.output import MAX_PENDING, Chunk, OutputStore, Truncated, View
from sockexec_py.jobs.output_files import READ_CHUNK

JOB = "01J00000000000000000000000"


async def collect(
    store: OutputStore, view: View = "both", offset: int = 0, follow: bool = False
) -> list[Chunk | Truncated]:
    return [item async for item in store.read(JOB, view, offset, follow=follow)]


def joined(items: list[Chunk | Truncated]) -> bytes:
    return b"".join(item.data for item in items if isinstance(item, Chunk))


WRITES = st.lists(
    st.tuples(st.sampled_from(["stdout", "stderr"]), st.binary(min_size=0, max_size=40)),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(writes=WRITES, data=st.data())
async def test_reads_from_any_offset_as_stored(
    writes: list[tuple[str, bytes]], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as root:
        store = OutputStore(root)
        output = store.open(JOB)
        try:
            for stream, chunk in writes:
                await output.write(stream, chunk)  # type: ignore[arg-type]
            both = b"".join(chunk for _, chunk in writes)
            per = {s: b"".join(c for k, c in writes if k == s) for s in ("stdout", "stderr")}
            for live in (True, False):
                if not live:
                    await output.close()
                offset = data.draw(st.integers(0, len(both) + 2))
                items = await collect(store, "both", offset)
                assert joined(items) == both[offset:]
                # Each chunk's stream and offset match the arrival order.
                arrival = [(k, i) for k, c in writes for i in range(len(c))]
                for item in items:
                    assert isinstance(item, Chunk)
                    expected = {k for k, _ in arrival[item.offset : item.offset + len(item.data)]}
                    assert expected == {item.stream}
                for stream in ("stdout", "stderr"):
                    offset = data.draw(st.integers(0, len(per[stream]) + 2))
                    assert joined(await collect(store, stream, offset)) == per[stream][offset:]  # type: ignore[arg-type]
            assert output.stdout_bytes == len(per["stdout"])
            assert output.stderr_bytes == len(per["stderr"])
        finally:
            await output.close()  # also when hypothesis stops an example midway


async def test_no_output_no_files(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    output = store.open(JOB)
    await output.close()
    assert await collect(store) == [] and list(tmp_path.rglob("*")) == []


async def test_large_output_reads_in_bounded_chunks(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    output = store.open(JOB)
    block = bytes(range(256)) * 1024
    for _ in range(4):
        await output.write("stdout", block)
        await output.write("stderr", block[:1000])
    await output.close()
    items = await collect(store, "both", 5)
    assert all(isinstance(i, Chunk) and len(i.data) <= READ_CHUNK for i in items)
    assert joined(items) == ((block + block[:1000]) * 4)[5:]


async def test_cap_records_a_marker_and_counts_what_is_dropped(tmp_path: Path) -> None:
    store = OutputStore(tmp_path, cap=100)
    output = store.open(JOB)
    await output.write("stdout", b"a" * 40)  # 17 (index) + 40
    await output.write("stderr", b"b" * 40)  # 17 + 26 fit
    await output.write("stdout", b"c" * 10)  # dropped
    assert output.truncated and output.stdout_bytes == 40 and output.stderr_bytes == 26
    assert output.dropped_bytes == 14 + 10
    items = await collect(store)
    assert joined(items) == b"a" * 40 + b"b" * 26 and isinstance(items[-1], Truncated)
    await output.close()
    await output.write("stdout", b"late")  # after the end: counted, never stored
    assert output.dropped_bytes == 28
    for view in ("both", "stdout", "stderr"):
        items = await collect(store, view)  # type: ignore[arg-type]
        assert isinstance(items[-1], Truncated), view
    assert joined(await collect(store, "stderr")) == b"b" * 26


async def test_followers_get_stored_then_live_bytes_then_the_end(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    output = store.open(JOB)
    await output.write("stdout", b"early ")
    results: dict[int, bytes] = {}

    async def follow(number: int, offset: int, task_status: trio.TaskStatus[None]) -> None:
        reader = store.read(JOB, "both", offset, follow=True)
        task_status.started()
        results[number] = joined([item async for item in reader])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for number, offset in enumerate([0, 3, 6, 100]):
                await nursery.start(follow, number, offset)
            await output.write("stderr", b"live ")
            await trio.testing.wait_all_tasks_blocked()
            await output.write("stdout", b"more")
            # Not following: stops at what is stored now, even while the job runs.
            assert joined(await collect(store)) == b"early live more"
            await output.close()
    assert results == {0: b"early live more", 1: b"ly live more", 2: b"live more", 3: b""}


async def test_following_a_finished_job_reads_to_the_end(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    output = store.open(JOB)
    await output.write("stdout", b"done\n")
    await output.close()
    with trio.fail_after(5):
        assert joined(await collect(store, "stdout", follow=True)) == b"done\n"
    await store.remove(JOB)
    assert await collect(store) == []


async def test_open_gives_the_live_output_until_it_is_closed(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    output = store.open(JOB)
    assert store.open(JOB) is output and store.live(JOB) is output
    await output.close()
    assert store.live(JOB) is None and store.open(JOB) is not output


async def test_write_behind_stays_bounded_and_close_flushes(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    output = store.open(JOB)
    block = b"x" * 100_000
    async with trio.open_nursery() as nursery:
        nursery.start_soon(output.run_writer)
        await trio.testing.wait_all_tasks_blocked()
        for index in range(100):
            await output.write("stdout" if index % 3 else "stderr", block)
            assert output._pending_bytes < MAX_PENDING + len(block)
        nursery.cancel_scope.cancel()
    await output.close()
    assert output.both_bytes == 100 * len(block)
    assert joined(await collect(store)) == block * 100


async def test_a_failed_write_stops_storage_and_is_recorded(tmp_path: Path) -> None:
    store = OutputStore(tmp_path / "output")
    output = store.open(JOB)
    (tmp_path / "output").write_text("")  # a file where the directory should be
    await output.write("stdout", b"lost")
    assert output.truncated and output.error is not None and "\n" not in output.error
    assert output.dropped_bytes == 4 and output.stdout_bytes == 0
    await output.write("stdout", b"more")
    assert output.dropped_bytes == 8
    await output.close()


async def test_a_reader_ends_when_the_job_is_deleted_under_it(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    output = store.open(JOB)
    for stream in ("stdout", "stderr") * 3:
        await output.write(stream, b"z" * READ_CHUNK)  # type: ignore[arg-type]
    await output.close()
    for view in ("both", "stdout"):
        reader = store.read(JOB, view)  # type: ignore[arg-type]
        first = await reader.__anext__()
        assert isinstance(first, Chunk) and first.data
        await store.remove(JOB)
        assert [item async for item in reader] == []
        output = store.open(JOB)
        for stream in ("stdout", "stderr") * 3:
            await output.write(stream, b"z" * READ_CHUNK)  # type: ignore[arg-type]
        await output.close()


@settings(max_examples=40, deadline=None)
@given(writes=WRITES, window=st.integers(1, 120), data=st.data())
async def test_live_reads_past_the_memory_window_come_from_the_files(
    writes: list[tuple[str, bytes]], window: int, data: st.DataObject
) -> None:
    """A running job keeps only its latest output in memory (output.RECENT bytes,
    tiny here); reads before that window come from the files, byte for byte."""
    from sockexec_py.jobs import output as module

    saved, module.RECENT = module.RECENT, window
    with tempfile.TemporaryDirectory() as root:
        store = OutputStore(root)
        output = store.open(JOB)
        try:
            for stream, chunk in writes:
                await output.write(stream, chunk)  # type: ignore[arg-type]
                assert output._recent_bytes <= window or len(output._recent) == 1
            both = b"".join(chunk for _, chunk in writes)
            offset = data.draw(st.integers(0, len(both)))
            assert joined(await collect(store, "both", offset)) == both[offset:]
            stream = data.draw(st.sampled_from(["stdout", "stderr"]))
            own = b"".join(c for k, c in writes if k == stream)
            offset = data.draw(st.integers(0, len(own)))
            assert joined(await collect(store, stream, offset)) == own[offset:]  # type: ignore[arg-type]
        finally:
            module.RECENT = saved
            await output.close()
