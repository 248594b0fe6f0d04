"""Multi-step tasks through a real gateway and broker: a DAG with a failing step,
each step's output (and followed), a cycle and a dangling dependency refused,
1,000 steps, cancelling one step (running, waiting, finished), and kill -9 of the
gateway mid-task (running steps lost, queued ones run after the restart)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jobs_support import call, immutable, submit, wait

from conftest import Broker, GatewayProcess, wait_until


@pytest.fixture
def jobs(broker: Broker, tmp_path: Path) -> Iterator[GatewayProcess]:
    process = GatewayProcess(broker.path, "--data-dir", str(tmp_path / "data"))
    yield process
    process.stop()


def steps_by_name(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["name"]: step for step in job["steps"]}


def step_running(gateway: GatewayProcess, job_id: str, name: str) -> None:
    def running() -> bool:
        _, job = call(gateway, "GET", f"/v1/jobs/{job_id}")
        step = steps_by_name(job)[name]
        return bool(step["state"] == "running" and step["stdout_bytes"] > 0)

    wait_until(running, 20, f"step {name} to run")


def test_a_dag_runs_as_its_dependencies_allow(jobs: GatewayProcess) -> None:
    task = submit(
        jobs,
        mode="dag",
        name="pipeline",
        labels={"kind": "task"},
        steps=[
            {"name": "fetch", "argv": ["sh", "-c", "echo '[1/2] get'; echo fetched"]},
            {"name": "build", "argv": ["sh", "-c", "cat; exit 2"], "depends_on": ["fetch"]}
            | {"stdin": "built\n"},
            {"name": "test", "argv": ["echo", "tested"], "depends_on": ["fetch"]},
            {"name": "deploy", "argv": ["echo", "deployed"], "depends_on": ["build", "test"]},
            {"name": "notify", "argv": ["echo", "n"], "depends_on": ["deploy"], "timeout": 5},
        ],
    )
    job = wait(jobs, task)
    steps = steps_by_name(job)
    assert (job["state"], job["exitcode"], job["mode"]) == ("failed", 2, "dag")
    assert job["reason"] == "step 'build' failed (exit 2); 2 skipped"
    assert {name: step["state"] for name, step in steps.items()} == {
        "fetch": "succeeded",
        "build": "failed",
        "test": "succeeded",
        "deploy": "skipped",
        "notify": "skipped",
    }
    assert steps["deploy"]["reason"] == "skipped: step 'build' failed"
    assert steps["notify"]["reason"] == "skipped: step 'build' failed"  # the cause
    assert steps["deploy"]["depends_on"] == ["build", "test"] and steps["notify"]["timeout"] == 5
    assert steps["fetch"]["progress"]["title"] == "get"
    assert job["progress"] == {
        "task": 5,
        "tasks": 5,
        "title": "test",
        "percent": None,
        "step": None,
    }
    assert job["stdout_bytes"] == sum(step["stdout_bytes"] for step in steps.values())
    for name, text in (("fetch", b"[1/2] get\nfetched\n"), ("build", b"built\n"), ("deploy", b"")):
        status, _, data = jobs.request("GET", f"/v1/jobs/{task}/output?step={name}")
        assert (status, data) == (200, text), name
    status, _, data = jobs.request("GET", f"/v1/jobs/{task}/output?step=build&follow=1")
    frames = [json.loads(line) for line in data.splitlines()]
    assert frames[-1] == {
        "type": "exit",
        "exitcode": 2,
        "termsig": None,
        "state": "failed",
        "reason": None,
    }
    status, error = call(jobs, "GET", f"/v1/jobs/{task}/output?step=nope")
    assert status == 404 and error["error"] == "not_found"
    status, page = call(jobs, "GET", "/v1/jobs?label=kind=task")
    assert [each["id"] for each in page["jobs"]] == [task] and "steps" not in page["jobs"][0]
    plain = submit(jobs, argv=["true"])
    assert call(jobs, "GET", f"/v1/jobs/{plain}/output?step=x")[0] == 404


@pytest.mark.parametrize(
    ("steps", "detail"),
    [
        (
            [
                {"name": "a", "argv": ["true"], "depends_on": ["c"]},
                {"name": "b", "argv": ["true"], "depends_on": ["a"]},
                {"name": "c", "argv": ["true"], "depends_on": ["b"]},
            ],
            "steps[0].depends_on: a cycle ('a -> b': a depends on b): a -> c -> b -> a",
        ),
        (
            [
                {"name": "a", "argv": ["true"]},
                {"name": "b", "argv": ["true"], "depends_on": ["a", "ghost"]},
            ],
            "steps[1].depends_on: step 'b' depends on 'ghost', which is not a step of this task",
        ),
    ],
)
def test_cycles_and_dangling_dependencies_are_400(
    jobs: GatewayProcess, steps: list[Any], detail: str
) -> None:
    status, error = call(jobs, "POST", "/v1/jobs", {"mode": "dag", "steps": steps})
    assert (status, error) == (400, {"error": "bad_request", "detail": detail})
    _, page = call(jobs, "GET", "/v1/jobs")
    assert page["jobs"] == []  # nothing was written


def test_a_thousand_steps(broker: Broker, tmp_path: Path) -> None:
    steps = [{"name": "root", "argv": ["true"]}] + [
        {"name": f"s{i}", "argv": ["true"], "depends_on": ["root"]} for i in range(999)
    ]
    with GatewayProcess(
        broker.path, "--data-dir", str(tmp_path / "data"), "--jobs-max-running", "16"
    ) as gateway:
        task = submit(gateway, mode="dag", steps=steps)
        job = wait(gateway, task, timeout=120)
        assert job["state"] == "succeeded" and len(job["steps"]) == 1000
        assert {step["state"] for step in job["steps"]} == {"succeeded"}
        assert job["progress"]["task"] == job["progress"]["tasks"] == 1000


def test_cancel_one_step(jobs: GatewayProcess) -> None:
    task = submit(
        jobs,
        mode="dag",
        steps=[
            {"name": "slow", "argv": ["sh", "-c", "echo up; exec sleep 60"]},
            {"name": "after", "argv": ["true"], "depends_on": ["slow"]},
            {"name": "aside", "argv": ["echo", "aside"]},
        ],
    )
    step_running(jobs, task, "slow")
    status, job = call(jobs, "POST", f"/v1/jobs/{task}/steps/slow/cancel")
    assert status == 200, job
    steps = steps_by_name(job)
    assert (steps["slow"]["state"], steps["slow"]["termsig"]) == ("cancelled", "TERM")
    assert steps["after"]["state"] == "skipped"
    job = wait(jobs, task)
    assert job["state"] == "failed" and steps_by_name(job)["aside"]["state"] == "succeeded"
    status, error = call(jobs, "POST", f"/v1/jobs/{task}/steps/slow/cancel")
    assert status == 409 and error["error"] == "conflict"
    status, error = call(jobs, "POST", f"/v1/jobs/{task}/steps/ghost/cancel")
    assert status == 404
    # A step of a task that waits: recorded cancelled, it never runs.
    later = submit(
        jobs,
        start_at=4102444800,
        steps=[{"name": "one", "argv": ["true"]}, {"name": "two", "argv": ["true"]}],
    )
    status, job = call(jobs, "POST", f"/v1/jobs/{later}/steps/one/cancel")
    assert status == 200 and job["state"] == "scheduled"
    assert [step["state"] for step in job["steps"]] == ["cancelled", "skipped"]
    status, job = call(jobs, "POST", f"/v1/jobs/{later}/cancel")
    assert status == 200 and job["state"] == "cancelled"


def test_a_step_whose_name_has_a_slash_is_cancelled_by_name(jobs: GatewayProcess) -> None:
    """Step names may hold ``/``: the cancel route takes it raw or as ``%2F`` (the
    Python client's quoting)."""
    slow = ["sh", "-c", "echo up; exec sleep 60"]
    task = submit(
        jobs,
        mode="parallel",
        steps=[{"name": "build/linux", "argv": slow}, {"name": "build/mac", "argv": slow}],
    )
    for name, quoted in (("build/linux", "build/linux"), ("build/mac", "build%2Fmac")):
        step_running(jobs, task, name)
        status, job = call(jobs, "POST", f"/v1/jobs/{task}/steps/{quoted}/cancel")
        assert status == 200, job
        assert steps_by_name(job)[name]["state"] == "cancelled"
    status, error = call(jobs, "POST", f"/v1/jobs/{task}/steps/build/cancel")
    assert status == 404, error


def test_steps_survive_a_kill_9(broker: Broker, tmp_path: Path) -> None:
    """One step at a time: 'slow' runs when the gateway is killed, 'then' waits.
    After the restart 'slow' is lost, 'after' (its dependent) skipped, 'then' runs."""
    data = tmp_path / "data"
    flags = ("--data-dir", str(data), "--jobs-max-running", "1")
    gateway = GatewayProcess(broker.path, *flags)
    try:
        task = submit(
            gateway,
            mode="dag",
            steps=[
                {"name": "first", "argv": ["echo", "one"]},
                {"name": "slow", "argv": ["sh", "-c", "echo up; exec sleep 60"]}
                | {"depends_on": ["first"]},
                {"name": "then", "argv": ["echo", "then"], "depends_on": ["first"]},
                {"name": "after", "argv": ["true"], "depends_on": ["slow"]},
            ],
        )
        step_running(gateway, task, "slow")
    except BaseException:
        gateway.stop()
        raise
    gateway.kill()
    broker.wait_idle()
    with GatewayProcess(broker.path, *flags) as restarted:
        job = wait(restarted, task)
        steps = steps_by_name(job)
        assert {name: step["state"] for name, step in steps.items()} == {
            "first": "succeeded",
            "slow": "lost",
            "then": "succeeded",
            "after": "skipped",
        }
        assert job["state"] == "lost" and "step 'slow' lost" in job["reason"]
        status, _, out = restarted.request("GET", f"/v1/jobs/{task}/output?step=then")
        assert (status, out) == (200, b"then\n")


def test_a_step_end_the_store_refuses_is_kept_and_the_task_goes_on(
    jobs: GatewayProcess, tmp_path: Path
) -> None:
    """A step ends while the store cannot be written: its end is kept, the task
    waits, and once the store takes writes again the end is recorded and the next
    step runs (nothing lost, nothing marked lost)."""
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    steps = [
        {"name": "first", "argv": ["sh", "-c", f'echo up; read x < "{fifo}"']},
        {"name": "second", "argv": ["echo", "after"]},
    ]
    task = submit(jobs, name="held", mode="sequential", steps=steps)
    step_running(jobs, task, "first")
    wal = tmp_path / "data" / "jobs.db-wal"
    immutable(wal, True)
    try:
        fd = os.open(fifo, os.O_WRONLY)
        os.write(fd, b"go\n")
        os.close(fd)
        jobs.log_until(f"cannot record the end of step first of {task} yet")
        jobs.log_until("cannot record a step's end yet")  # the task waits for the store
        status, job = call(jobs, "GET", f"/v1/jobs/{task}")
        assert status == 200 and job["state"] == "running"
    finally:
        immutable(wal, False)
    job = wait(jobs, task)
    assert job["state"] == "succeeded", job
    assert [(s["name"], s["state"]) for s in job["steps"]] == [
        ("first", "succeeded"),
        ("second", "succeeded"),
    ]
    status, _, body = jobs.request("GET", f"/v1/jobs/{task}/output?step=second")
    assert (status, body) == (200, b"after\n")


def test_task_answers_are_documented(jobs: GatewayProcess) -> None:
    """A task's status (steps, callback), a step's cancel and the monitor's route
    against the generated OpenAPI document."""
    from test_gateway_jobs import Document

    document = Document(jobs)
    assert "/v1/monitor" in document.spec["paths"]
    assert "/v1/jobs/{job_id}/steps/{step}/cancel" in document.spec["paths"]
    task = submit(
        jobs,
        start_at=4102444800,
        steps=[{"name": "a", "argv": ["true"]}, {"name": "b", "argv": ["true"]}],
    )
    status, job = call(jobs, "GET", f"/v1/jobs/{task}")
    document.check("GET", "/v1/jobs/{job_id}", status, job)
    status, job = call(jobs, "POST", f"/v1/jobs/{task}/steps/a/cancel")
    document.check("POST", "/v1/jobs/{job_id}/steps/{step}/cancel", status, job)
    status, error = call(jobs, "POST", f"/v1/jobs/{task}/steps/a/cancel")
    document.check("POST", "/v1/jobs/{job_id}/steps/{step}/cancel", status, error)
    status, page = call(jobs, "GET", "/v1/jobs")
    document.check("GET", "/v1/jobs", status, page)
    status, error = call(jobs, "POST", "/v1/jobs", {"steps": [], "mode": "dag"})
    document.check("POST", "/v1/jobs", status, error)
