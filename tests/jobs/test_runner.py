"""The runner against a real broker process and a real SQLite file: outcomes,
refusals, queues and limits, scheduled starts, cancel, timeouts, a broker that is
down, and restarts (including kill -9 of the process running the jobs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sockexec_py.jobs.errors import IllegalTransition, JobNotFound, QueueFull, StoreUnavailable
from sockexec_py.jobs.model import LOST_REASON, Job, JobState
from sockexec_py.jobs.output import Chunk
from sockexec_py.jobs.request import parse_submit
from sockexec_py.jobs.runner import Runner
from sockexec_py.jobs.store import Store, open_store

from .support import EPOCH

S = JobState
ROOT = Path(__file__).resolve().parents[2]


def job(*argv: str, **fields: object) -> Any:
    return parse_submit({"argv": list(argv), **fields})


class Watcher:
    """Listens to a runner: every change in order, and how many ran at once."""

    def __init__(self, runner: Runner) -> None:
        self.changes: list[tuple[str, JobState]] = []
        self.running: dict[str, Job] = {}
        self.peak = 0
        self.peak_per_name: Counter[str] = Counter()
        self.started: list[str] = []
        self.event = trio.Event()
        runner.add_listener(self)

    def __call__(self, job: Job) -> None:
        self.changes.append((job.id, job.state))
        if job.state is S.RUNNING:
            self.running[job.id] = job
            self.started.append(job.id)
        else:
            self.running.pop(job.id, None)
        self.peak = max(self.peak, len(self.running))
        per_name = Counter(j.name for j in self.running.values())
        for name, count in per_name.items():
            self.peak_per_name[name] = max(self.peak_per_name[name], count)
        self.event.set()
        self.event = trio.Event()

    async def until(self, job_id: str, *states: JobState) -> None:
        """Wait until the job went through ``states``, in this order."""
        while True:
            seen = iter(state for changed, state in self.changes if changed == job_id)
            if all(state in seen for state in states):  # a subsequence of what it went through
                return
            await self.event.wait()


async def output_of(runner: Runner, job_id: str, view: str = "both") -> bytes:
    reader = await runner.read_output(job_id, view)  # type: ignore[arg-type]
    return b"".join([item.data async for item in reader if isinstance(item, Chunk)])


async def test_success_failure_signal_and_stdin(
    store: Store, broker: Any, make_runner: Any
) -> None:
    async with make_runner(store, broker.path, max_running=4) as runner:
        ok = await runner.submit(job("echo", "hello"))
        bad = await runner.submit(job("sh", "-c", "echo oops >&2; exit 3"))
        killed = await runner.submit(job("sh", "-c", "kill -KILL $$"))
        cat = await runner.submit(job("cat", stdin="to stdin\n"))
        with trio.fail_after(20):
            ok, bad, killed, cat = [await runner.wait(j.id) for j in (ok, bad, killed, cat)]
        assert ok.state is S.SUCCEEDED and ok.exitcode == 0 and ok.termsig is None
        assert ok.stdout_bytes == 6 and ok.stderr_bytes == 0 and ok.reason is None
        assert ok.started_at is not None and ok.ended_at is not None and ok.duration is not None
        assert await output_of(runner, ok.id) == b"hello\n"
        assert bad.state is S.FAILED and bad.exitcode == 3 and bad.reason is None
        assert await output_of(runner, bad.id, "stderr") == b"oops\n"
        assert killed.state is S.FAILED and killed.termsig == "KILL" and killed.exitcode is None
        assert cat.state is S.SUCCEEDED and await output_of(runner, cat.id) == b"to stdin\n"
        assert await store.get(ok.id) == ok  # what wait() returned is what is stored
        assert (await store.counts())[S.SUCCEEDED] == 2


async def test_refusal_keeps_the_brokers_line(store: Store, broker: Any, make_runner: Any) -> None:
    async with make_runner(store, broker.path) as runner:
        missing = await runner.submit(job("no-such-program-xyz"))
        with trio.fail_after(20):
            missing = await runner.wait(missing.id)
    assert missing.state is S.FAILED and missing.exitcode == 127
    assert missing.reason == "sockexec_py: no-such-program-xyz: program not found"


async def test_progress_is_recorded(store: Store, broker: Any, make_runner: Any) -> None:
    # One stream per job: the order of stdout and stderr chunks is not guaranteed.
    script = "printf '[1/3] Download\\n[40%%] part\\nnoise\\n[2] Unpack\\n'; printf '75%%'"
    async with make_runner(store, broker.path) as runner:
        first = await runner.submit(job("sh", "-c", script))
        second = await runner.submit(job("sh", "-c", "echo '[3/3] Last' >&2"))
        with trio.fail_after(20):
            await runner.wait(first.id)
            await runner.wait(second.id)
    progress = (await store.get(first.id)).progress
    assert (progress.task, progress.tasks, progress.title, progress.percent) == (2, 3, "Unpack", 75)
    assert progress.step is None  # a new task cleared the subtask
    progress = (await store.get(second.id)).progress
    assert (progress.task, progress.tasks, progress.title) == (3, 3, "Last")


async def test_fifo_per_name_with_limit_one_and_global_max(
    store: Store, broker: Any, make_runner: Any
) -> None:
    async with make_runner(store, broker.path, max_running=2, limits={"wide": 3}) as runner:
        watcher = Watcher(runner)
        names = ["q", "q", "q", "r", "wide", "wide", "wide", "q"]
        jobs = [await runner.submit(job("true", name=name)) for name in names]
        with trio.fail_after(30):
            for submitted in jobs:
                assert (await runner.wait(submitted.id)).state is S.SUCCEEDED
    assert watcher.peak <= 2 and watcher.peak_per_name["q"] == 1
    q_jobs = [j.id for j in jobs if j.name == "q"]
    assert [i for i in watcher.started if i in q_jobs] == q_jobs  # FIFO within the name
    assert len(watcher.started) == len(jobs)  # each ran once


async def test_queue_full(store: Store) -> None:
    from sockexec_py.jobs.output import OutputStore
    from sockexec_py.jobs.runner import RunnerConfig

    runner = Runner(
        store, OutputStore(store.data_dir / "o"), RunnerConfig("/nonexistent", max_waiting=2)
    )
    await runner.submit(job("true"))
    await runner.submit(job("true", start_at=EPOCH + 1e6))
    with pytest.raises(QueueFull):
        await runner.submit(job("true"))
    assert sum((await store.counts()).values()) == 2


async def test_scheduled_start_on_a_fake_clock(
    store: Store, broker: Any, make_runner: Any, autojump_clock: Any
) -> None:
    async with make_runner(store, broker.path) as runner:
        later = await runner.submit(job("echo", "later", start_at=EPOCH + 3600))
        sooner = await runner.submit(job("echo", "sooner", start_at=EPOCH + 60))
        assert later.state is S.SCHEDULED and await store.position(later.id) is None
        done = await runner.wait(later.id)
        first = await store.get(sooner.id)
    assert done.state is S.SUCCEEDED and done.started_at is not None
    assert done.started_at >= EPOCH + 3600 and first.started_at is not None
    # Mock time also jumps while tasks wait on threads, so only the order is exact.
    assert EPOCH + 60 <= first.started_at < done.started_at


async def test_cancel_queued_then_running(store: Store, broker: Any, make_runner: Any) -> None:
    async with make_runner(store, broker.path) as runner:
        watcher = Watcher(runner)
        running = await runner.submit(job("sleep", "1000", name="one"))
        queued = await runner.submit(job("true", name="one"))
        scheduled = await runner.submit(job("true", start_at=EPOCH + 1e9))
        with trio.fail_after(20):
            await watcher.until(running.id, S.RUNNING)
            cancelled = await runner.cancel(queued.id)
            assert (
                cancelled.state is S.CANCELLED and cancelled.reason == "cancelled before it started"
            )
            assert (await runner.cancel(scheduled.id)).state is S.CANCELLED
            ended = await runner.cancel(running.id)
        assert ended.state is S.CANCELLED and ended.termsig == "TERM" and ended.exitcode is None
        assert ended.reason is not None and "terminated" in ended.reason
        assert (await store.get(running.id)).state is S.CANCELLED
        with pytest.raises(IllegalTransition):
            await runner.cancel(running.id)
        with pytest.raises(JobNotFound):
            await runner.cancel("0" * 26)
    assert queued.id not in watcher.started and scheduled.id not in watcher.started
    await trio.to_thread.run_sync(broker.wait_idle)  # the broker terminated sleep


async def test_timeout_fails_the_job(store: Store, broker: Any, make_runner: Any) -> None:
    async with make_runner(store, broker.path) as runner:
        submitted = await runner.submit(job("sleep", "1000", timeout=0.3))
        with trio.fail_after(20):
            done = await runner.wait(submitted.id)
    assert (
        done.state is S.FAILED
        and done.reason is not None
        and "timed out after 0.3 s" in done.reason
    )


async def test_keep_false_removes_only_successes(
    store: Store, broker: Any, make_runner: Any
) -> None:
    async with make_runner(store, broker.path, max_running=2) as runner:
        ok = await runner.submit(job("echo", "x", keep=False))
        bad = await runner.submit(job("false", keep=False))
        with trio.fail_after(20):
            assert (await runner.wait(ok.id)).state is S.SUCCEEDED
            assert (await runner.wait(bad.id)).state is S.FAILED
    with pytest.raises(JobNotFound):
        await store.get(ok.id)
    assert (await store.get(bad.id)).state is S.FAILED
    assert not list((store.data_dir / "output").rglob(f"{ok.id}*"))


async def test_output_cap_truncates_and_the_job_goes_on(
    store: Store, broker: Any, make_runner: Any
) -> None:
    async with make_runner(store, broker.path, cap=1000) as runner:
        submitted = await runner.submit(job("sh", "-c", "head -c 100000 /dev/zero; echo done >&2"))
        with trio.fail_after(20):
            done = await runner.wait(submitted.id)
    assert done.state is S.SUCCEEDED and done.truncated
    assert done.stdout_bytes + done.stderr_bytes <= 1000
    assert done.stdout_bytes + done.stderr_bytes + done.dropped_bytes == 100005


async def test_following_a_running_job(
    store: Store, broker: Any, make_runner: Any, tmp_path: Path
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    async with make_runner(store, broker.path) as runner:
        submitted = await runner.submit(job("sh", "-c", f"echo first; cat {fifo}; echo last"))
        with trio.fail_after(20):
            reader = await runner.read_output(submitted.id, follow=True)
            items = []
            async for item in reader:
                items.append(item)
                if isinstance(item, Chunk) and item.data == b"first\n":
                    # The program now waits on the fifo: feed it from a thread.
                    await trio.to_thread.run_sync(fifo.write_bytes, b"middle\n")
            late = await runner.read_output(submitted.id, offset=6, follow=True)
            assert (
                b"".join([i.data async for i in late if isinstance(i, Chunk)]) == b"middle\nlast\n"
            )
        assert b"".join(i.data for i in items if isinstance(i, Chunk)) == b"first\nmiddle\nlast\n"
        assert (await store.get(submitted.id)).state is S.SUCCEEDED


async def test_broker_down_then_up_runs_the_job_once(
    store: Store, start_broker: Any, make_runner: Any, tmp_path: Path
) -> None:
    socket_path = tmp_path / "broker0.sock"  # where start_broker will put it
    marker = tmp_path / "ran"
    async with make_runner(store, socket_path, retry_initial=0.05, retry_max=0.2) as runner:
        watcher = Watcher(runner)
        submitted = await runner.submit(job("sh", "-c", f"echo x >> {marker}"))
        with trio.fail_after(20):
            # Submitted, claimed, and back in the queue (not failed): the broker is down.
            await watcher.until(submitted.id, S.QUEUED, S.RUNNING, S.QUEUED)
            broker = await trio.to_thread.run_sync(start_broker)
            assert broker.path == socket_path
            done = await runner.wait(submitted.id)
    assert done.state is S.SUCCEEDED and marker.read_text() == "x\n"
    assert S.FAILED not in {state for _, state in watcher.changes}


async def test_restart_marks_running_lost_and_runs_the_queued(
    tmp_path: Path, broker: Any, make_runner: Any
) -> None:
    data = tmp_path / "data"
    async with open_store(data) as store:
        running = await store.submit(job("sleep", "1000"))
        await store.claim(1, {}, {}, 1)  # the previous process had started it
        queued = await store.submit(job("echo", "after"))
        scheduled = await store.submit(job("echo", "later", start_at=store.clock() + 0.2))
    async with open_store(data) as store, make_runner(store, broker.path) as runner:
        with trio.fail_after(20):
            done = await runner.wait(queued.id)
            later = await runner.wait(scheduled.id)
        lost = await store.get(running.id)
        assert runner._watches == {}  # waiters leave nothing behind
        with pytest.raises(JobNotFound):
            await runner.read_output("0" * 26)
    assert lost.state is S.LOST and lost.reason == LOST_REASON and lost.ended_at is not None
    assert done.state is S.SUCCEEDED and later.state is S.SUCCEEDED


GATEWAY = textwrap.dedent(
    """
    import sys, trio
    from sockexec_py.jobs.output import OutputStore
    from sockexec_py.jobs.request import parse_submit
    from sockexec_py.jobs.runner import Runner, RunnerConfig
    from sockexec_py.jobs.store import open_store

    async def main(data, socket_path):
        async with open_store(data) as store, trio.open_nursery() as nursery:
            runner = Runner(store, OutputStore(data + "/output"), RunnerConfig(socket_path))
            await nursery.start(runner.run)
            first = await runner.submit(parse_submit({"argv": ["sleep", "1000"], "name": "a"}))
            second = await runner.submit(parse_submit({"argv": ["echo", "2nd"], "name": "a"}))
            await runner.wait(first.id, started=True)
            print(first.id, second.id, flush=True)
            await trio.sleep_forever()

    trio.run(main, *sys.argv[1:])
    """
)


async def test_kill_9_mid_run_then_restart(tmp_path: Path, broker: Any, make_runner: Any) -> None:
    """The process running the jobs dies by SIGKILL while one runs and one waits:
    at the next start, the running one is lost (the broker ended its program) and
    the waiting one runs, once."""
    data = tmp_path / "data"
    process = subprocess.Popen(
        [sys.executable, "-c", GATEWAY, str(data), str(broker.path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout is not None
    with trio.fail_after(30):
        line = await trio.to_thread.run_sync(process.stdout.readline)
    first_id, second_id = line.split()
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    await trio.to_thread.run_sync(broker.wait_idle)  # the session dropped: sleep is gone
    async with open_store(data) as store, make_runner(store, broker.path) as runner:
        watcher = Watcher(runner)
        with trio.fail_after(20):
            second = await runner.wait(second_id)
        first = await store.get(first_id)
        counts = await store.counts()
    assert first.state is S.LOST and first.reason == LOST_REASON
    assert second.state is S.SUCCEEDED and watcher.started == [second_id]
    assert counts[S.LOST] == 1 and counts[S.SUCCEEDED] == 1 and sum(counts.values()) == 2


MISC = ROOT / "misc"


async def _cancel_when_ready(runner: Runner, submitted: Job) -> Job:
    """Cancel the job once its program said ``ready`` (its signal handling is set)."""
    reader = await runner.read_output(submitted.id, "stdout", follow=True)
    async for item in reader:
        if isinstance(item, Chunk) and b"ready" in item.data:
            break
    return await runner.cancel(submitted.id)


async def test_cancel_escalates_to_kill_through_the_broker(
    store: Store, start_broker: Any, make_runner: Any
) -> None:
    """A program that ignores TERM is killed after the broker's -k, and the job ends
    cancelled with KILL: the broker reported it, the connection was not just closed."""
    broker = start_broker("-k", "1")
    async with make_runner(store, broker.path) as runner:
        submitted = await runner.submit(job(str(MISC / "ignore-term")))
        with trio.fail_after(20):
            ended = await _cancel_when_ready(runner, submitted)
    assert ended.state is S.CANCELLED and ended.termsig == "KILL"
    assert ended.reason == "cancelled while running; the broker terminated the program"


async def test_cancel_without_an_answer_closes_the_session_and_says_so(
    store: Store, start_broker: Any, make_runner: Any
) -> None:
    """The broker takes longer than the grace to report the end (its -k is 1.5 s, the
    program ignores TERM): the session is closed, termsig unknown, and the reason
    says why."""
    broker = start_broker("-k", "1.5")
    async with make_runner(store, broker.path, kill_grace=0.3) as runner:
        submitted = await runner.submit(job(str(MISC / "ignore-term")))
        with trio.fail_after(20):
            ended = await _cancel_when_ready(runner, submitted)
    assert ended.state is S.CANCELLED and ended.termsig is None
    assert ended.reason is not None and "within 0.3 s" in ended.reason
    assert "termsig is unknown" in ended.reason


async def test_a_step_followed_before_it_starts_gives_its_output(
    store: Store, broker: Any, make_runner: Any, tmp_path: Path
) -> None:
    """A follower parked before its task starts (a job waiting on a FIFO holds the
    only slot) gets the step's whole output once the task runs: it wakes when the
    step is marked running, and the step's output is registered by then."""
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)

    def release() -> None:
        with open(fifo, "w") as gate:  # blocks until the blocker reads
            gate.write("go\n")

    async with make_runner(store, broker.path, max_running=1) as runner:
        for n in range(10):
            await runner.submit(job("sh", "-c", f"read x < {fifo}"))
            steps = [{"name": "build", "argv": ["echo", f"built {n}"]}]
            task = await runner.submit(parse_submit({"steps": steps}))
            got: list[bytes] = []

            async def follow(task_id: str = task.id, into: list[bytes] = got) -> None:
                reader = await runner.read_output(task_id, "stdout", follow=True, step="build")
                into.append(b"".join([i.data async for i in reader if isinstance(i, Chunk)]))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                await trio.testing.wait_all_tasks_blocked(0.05)  # the follower parks
                await trio.to_thread.run_sync(release)
            assert got == [f"built {n}\n".encode()], n


