"""Jobs: programs run through the broker on a client's behalf, recorded in SQLite
under a data dir, with their output in files beside it (SPEC §11).

Sans-IO: :mod:`.model` (the state machine, the record, ids), :mod:`.request`
(submit validation), :mod:`.steps` (multi-step tasks: the graph, the step rules),
:mod:`.progress` (progress lines), :mod:`.document` (a job's status as JSON).
I/O: :mod:`.store` (SQLite off the trio thread, :mod:`.store_threads`; statements
in :mod:`.queries`, :mod:`.task_queries`, :mod:`.recovery`, :mod:`.retention`,
:mod:`.listing`, :mod:`.events` and :mod:`.callbacks`, layout in :mod:`.schema`),
:mod:`.output` (output files and followers), :mod:`.runner` (the scheduler) with
:mod:`.execution` (a job's run to its end), :mod:`.task` and :mod:`.task_access`
(a task's steps) and :mod:`.session` (one broker session). Errors, one class per
HTTP answer: :mod:`.errors`.
"""

from __future__ import annotations

from .errors import (
    DataDirLocked,
    IllegalTransition,
    InvalidField,
    JobError,
    JobNotFound,
    QueueFull,
    SchemaError,
    StoreUnavailable,
)
from .listing import ListQuery, Page
from .model import LOST_REASON, Job, JobState, is_job_id
from .output import DEFAULT_CAP, Chunk, OutputReader, OutputStore, Truncated, View
from .progress import Progress, ProgressParser
from .request import SubmitLimits, SubmitRequest, parse_start_at, parse_submit
from .runner import Runner, RunnerConfig
from .steps import Step, StepState
from .store import Store, open_store

__all__ = [
    "DEFAULT_CAP",
    "LOST_REASON",
    "Chunk",
    "DataDirLocked",
    "IllegalTransition",
    "InvalidField",
    "Job",
    "JobError",
    "JobNotFound",
    "JobState",
    "ListQuery",
    "OutputReader",
    "OutputStore",
    "Page",
    "Progress",
    "ProgressParser",
    "QueueFull",
    "Runner",
    "RunnerConfig",
    "SchemaError",
    "Step",
    "StepState",
    "Store",
    "StoreUnavailable",
    "SubmitLimits",
    "SubmitRequest",
    "Truncated",
    "View",
    "is_job_id",
    "open_store",
    "parse_start_at",
    "parse_submit",
]
