"""The jobs client (blocking and trio) and ``sockexec-client jobs`` against a real
broker and a real gateway with a data dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from sockexec_py.client.jobs import (
    Job,
    JobConflict,
    JobNotFound,
    QueueFull,
    alist_jobs,
    asubmit,
    list_jobs,
    submit,
)
from sockexec_py.client.wire import GatewayRefused
from sockexec_py.errors import BrokerUnavailable, ProtocolError, Timeout
from sockexec_py.events import Exited, Output

from conftest import Broker, GatewayProcess


@pytest.fixture
def jobs(broker: Broker, tmp_path: Path) -> Iterator[GatewayProcess]:
    process = GatewayProcess(
        broker.path, "--data-dir", str(tmp_path / "data"), "--jobs-max-queue", "2"
    )
    yield process
    process.stop()


def test_submit_wait_output_and_list(jobs: GatewayProcess) -> None:
    job = submit(
        jobs.base,
        ["sh", "-c", "cat; echo err >&2; exit 4"],
        stdin=b"\x00bytes\xff",
        labels={"suite": "client"},
        timeout=30,
    )
    status = job.wait(timeout=20)
    assert (status.state, status.exitcode, status.termsig) == ("failed", 4, None)
    assert status.finished and status.labels == {"suite": "client"} and status.argv[0] == "sh"
    frames = list(job.output())
    assert frames[-1] == Exited(exitcode=4)
    stdout = b"".join(f.data for f in frames if isinstance(f, Output) and f.kind == "stdout")
    assert stdout == b"\x00bytes\xff"  # bytes exact (base64 on the wire)
    assert list(job.output(follow=False, stream="stderr")) == [
        Output("stderr", b"err\n"),
        Exited(exitcode=4),
    ]
    assert list(job.output(follow=False, stream="stdout", offset=3)) == [
        Output("stdout", b"tes\xff"),
        Exited(exitcode=4),
    ]
    page = list_jobs(jobs.base, labels={"suite": "client"})
    assert [each.id for each in page.jobs] == [job.id] and page.totals["failed"] == 1
    assert job.status() == status
    with pytest.raises(JobConflict):
        job.cancel()
    job.delete()
    with pytest.raises(JobNotFound) as caught:
        job.status()
    assert caught.value.status == 404 and isinstance(caught.value, ProtocolError)


def test_cancel_scheduled_queue_full_and_bad_fields(jobs: GatewayProcess) -> None:
    later = datetime.now(UTC) + timedelta(days=1)
    first = submit(jobs.base, ["true"], name="full", start_at=later)
    submit(jobs.base, ["true"], name="full", start_at=later.timestamp())
    with pytest.raises(QueueFull) as caught:
        submit(jobs.base, ["true"], name="full")
    assert caught.value.status == 429 and "'full'" in str(caught.value)
    cancelled = first.cancel()
    assert cancelled.state == "cancelled" and cancelled.started_at is None
    with pytest.raises(GatewayRefused) as refused:
        submit(jobs.base, ["true"], name="bad name")
    assert refused.value.status == 400 and "name:" in str(refused.value)
    with pytest.raises(ValueError, match="gateway"):
        submit("/tmp/broker.sock", ["true"])
    running = submit(jobs.base, ["sleep", "60"], name="slow")
    with pytest.raises(Timeout):
        running.wait(timeout=0.3)
    assert running.cancel().termsig == "TERM"


def test_unreachable_gateway(tmp_path: Path) -> None:
    with pytest.raises(BrokerUnavailable, match="cannot reach the gateway"):
        submit("http://127.0.0.1:9", ["true"])
    with pytest.raises(BrokerUnavailable):
        Job("http://127.0.0.1:9", "0" * 26).status()


async def test_trio_flavour(jobs: GatewayProcess) -> None:
    with trio.fail_after(30):
        job = await asubmit(jobs.base, ["sh", "-c", "echo one; sleep 0.2; echo two"])
        async with job.output() as frames:
            seen = [frame async for frame in frames]
        # Chunks as stored: one or two, depending on when the follower came.
        assert b"".join(f.data for f in seen if isinstance(f, Output)) == b"one\ntwo\n"
        assert seen[-1] == Exited(exitcode=0)
        status = await job.wait()
        assert status.state == "succeeded" and (await job.status()) == status
        page = await alist_jobs(jobs.base, state="succeeded")
        assert job.id in [each.id for each in page.jobs]
        slow = await asubmit(jobs.base, ["sleep", "60"], name="trio-slow")
        with pytest.raises(Timeout):
            await slow.wait(timeout=0.2)
        assert (await slow.cancel()).state == "cancelled"
        with pytest.raises(JobConflict):
            await slow.cancel()
        await slow.delete()
        with pytest.raises(JobNotFound):
            await slow.status()
        # Leaving a followed output early closes its connection (nothing left behind).
        endless = await asubmit(jobs.base, ["sh", "-c", "while echo y; do sleep 0.05; done"])
        async with endless.output() as frames:
            async for frame in frames:
                assert isinstance(frame, Output)
                break
        assert (await endless.cancel()).state == "cancelled"


def _cli(
    jobs: GatewayProcess, *args: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "SOCKEXEC_URL": jobs.base}
    return subprocess.run(
        [sys.executable, "-m", "sockexec_py.client.cli", "jobs", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=60,
    )


def test_command_line(jobs: GatewayProcess) -> None:
    submitted = _cli(jobs, "submit", "--label", "via=cli", "--", "sh", "-c", "echo out; exit 7")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.decode().strip()
    waited = _cli(jobs, "wait", job_id)
    assert waited.returncode == 7, waited.stderr
    logs = _cli(jobs, "logs", "-f", job_id)
    assert (logs.returncode, logs.stdout) == (0, b"out\n")
    listed = _cli(jobs, "list", "--label", "via=cli")
    assert listed.stdout.decode().startswith(f"{job_id}  failed") and b"exit 7" in listed.stdout
    shown = _cli(jobs, "show", job_id)
    assert b'"exitcode": 7' in shown.stdout
    killed = _cli(jobs, "submit", "--stdin", "--", "sh", "-c", "cat; kill -TERM $$", stdin=b"in\n")
    killed_id = killed.stdout.decode().strip()
    waited = _cli(jobs, "wait", killed_id)
    assert waited.returncode == 128 + 15 and b"killed by signal TERM" in waited.stderr
    assert _cli(jobs, "logs", killed_id).stdout == b"in\n"
    cancelled = _cli(jobs, "cancel", killed_id)
    assert cancelled.returncode == 111 and b"409 conflict" in cancelled.stderr
    unknown = _cli(jobs, "show", "0" * 26)
    assert unknown.returncode == 111 and unknown.stderr.count(b"\n") == 1
    usage = subprocess.run(
        [sys.executable, "-m", "sockexec_py.client.cli", "jobs", "show", "x"],
        capture_output=True,
        env={k: v for k, v in os.environ.items() if k != "SOCKEXEC_URL"},
        timeout=60,
    )
    assert usage.returncode == 100 and b"SOCKEXEC_URL" in usage.stderr


def test_tasks_callbacks_and_monitor_from_python(jobs: GatewayProcess, tmp_path: Path) -> None:
    """Steps and a callback on submit (blocking and trio), a step's output, a step
    cancelled, and the monitor iterator (see test_gateway_monitor for reconnects)."""
    from sockexec_py.client.jobs import monitor

    job = submit(
        jobs.base,
        steps=[
            {"name": "greet", "argv": ["cat"], "stdin": b"hi\xff"},
            {"name": "wait", "argv": ["sleep", "60"], "depends_on": ["greet"]},
            {"name": "never", "argv": ["true"], "depends_on": ["wait"]},
        ],
        mode="dag",
        name="pytask",
    )
    frames = list(job.output(step="greet"))
    assert frames == [Output("stdout", b"hi\xff"), Exited(exitcode=0)]
    events = monitor(jobs.base, "pytask", since=0)
    for event in events:
        if (event.step, event.type) == ("wait", "started"):
            break
    status = job.cancel_step("wait")
    assert status.mode == "dag" and status.step("wait")["state"] == "cancelled"
    assert status.step("never")["state"] == "skipped"
    for event in events:
        if event.type == "finished" and event.step is None:
            assert (event.job, event.state) == (job.id, "failed")
            break
    events.close()
    with pytest.raises(GatewayRefused, match="--callback-allow"):
        submit(jobs.base, ["true"], callback="http://127.0.0.1:9/hook")
    with pytest.raises(ProtocolError, match="not both"):
        submit(jobs.base, ["true"], steps=[{"name": "a", "argv": ["true"]}])

    async def trio_task() -> str:
        task = await asubmit(jobs.base, steps=[{"name": "a", "argv": ["echo", "A"]}])
        async with task.output(step="a") as frames:
            got = [frame async for frame in frames]
        assert got == [Output("stdout", b"A\n"), Exited(exitcode=0)]
        return (await task.wait(timeout=20)).state

    assert trio.run(trio_task) == "succeeded"


def test_cli_monitor_and_task_submit(jobs: GatewayProcess, tmp_path: Path) -> None:
    spec = tmp_path / "task.json"
    spec.write_text('{"mode": "parallel", "steps": [{"name": "x", "argv": ["true"]}]}')
    cli = [sys.executable, "-m", "sockexec_py.client.cli", "jobs", "-u", jobs.base]
    submitted = subprocess.run(
        [*cli, "submit", "--name", "clitask", "--steps", str(spec)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    watcher = subprocess.Popen(
        [*cli, "monitor", "clitask", "--since", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert watcher.stdout is not None
        seen = []
        for line in watcher.stdout:
            event = json.loads(line)
            seen.append((event.get("step"), event["type"]))
            if event["type"] == "finished" and "step" not in event:
                assert event["job"] == job_id and event["state"] == "succeeded"
                break
        assert seen[:2] == [(None, "queued"), (None, "started")]
        assert ("x", "finished") in seen
    finally:
        watcher.terminate()
        watcher.wait(10)
        if watcher.stdout is not None:
            watcher.stdout.close()
    # --types is checked before connecting: one line, no traceback.
    wrong = subprocess.run(
        [*cli, "monitor", "--types", "finished,nope"], capture_output=True, text=True, timeout=30
    )
    assert wrong.returncode != 0
    assert wrong.stderr.strip().splitlines() == [
        "sockexec-client jobs: unknown event types: nope"
    ], wrong.stderr