async def _task_with_a_cancel_inside(
    store: Store,
    runner: Runner,
    tmp_path: Path,
    method: str,
    cancel: Any,
) -> tuple[Job, Path]:
    """Run a one-step task whose step ``touch``es a file, with ``cancel(task_id)``
    run inside the store's ``method`` (``start_step`` or ``step_stdin``) for it: a
    cancel that lands at that point of the step's start. Returns the task's end and
    the file (which must not exist: the program never ran)."""
    marker = tmp_path / "ran"
    original = getattr(store, method)
    submitted: list[Job] = []

    async def with_a_cancel(*args: Any) -> Any:
        result = await original(*args)
        await cancel(submitted[0].id)
        return result

    setattr(store, method, with_a_cancel)
    try:
        with trio.fail_after(20):
            steps = [{"name": "a", "argv": ["touch", str(marker)]}]
            submitted.append(await runner.submit(parse_submit({"steps": steps})))
            ended = await runner.wait(submitted[0].id)
    finally:
        setattr(store, method, original)
    return ended, marker


@pytest.mark.parametrize("method", ["start_step", "step_stdin"])
async def test_a_step_cancelled_while_it_starts_never_runs(
    store: Store, broker: Any, make_runner: Any, tmp_path: Path, method: str
) -> None:
    """A cancel of the step while its start is being recorded (it is still queued
    in memory), or once recorded but before its session connects: answered, and
    the program never runs, in memory as in the store (a review found it ran)."""
    async with make_runner(store, broker.path) as runner, trio.open_nursery() as nursery:
        answers: list[Job] = []

        async def cancel_step(task_id: str) -> None:
            answers.append(await runner.cancel_step(task_id, "a"))

        async def cancel(task_id: str) -> None:
            nursery.start_soon(cancel_step, task_id)  # it returns once the step ended
            await trio.testing.wait_all_tasks_blocked()  # it asked

        ended, marker = await _task_with_a_cancel_inside(store, runner, tmp_path, method, cancel)
    assert not marker.exists()
    assert ended.state is S.FAILED  # a task whose step was cancelled (rule 4 of steps)
    (step,) = await store.steps(ended.id)
    assert step.state.value == "cancelled" and step.reason == "cancelled before it started"
    assert len(answers) == 1  # the cancel was answered (the API says 200)


