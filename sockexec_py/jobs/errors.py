"""Errors of the jobs layer, one class per reaction of its callers.

The HTTP layer maps them one to one: :class:`InvalidField` → 400 naming the field,
:class:`JobNotFound` → 404, :class:`IllegalTransition` → 409 (cancelling or deleting
a job in the wrong state), :class:`QueueFull` → 429, :class:`StoreUnavailable` → 503
with its one line. :class:`DataDirLocked` and :class:`SchemaError` are startup errors:
the gateway prints the line and exits. Every message is one line fit to show a user.
"""

from __future__ import annotations

from sockexec_py.errors import SockexecError


class JobError(SockexecError):
    """Base class of the jobs layer's errors."""


class InvalidField(JobError, ValueError):
    """A submitted value is malformed or out of bounds: ``field`` names it (dotted for
    nested values, ``labels.team``), ``detail`` says what is wrong."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


class JobNotFound(JobError, LookupError):
    """No job has this id (never had, or it was deleted or purged)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}")
        self.job_id = job_id


class IllegalTransition(JobError):
    """A job cannot go from its state to the one asked: cancelling a finished job,
    deleting a running one, or (a bug) the runner driving a job wrongly."""

    def __init__(self, job_id: str, current: str, wanted: str) -> None:
        super().__init__(f"job {job_id} is {current}: it cannot become {wanted}")
        self.job_id = job_id
        self.current = current
        self.wanted = wanted


class QueueFull(JobError):
    """The name's queue already holds its maximum of waiting (queued or scheduled)
    jobs; the submit was refused and nothing was written."""

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(f"the queue of {name!r} is full ({limit} jobs waiting)")
        self.name = name
        self.limit = limit


class StoreUnavailable(JobError):
    """The data dir cannot take the write (disk full, read-only, I/O error, unwritable
    directory). The operation was rolled back: nothing of it is half-written."""


class DataDirLocked(JobError):
    """Another process (another gateway) holds the data dir."""


class SchemaError(JobError):
    """The database file was written by a newer version, or is not ours."""
