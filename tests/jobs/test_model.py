"""The job state machine (every pair of states against the table), ids and the
rules of how a run ends."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockexec_py.events import Exited
from sockexec_py.jobs.errors import IllegalTransition
from sockexec_py.jobs.model import (
    END_STATES,
    INITIAL_STATES,
    TRANSITIONS,
    JobState,
    check_transition,
    final_state,
    is_job_id,
    new_job_id,
    refusal_reason,
)

S = JobState
ALLOWED = {
    (S.SCHEDULED, S.QUEUED),
    (S.SCHEDULED, S.CANCELLED),
    (S.QUEUED, S.RUNNING),
    (S.QUEUED, S.CANCELLED),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.LOST),
    (S.RUNNING, S.QUEUED),
}


@pytest.mark.parametrize(("current", "wanted"), list(itertools.product(S, S)))
def test_every_pair_of_states(current: JobState, wanted: JobState) -> None:
    if (current, wanted) in ALLOWED:
        check_transition("J", current, wanted)
    else:
        with pytest.raises(IllegalTransition) as info:
            check_transition("J", current, wanted)
        assert info.value.current == current.value and info.value.wanted == wanted.value
        assert "\n" not in str(info.value)


def test_shape_of_the_table() -> None:
    assert set(TRANSITIONS) == set(S)
    assert all(not TRANSITIONS[state] for state in END_STATES)
    # Nothing returns to scheduled; every state is reachable from a birth state.
    assert all(S.SCHEDULED not in targets for targets in TRANSITIONS.values())
    reached, frontier = set(INITIAL_STATES), list(INITIAL_STATES)
    while frontier:
        for target in TRANSITIONS[frontier.pop()]:
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(S)


@given(st.lists(st.sampled_from(list(S)), max_size=12), st.sampled_from(sorted(INITIAL_STATES)))
def test_random_walks_follow_the_table(path: list[JobState], start: JobState) -> None:
    """Any sequence of requested changes: the legal ones are applied, the others
    refused, and an end state is never left."""
    state = start
    for wanted in path:
        try:
            check_transition("J", state, wanted)
        except IllegalTransition:
            assert (state, wanted) not in ALLOWED
        else:
            assert state not in END_STATES
            state = wanted


def test_ids_are_unique_sortable_crockford() -> None:
    ids = [new_job_id(1_800_000_000.0 + i / 1000) for i in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # one per millisecond: creation order
    assert all(re.fullmatch(r"[0-7][0-9A-HJKMNP-TV-Z]{25}", job_id) for job_id in ids)
    assert all(is_job_id(job_id) for job_id in ids)
    same_ms = {new_job_id(1_800_000_000.0) for _ in range(1000)}
    assert len(same_ms) == 1000
    assert len({job_id[10:] for job_id in same_ms}) == 1000  # the random part differs
    assert not is_job_id("01ARZ3NDEKTSV4RRFFQ69G5FAI")  # I is not Crockford
    assert not is_job_id("8" + "0" * 25)  # above 128 bits
    with pytest.raises(ValueError):
        new_job_id(-1)


def test_final_state_rules() -> None:
    assert final_state(Exited(exitcode=0), cancel_requested=False) is S.SUCCEEDED
    assert final_state(Exited(exitcode=3), cancel_requested=False) is S.FAILED
    assert final_state(Exited(termsig="KILL"), cancel_requested=False) is S.FAILED
    assert final_state(None, cancel_requested=False) is S.FAILED
    assert final_state(Exited(termsig="TERM"), cancel_requested=True) is S.CANCELLED
    assert final_state(Exited(exitcode=0), cancel_requested=True) is S.CANCELLED
    assert final_state(None, cancel_requested=True) is S.CANCELLED


def test_refusal_reason() -> None:
    line = b"sockexec_py: nope: program not found\n"
    assert refusal_reason(127, line + b"more") == "sockexec_py: nope: program not found"
    assert refusal_reason(126, line) is not None and refusal_reason(125, line) is not None
    assert refusal_reason(1, line) is None  # not a refusal code
    assert refusal_reason(127, b"sh: nope: not found\n") is None  # the program's own 127
    assert len(refusal_reason(125, b"sockexec_py: " + b"x" * 5000) or "") == 1024