@pytest.mark.parametrize("method", ["start_step", "step_stdin"])
async def test_a_task_cancelled_while_a_step_starts_never_runs_it(
    store: Store, broker: Any, make_runner: Any, tmp_path: Path, method: str
) -> None:
    async with make_runner(store, broker.path) as runner, trio.open_nursery() as nursery:

        async def cancel(task_id: str) -> None:
            nursery.start_soon(runner.cancel, task_id)  # it returns once the task ended
            await trio.testing.wait_all_tasks_blocked()  # it asked

        ended, marker = await _task_with_a_cancel_inside(store, runner, tmp_path, method, cancel)
    assert not marker.exists() and ended.state is S.CANCELLED
    (step,) = await store.steps(ended.id)
    assert step.state.value == "cancelled" and step.exitcode is None


async def test_a_step_cancelled_while_the_store_refuses_its_start(
    store: Store, broker: Any, make_runner: Any, tmp_path: Path
) -> None:
    """The store refuses a step's start (a full disk) and the step is cancelled
    before the start is tried again: it never runs and the runner goes on (the
    retried start met a cancelled step and the error ended the runner)."""
    marker = tmp_path / "ran"
    original = store.start_step
    submitted: list[Job] = []
    async with (
        make_runner(store, broker.path, retry_initial=0.05) as runner,
        trio.open_nursery() as nursery,
    ):

        async def refused_once(*args: Any) -> Any:
            store.start_step = original  # type: ignore[method-assign]
            nursery.start_soon(runner.cancel_step, submitted[0].id, "a")
            await trio.testing.wait_all_tasks_blocked()  # its end is being recorded
            raise StoreUnavailable("cannot write the job store: database or disk is full")

        store.start_step = refused_once  # type: ignore[method-assign]
        with trio.fail_after(20):
            steps = [{"name": "a", "argv": ["touch", str(marker)]}]
            submitted.append(await runner.submit(parse_submit({"steps": steps})))
            ended = await runner.wait(submitted[0].id)
            after = await runner.submit(job("true"))  # the runner still runs jobs
            assert (await runner.wait(after.id)).state is S.SUCCEEDED
    assert not marker.exists() and ended.state is S.FAILED
    (step,) = await store.steps(ended.id)
    assert step.state.value == "cancelled" and step.reason == "cancelled before it started"


