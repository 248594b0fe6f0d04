"""Multi-step tasks, sans-IO: the graph checks at submit (cycles, dangling and
duplicate names, each named), the modes, 1,000 steps, skipping and outcomes."""

from __future__ import annotations

import time
from typing import Any

import pytest

from sockexec_py.jobs.errors import InvalidField
from sockexec_py.jobs.model import JobState
from sockexec_py.jobs.request import parse_submit
from sockexec_py.jobs.steps import (
    Step,
    StepState,
    build_graph,
    dependents_closure,
    dependents_of,
    task_end,
    task_outcome,
)

S = StepState


def task(*steps: dict[str, Any], mode: str | None = "dag", **more: Any) -> Any:
    body: dict[str, Any] = {"steps": list(steps), **more}
    if mode is not None:
        body["mode"] = mode
    return parse_submit(body)


def step(name: str, *deps: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "argv": ["true"], **({"depends_on": list(deps)} if deps else {}), **more}


def test_modes_make_the_graph() -> None:
    names = ["a", "b", "c"]
    assert build_graph("sequential", names, [[], [], []]) == [(), (0,), (1,)]
    assert build_graph("parallel", names, [[], [], []]) == [(), (), ()]
    assert build_graph("dag", names, [[], ["a"], ["a", "b", "a"]]) == [(), (0,), (0, 1)]
    submitted = task(step("x"), step("y"), mode=None)
    assert submitted.mode == "sequential" and submitted.steps[1].depends_on == (0,)
    assert submitted.argv == ("true",) and submitted.name == "true"


@pytest.mark.parametrize(
    ("steps", "field", "detail"),
    [
        ([step("a", "b"), step("b", "a")], "steps[0].depends_on", "a cycle"),
        ([step("a", "a")], "steps[0].depends_on", "a -> a"),
        (
            [step("a"), step("b", "c"), step("c", "d"), step("d", "b")],
            "steps[1]",
            "b -> c -> d -> b",
        ),
        ([step("a"), step("b", "nope")], "steps[1].depends_on", "step 'b' depends on 'nope'"),
        ([step("a"), step("a")], "steps[1].name", "step name 'a' is used twice"),
        ([step("a", timeout=0)], "steps[0].timeout", "expected a positive number"),
        ([{"name": "a"}], "steps[0].argv", "expected a non-empty list"),
        ([{"name": "a b", "argv": ["x"]}], "steps[0].name", "expected 1-64 characters"),
        ([{"name": "a", "argv": ["x"], "env": {}}], "steps[0].env", "unknown field"),
        ([], "steps", "expected a non-empty list"),
    ],
)
def test_bad_graphs_name_the_step(steps: list[Any], field: str, detail: str) -> None:
    with pytest.raises(InvalidField) as caught:
        task(*steps)
    assert caught.value.field.startswith(field), caught.value
    assert detail in caught.value.detail, caught.value


def test_fields_that_do_not_go_with_steps() -> None:
    for extra, field in (
        ({"argv": ["x"]}, "argv"),
        ({"timeout": 5}, "timeout"),
        ({"stdin": "x"}, "stdin"),
    ):
        with pytest.raises(InvalidField) as caught:
            task(step("a"), mode=None, **extra)
        assert caught.value.field == field
    with pytest.raises(InvalidField, match="expected one of sequential, parallel, dag"):
        task(step("a"), mode="fast")
    with pytest.raises(InvalidField, match="only with steps"):
        parse_submit({"argv": ["x"], "mode": "dag"})
    with pytest.raises(InvalidField, match="only with"):
        task(step("a"), step("b", "a"), mode="sequential")
    with pytest.raises(InvalidField, match="more than 1000 steps"):
        task(*[step(f"s{i}") for i in range(1001)], mode="parallel")


def test_a_thousand_steps_are_checked_in_linear_time() -> None:
    """A chain and a wide fan of 1,000 steps each, plus a cycle closing a 1,000-step
    chain: each checked in well under a second (O(steps + dependencies))."""
    chain = [step("s0")] + [step(f"s{i}", f"s{i - 1}") for i in range(1, 1000)]
    fan = [step("root")] + [step(f"f{i}", "root") for i in range(999)]
    closed = [step("s0", "s999"), *chain[1:]]
    started = time.perf_counter()
    assert len(task(*chain).steps) == 1000
    assert len(task(*fan).steps) == 1000
    with pytest.raises(InvalidField, match="a cycle"):
        task(*closed)
    assert time.perf_counter() - started < 2


def record(index: int, state: StepState, *deps: int, **more: Any) -> Step:
    return Step(index, f"s{index}", ("true",), deps, None, state, **more)


def test_skipping_and_outcomes() -> None:
    graph = [(), (0,), (1,), (0,), ()]
    dependents = dependents_of(graph)
    states = {0: S.FAILED, 1: S.QUEUED, 2: S.QUEUED, 3: S.QUEUED, 4: S.QUEUED}
    assert sorted(dependents_closure(dependents, 0, states)) == [1, 2, 3]
    assert task_outcome([S.SUCCEEDED] * 3, cancel_requested=False) == "succeeded"
    assert task_outcome([S.SUCCEEDED, S.FAILED, S.SKIPPED], cancel_requested=False) == "failed"
    assert task_outcome([S.SUCCEEDED, S.CANCELLED], cancel_requested=False) == "failed"
    assert task_outcome([S.LOST, S.SKIPPED], cancel_requested=False) == "lost"
    assert task_outcome([S.SUCCEEDED], cancel_requested=True) == "cancelled"
    steps = [
        record(0, S.SUCCEEDED, exitcode=0, ended_at=1.0),
        record(1, S.FAILED, 0, exitcode=3, ended_at=2.0),
        record(2, S.SKIPPED, 1, ended_at=2.0),
        record(3, S.FAILED, termsig="KILL", ended_at=5.0),
    ]
    state, reason, exitcode, termsig = task_end(steps, cancel_requested=False)
    assert (state, exitcode, termsig) == (JobState.FAILED, 3, None)
    assert reason == "step 's1' failed (exit 3); 1 more did not succeed; 1 skipped"
    assert task_end(steps[:1], cancel_requested=False) == (JobState.SUCCEEDED, None, 0, None)
