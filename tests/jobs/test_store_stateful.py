"""The store's queries against a plain Python model (hypothesis stateful): after any
sequence of submits, claims, requeues, scheduled starts, cancels, ends, deletes,
purges and restarts, the O(1) counts per state equal both the model and a full
count, and queue positions follow FIFO per name."""

from __future__ import annotations

import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sockexec_py.jobs import queries, recovery, retention
from sockexec_py.jobs.errors import IllegalTransition, QueueFull
from sockexec_py.jobs.listing import ListQuery, list_jobs
from sockexec_py.jobs.model import END_STATES, WAITING_STATES, Job, JobState, new_job_id
from sockexec_py.jobs.request import parse_submit
from sockexec_py.jobs.schema import connect, migrate

S = JobState
T = TypeVar("T")
NAMES = st.sampled_from(["a", "b", "c"])
MAX_WAITING = 4


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "jobs.db"
        self.conn = connect(self.path)
        migrate(self.conn, self.path)
        self.now = 1_800_000_000.0
        # The model: id -> (name, state, start_at, queue key)
        self.jobs: dict[str, dict[str, object]] = {}
        self.order = 0

    def teardown(self) -> None:
        self.conn.close()
        self.dir.cleanup()

    def tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """One transaction, as the writer runs it: all or nothing."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(self.conn)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return result

    def ids(self, states: frozenset[JobState] | set[JobState]) -> list[str]:
        return sorted(i for i, job in self.jobs.items() if job["state"] in states)

    @rule(name=NAMES, delay=st.sampled_from([None, 0, 5, 50]))
    def submit(self, name: str, delay: float | None) -> None:
        self.now += 1
        body: dict[str, object] = {"argv": ["true"], "name": name, "labels": {"n": name}}
        if delay is not None:
            body["start_at"] = self.now + delay
        request = parse_submit(body)
        waiting = sum(
            1
            for job in self.jobs.values()
            if job["name"] == name and job["state"] in WAITING_STATES
        )
        job_id = new_job_id(self.now)
        try:
            job = self.tx(lambda c: queries.insert_job(c, job_id, request, self.now, MAX_WAITING))
        except QueueFull:
            assert waiting >= MAX_WAITING
            return
        assert waiting < MAX_WAITING
        self.order += 1
        state = S.SCHEDULED if delay else S.QUEUED
        assert job.state is state
        self.jobs[job_id] = {
            "name": name,
            "state": state,
            "start_at": request.start_at,
            "seq": self.order,  # the insertion order: the tiebreak of equal queue times
            "key": (self.now, self.order) if state is S.QUEUED else None,
        }

    @rule(slots=st.integers(1, 5))
    def claim(self, slots: int) -> None:
        running = Counter(str(j["name"]) for j in self.jobs.values() if j["state"] is S.RUNNING)
        claimed = self.tx(lambda c: queries.claim(c, self.now, slots, running, {"c": 2}, 1))
        # The model: oldest queued first, within limits.
        expected: list[str] = []
        queued = sorted(self.ids({S.QUEUED}), key=lambda i: self.jobs[i]["key"])  # type: ignore[arg-type, return-value]
        for job_id in queued:
            name = str(self.jobs[job_id]["name"])
            if len(expected) < slots and running[name] < (2 if name == "c" else 1):
                running[name] += 1
                expected.append(job_id)
        assert [job.id for job in claimed] == expected
        for job_id in expected:
            self.jobs[job_id]["state"] = S.RUNNING

    @precondition(lambda self: self.ids({S.RUNNING}))
    @rule(data=st.data())
    def requeue(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.ids({S.RUNNING})))
        self.tx(lambda c: queries.requeue(c, job_id))
        self.jobs[job_id]["state"] = S.QUEUED

    @rule(step=st.sampled_from([1, 10, 100]))
    def time_passes(self, step: float) -> None:
        self.now += step
        promoted = self.tx(lambda c: queries.promote_due(c, self.now))
        due = [
            i
            for i in self.ids({S.SCHEDULED})
            if float(self.jobs[i]["start_at"]) <= self.now  # type: ignore[arg-type]
        ]
        assert sorted(promoted) == due
        for job_id in due:
            job = self.jobs[job_id]
            job["state"] = S.QUEUED
            job["key"] = (job["start_at"], job["seq"])

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        if not self.jobs:
            return
        job_id = data.draw(st.sampled_from(sorted(self.jobs)))
        state = self.jobs[job_id]["state"]
        try:
            self.tx(lambda c: queries.cancel_waiting(c, job_id, self.now, "x"))
        except IllegalTransition:
            assert state not in WAITING_STATES
        else:
            assert state in WAITING_STATES
            self.jobs[job_id]["state"] = S.CANCELLED

    @precondition(lambda self: self.ids({S.RUNNING}))
    @rule(
        data=st.data(),
        end=st.sampled_from([S.SUCCEEDED, S.FAILED, S.CANCELLED]),
        keep=st.booleans(),
    )
    def finish(self, data: st.DataObject, end: JobState, keep: bool) -> None:
        job_id = data.draw(st.sampled_from(self.ids({S.RUNNING})))
        job = queries.get_job(self.conn, job_id)
        self.tx(
            lambda c: queries.finish(c, replace(job, state=end, ended_at=self.now), remove=not keep)
        )
        if keep:
            self.jobs[job_id]["state"] = end
        else:
            del self.jobs[job_id]

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        if not self.jobs:
            return
        job_id = data.draw(st.sampled_from(sorted(self.jobs)))
        state = self.jobs[job_id]["state"]
        try:
            self.tx(lambda c: retention.delete_job(c, job_id))
        except IllegalTransition:
            assert state not in END_STATES
        else:
            del self.jobs[job_id]

    @rule(keep_max=st.integers(0, 5))
    def purge(self, keep_max: int) -> None:
        deleted = self.tx(lambda c: retention.purge(c, None, keep_max, 2))
        finished = self.ids(END_STATES)
        assert len(deleted) == min(2, max(0, len(finished) - keep_max))
        for job_id in deleted:
            assert self.jobs.pop(job_id)["state"] in END_STATES

    @rule()
    def restart(self) -> None:
        lost = self.tx(lambda c: recovery.mark_lost(c, self.now, "lost"))
        assert sorted(lost) == self.ids({S.RUNNING})
        for job_id in lost:
            self.jobs[job_id]["state"] = S.LOST

    @rule(name=NAMES, sort=st.sampled_from(["created", "ended"]), descending=st.booleans())
    def list_by_label(self, name: str, sort: str, descending: bool) -> None:
        """Paging through one label (the v2 label index drives) gives the model's
        jobs, once each, in (time, id) order."""
        query = ListQuery(labels={"n": name}, sort=sort, descending=descending, limit=3)  # type: ignore[arg-type]
        listed: list[Job] = []
        while True:
            page = list_jobs(self.conn, query)
            listed.extend(page.jobs)
            if page.next_cursor is None:
                break
            query = replace(query, cursor=page.next_cursor)
        expected = {
            i
            for i, job in self.jobs.items()
            if job["name"] == name and (sort == "created" or job["state"] in END_STATES)
        }
        assert {job.id for job in listed} == expected and len(listed) == len(expected)
        keys = [(job.created_at if sort == "created" else job.ended_at, job.id) for job in listed]
        assert keys == sorted(keys, reverse=descending)  # type: ignore[type-var]

    @invariant()
    def counts_agree(self) -> None:
        model = Counter(job["state"] for job in self.jobs.values())
        counts = queries.state_counts(self.conn)
        full = dict(self.conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        for state in S:
            assert counts[state] == model[state] == full.get(state.value, 0), state

    @invariant()
    def positions_are_fifo_per_name(self) -> None:
        for name in "abc":
            queued = [i for i in self.ids({S.QUEUED}) if self.jobs[i]["name"] == name]
            queued.sort(key=lambda i: self.jobs[i]["key"])  # type: ignore[arg-type, return-value]
            assert [queries.queue_position(self.conn, i) for i in queued] == list(
                range(len(queued))
            )
        lengths = queries.queue_lengths(self.conn)
        assert sum(lengths.values()) == len(self.ids({S.QUEUED}))


TestStore = StoreMachine.TestCase
TestStore.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