async def test_a_step_cancelled_as_its_waiting_task_is_claimed_never_runs(
    store: Store, broker: Any, make_runner: Any, tmp_path: Path
) -> None:
    """The cancel read the steps of a task that waited; before it recorded the
    cancel, the runner claimed the task and started the step. The cancel must go to
    the running task (the step is terminated), not overwrite the running step in
    the store while its program runs on (a review found it did)."""
    marker = tmp_path / "ran"
    read_steps, start_step = store.steps, store.start_step
    started = trio.Event()
    held: list[str] = []

    async def steps_once_started(job_id: str) -> Any:
        result = await read_steps(job_id)
        if not held:  # the cancel's read: it returns once the claim started the step
            held.append(job_id)
            await started.wait()
        return result

    async def start_and_tell(*args: Any) -> Any:
        result = await start_step(*args)
        started.set()
        return result

    store.steps = steps_once_started  # type: ignore[method-assign]
    store.start_step = start_and_tell  # type: ignore[method-assign]
    try:
        async with (
            make_runner(store, broker.path, max_running=1) as runner,
            trio.open_nursery() as nursery,
        ):
            blocker = await runner.submit(job("sleep", "30"))
            await runner.wait(blocker.id, started=True)
            script = f"sleep 2; touch {marker}"
            task = await runner.submit(
                parse_submit({"steps": [{"name": "a", "argv": ["sh", "-c", script]}]})
            )
            nursery.start_soon(runner.cancel_step, task.id, "a")
            await trio.testing.wait_all_tasks_blocked(0.05)  # its read is held
            assert held == [task.id]
            with trio.fail_after(20):
                await runner.cancel(blocker.id)  # the slot frees: the task is claimed
                ended = await runner.wait(task.id)
    finally:
        store.steps, store.start_step = read_steps, start_step  # type: ignore[method-assign]
    assert not marker.exists()
    (step,) = await store.steps(task.id)
    # Terminated, or stopped before its session connected: either way through the
    # running task (the machine's speed decides which).
    assert step.state.value == "cancelled", step
    assert step.termsig == "TERM" or step.reason == "cancelled before it started", step
    assert ended.state is S.FAILED


