"""The job state machine and the job record, sans-IO: no database, no clock, no broker.

Rules of the job state machine, all enforced here and nowhere else:

1. A job is born ``scheduled`` (its ``start_at`` is in the future) or ``queued``.
2. ``scheduled → queued`` when its time comes; ``queued → running`` when the runner
   gives it a broker session. ``running → queued`` only when the broker could not be
   reached, so the program never started (the job keeps its place in the queue), or
   for a task found running at start-up that still has steps to run (:mod:`.steps`).
3. ``running`` ends in exactly one of ``succeeded`` (exit 0), ``failed`` (non-zero
   exit, a signal, a refusal by the broker or its policy, a timeout), ``cancelled``
   (asked while running: whatever the exit pair says) or ``lost`` (the gateway died
   while it ran; found at the next start).
4. ``scheduled`` and ``queued`` jobs can be cancelled; they never start afterwards.
5. The five end states are final: no transition leaves them (cancelling a finished
   job is a conflict, not a no-op).
6. Every change goes through :func:`check_transition`; the store calls it inside the
   transaction that writes the change, so two racing changes cannot both win.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from sockexec_py.errors import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_REFUSED
from sockexec_py.events import Exited

from .errors import IllegalTransition
from .progress import Progress

__all__ = [
    "END_STATES",
    "INITIAL_STATES",
    "LOST_REASON",
    "TRANSITIONS",
    "WAITING_STATES",
    "Job",
    "JobState",
    "check_transition",
    "elapsed",
    "final_state",
    "is_job_id",
    "new_job_id",
    "refusal_reason",
]


class JobState(enum.StrEnum):
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"


S = JobState
INITIAL_STATES: frozenset[JobState] = frozenset({S.SCHEDULED, S.QUEUED})
WAITING_STATES: frozenset[JobState] = frozenset({S.SCHEDULED, S.QUEUED})
END_STATES: frozenset[JobState] = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.LOST})

#: Every allowed change, and nothing else (rules 2 to 5).
TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    S.SCHEDULED: frozenset({S.QUEUED, S.CANCELLED}),
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.LOST, S.QUEUED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.LOST: frozenset(),
}


def check_transition(job_id: str, current: JobState, wanted: JobState) -> None:
    """Raise :class:`IllegalTransition` unless ``current → wanted`` is in the table."""
    if wanted not in TRANSITIONS[current]:
        raise IllegalTransition(job_id, current.value, wanted.value)


#: The reason recorded on jobs found ``running`` at startup (rule 3).
LOST_REASON = (
    "lost: the gateway stopped while it ran; the broker terminated the program "
    "when the session dropped"
)
CANCELLED_WAITING_REASON = "cancelled before it started"
CANCELLED_RUNNING_REASON = "cancelled while running; the broker terminated the program"


def cancelled_unconfirmed_reason(grace: float) -> str:
    return (
        f"cancelled while running; the broker did not report the end within {grace:g} s, "
        "so the session was closed (the broker terminates the program then; its "
        "termsig is unknown)"
    )


def timeout_reason(timeout: float) -> str:
    return f"timed out after {timeout:g} s; the broker terminated the program"


def broken_session_reason(detail: str) -> str:
    return f"the broker session failed: {detail}"


_REFUSAL_PREFIX = b"sockexec_py: "
_REFUSAL_CODES = frozenset({EXIT_REFUSED, EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND})
#: The longest refusal line kept; the broker's lines are far shorter.
MAX_REASON_BYTES = 1024


def refusal_reason(exitcode: int | None, stderr_head: bytes) -> str | None:
    """The broker's one-line refusal, when the job was refused in-band.

    The broker reports refusals (SPEC §4) as a first ``stderr`` line
    ``sockexec_py: <reason>`` followed by exit code 125, 126 or 127. ``stderr_head``
    is the start of the job's stderr; returns that line without its newline, or
    ``None`` when this was not a refusal.
    """
    if exitcode not in _REFUSAL_CODES or not stderr_head.startswith(_REFUSAL_PREFIX):
        return None
    line = stderr_head[:MAX_REASON_BYTES].split(b"\n", 1)[0]
    return line.decode("utf-8", "replace")


def final_state(exited: Exited | None, *, cancel_requested: bool) -> JobState:
    """How a run ends (rule 3). ``exited`` is ``None`` when the session was closed
    before the exit pair came (cancel, timeout, broken session)."""
    if cancel_requested:
        return S.CANCELLED
    if exited is not None and exited.exitcode == 0:
        return S.SUCCEEDED
    return S.FAILED


# Crockford's base32: no I, L, O, U, so an id read aloud or retyped stays unambiguous.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_SET = frozenset(_CROCKFORD)
JOB_ID_LENGTH = 26


def new_job_id(now: float) -> str:
    """A fresh job id: 48 bits of milliseconds since the epoch, then 80 random bits.

    Why this shape: a counter restarts from zero when the database is recreated and
    tells anyone how many jobs ran; 80 bits from :mod:`secrets` are unguessable, so
    knowing one id says nothing about another, and collisions within one millisecond
    are out of reach (2**40 ids in a millisecond before a 50% chance). The time prefix
    makes ids sort by creation and keeps index inserts at the right-hand end of the
    B-tree. 128 bits in Crockford base32 are 26 characters (ULID's layout).
    """
    millis = int(now * 1000)
    if not 0 <= millis < 1 << 48:
        raise ValueError(f"time {now!r} is outside the id's 48-bit range")
    value = (millis << 80) | secrets.randbits(80)
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def is_job_id(text: str) -> bool:
    """True when ``text`` has the shape of an id (a cheap 404 before the database)."""
    return len(text) == JOB_ID_LENGTH and text[0] in "01234567" and _CROCKFORD_SET.issuperset(text)


def elapsed(started_at: float | None, ended_at: float | None) -> float | None:
    """A job's or a step's duration: seconds from start to end (``None`` if it did
    not run to an end; never negative, should the wall clock step back)."""
    if started_at is None or ended_at is None:
        return None
    return max(0.0, ended_at - started_at)


@dataclass(frozen=True, slots=True)
class Job:
    """One job as recorded. Times are Unix seconds (float), ``None`` until they happen.

    ``argv`` is a tuple so the record stays immutable (the HTTP layer sends a list).
    ``stdout_bytes``/``stderr_bytes`` count the stored output; ``dropped_bytes`` what
    came after the per-job cap (``truncated`` is then true). ``reason`` is one line:
    the broker's refusal, the timeout, the cancellation or why the job was lost.
    """

    id: str
    name: str
    argv: tuple[str, ...]
    labels: Mapping[str, str]
    state: JobState
    created_at: float
    start_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    timeout: float | None = None
    keep: bool = True
    exitcode: int | None = None
    termsig: str | None = None
    reason: str | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    dropped_bytes: int = 0
    truncated: bool = False
    progress: Progress = field(default_factory=Progress)
    #: A task's mode (:mod:`.steps`), ``None`` for a job of one program.
    mode: str | None = None
    #: How many steps a task has (0 for a job of one program).
    steps: int = 0

    @property
    def is_task(self) -> bool:
        return self.mode is not None

    @property
    def finished(self) -> bool:
        return self.state in END_STATES

    @property
    def duration(self) -> float | None:
        """Seconds from start to end (``None`` if it did not run to an end)."""
        return elapsed(self.started_at, self.ended_at)