async def test_a_cancel_that_finds_its_task_claimed_leaves_the_steps_output_open(
    store: Store, broker: Any, make_runner: Any
) -> None:
    """The waiting path's cancel meets a task claimed meanwhile: the step's output
    (shared by key) is the running step's now and stays open, so what the step
    writes after the cancel is kept (a review found it dropped)."""
    end_steps = store.end_steps
    script = 'trap "echo got-term; exit 3" TERM; echo started; while :; do sleep 0.1; done'
    async with make_runner(store, broker.path, max_running=1) as runner:

        async def once_it_printed(ended_job: Job, ended: Any, *, waiting: bool = False) -> Any:
            if waiting:  # held until the claimed step printed its first line
                reader = await runner.read_output(ended_job.id, "stdout", follow=True, step="a")
                async for item in reader:
                    if isinstance(item, Chunk):
                        break
            return await end_steps(ended_job, ended, waiting=waiting)

        store.end_steps = once_it_printed  # type: ignore[method-assign]
        try:
            blocker = await runner.submit(job("sleep", "30"))
            await runner.wait(blocker.id, started=True)
            task = await runner.submit(
                parse_submit({"steps": [{"name": "a", "argv": ["sh", "-c", script]}]})
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(runner.cancel_step, task.id, "a")
                await trio.testing.wait_all_tasks_blocked(0.05)  # it waits on the output
                with trio.fail_after(30):
                    await runner.cancel(blocker.id)  # the slot frees: the task is claimed
                    ended = await runner.wait(task.id)
        finally:
            store.end_steps = end_steps  # type: ignore[method-assign]
        reader = await runner.read_output(task.id, "stdout", step="a")
        out = b"".join([item.data async for item in reader if isinstance(item, Chunk)])
    (step,) = await store.steps(task.id)
    assert (step.state.value, step.exitcode, step.dropped_bytes) == ("cancelled", 3, 0), step
    assert ended.state is S.FAILED and b"started\ngot-term\n" in out, out


async def test_a_step_cancel_does_not_wait_on_a_task_that_could_not_read_its_steps(
    store: Store, broker: Any, make_runner: Any
) -> None:
    """The claimed task's steps could not be read (a store error): the cancel of
    one of them is answered (409: the task is recorded running until the next
    start), not left waiting for steps that never load."""
    read_steps = store.steps
    reading, gate = trio.Event(), trio.Event()

    async def failing_first(job_id: str) -> Any:
        if not reading.is_set():  # the runner's read after its claim
            reading.set()
            await gate.wait()
            raise StoreUnavailable("cannot read the job store: disk I/O error")
        return await read_steps(job_id)

    store.steps = failing_first  # type: ignore[method-assign]
    try:
        async with make_runner(store, broker.path) as runner, trio.open_nursery() as nursery:
            task = await runner.submit(parse_submit({"steps": [{"name": "a", "argv": ["true"]}]}))
            await reading.wait()
            refused: list[BaseException] = []
            answered = trio.Event()

            async def cancel() -> None:
                with pytest.raises(IllegalTransition) as raised:
                    await runner.cancel_step(task.id, "a")
                refused.append(raised.value)
                answered.set()

            nursery.start_soon(cancel)
            await trio.testing.wait_all_tasks_blocked(0.05)  # it waits on the task
            gate.set()
            with trio.fail_after(10):
                await answered.wait()
    finally:
        store.steps = read_steps  # type: ignore[method-assign]
    assert "running" in str(refused[0])
