"""The database layout and its migrations; opening a connection with our pragmas.

The schema version is SQLite's ``PRAGMA user_version``: ``MIGRATIONS[n]`` takes a
file from version ``n`` to ``n + 1``, each in one transaction together with the
version bump (SQLite's DDL is transactional), so a crash mid-upgrade leaves the file
at the old version, whole. A file newer than this code is refused, never downgraded.

Layout, and why:

- ``jobs``: one row per job; ``seq`` (the rowid) is internal and never leaves the
  store (ids are the public names). argv and labels are JSON text.
- ``job_labels``: (key, value, created_at, id) → seq (v2), so a label filter is an
  index range in creation order rather than a scan of JSON over the whole history.
- ``job_stdin``: a job's stdin until it ends (kept apart so the rows stay small).
- ``state_counts`` (v2): jobs per state, kept by triggers in the same transaction as
  the change, so totals are O(1) at any history size (a ``COUNT(*)`` over a million
  rows is a scan).
- ``job_steps``, ``step_stdin`` (v3): a task's steps, by (task row, index).
- ``job_events`` (v3): every change as a monitor message (:mod:`.events`).
- ``job_callbacks`` (v3): a job's callback and its delivery (:mod:`.callbacks`).
- Indexes serve each query the store makes: by id; each sort with its tiebreak on
  id (keyset pagination); state or name with created; partial indexes on the queued
  jobs (FIFO per name, global FIFO) and the scheduled ones (next start), which stay
  small whatever the history.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from .errors import SchemaError
from .model import JobState

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "connect", "migrate"]

_V1 = (
    """CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        argv TEXT NOT NULL,
        labels TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        start_at REAL,
        queued_at REAL,
        started_at REAL,
        ended_at REAL,
        timeout REAL,
        keep INTEGER NOT NULL,
        exitcode INTEGER,
        termsig TEXT,
        reason TEXT,
        stdout_bytes INTEGER NOT NULL DEFAULT 0,
        stderr_bytes INTEGER NOT NULL DEFAULT 0,
        dropped_bytes INTEGER NOT NULL DEFAULT 0,
        truncated INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE job_labels (
        key TEXT NOT NULL, value TEXT NOT NULL, seq INTEGER NOT NULL,
        PRIMARY KEY (key, value, seq)
    ) WITHOUT ROWID""",
    "CREATE INDEX job_labels_seq ON job_labels (seq)",
    "CREATE TABLE job_stdin (seq INTEGER PRIMARY KEY, data BLOB NOT NULL)",
    "CREATE INDEX jobs_created ON jobs (created_at, id)",
    "CREATE INDEX jobs_started ON jobs (started_at, id)",
    "CREATE INDEX jobs_ended ON jobs (ended_at, id)",
    "CREATE INDEX jobs_state_created ON jobs (state, created_at, id)",
    "CREATE INDEX jobs_name_created ON jobs (name, created_at, id)",
    "CREATE INDEX jobs_queued_fifo ON jobs (queued_at, seq) WHERE state = 'queued'",
    "CREATE INDEX jobs_queued_name ON jobs (name, queued_at, seq) WHERE state = 'queued'",
    "CREATE INDEX jobs_scheduled_due ON jobs (start_at) WHERE state = 'scheduled'",
    "CREATE INDEX jobs_scheduled_name ON jobs (name) WHERE state = 'scheduled'",
    """CREATE TRIGGER jobs_deleted AFTER DELETE ON jobs BEGIN
        DELETE FROM job_labels WHERE seq = old.seq;
        DELETE FROM job_stdin WHERE seq = old.seq;
    END""",
)

_STATES = ", ".join(f"('{state.value}', 0)" for state in JobState)

_V2 = (
    "ALTER TABLE jobs ADD COLUMN progress_task INTEGER",
    "ALTER TABLE jobs ADD COLUMN progress_tasks INTEGER",
    "ALTER TABLE jobs ADD COLUMN progress_title TEXT",
    "ALTER TABLE jobs ADD COLUMN progress_percent INTEGER",
    "ALTER TABLE jobs ADD COLUMN progress_step TEXT",
    "CREATE TABLE state_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID",
    f"INSERT INTO state_counts (state, n) VALUES {_STATES}",
    """UPDATE state_counts
        SET n = (SELECT COUNT(*) FROM jobs WHERE jobs.state = state_counts.state)""",
    """CREATE TRIGGER state_counts_insert AFTER INSERT ON jobs BEGIN
        UPDATE state_counts SET n = n + 1 WHERE state = new.state;
    END""",
    """CREATE TRIGGER state_counts_delete AFTER DELETE ON jobs BEGIN
        UPDATE state_counts SET n = n - 1 WHERE state = old.state;
    END""",
    """CREATE TRIGGER state_counts_update AFTER UPDATE OF state ON jobs
        WHEN old.state <> new.state BEGIN
        UPDATE state_counts SET n = n - 1 WHERE state = old.state;
        UPDATE state_counts SET n = n + 1 WHERE state = new.state;
    END""",
    # Labels carry the job's (created_at, id), so a label's newest page is one range
    # of this table's key (v1 looked every labelled job up, then sorted them all).
    "DROP TRIGGER jobs_deleted",
    """CREATE TABLE job_labels_v2 (
        key TEXT NOT NULL, value TEXT NOT NULL, created_at REAL NOT NULL,
        id TEXT NOT NULL, seq INTEGER NOT NULL,
        PRIMARY KEY (key, value, created_at, id)
    ) WITHOUT ROWID""",
    """INSERT INTO job_labels_v2 (key, value, created_at, id, seq)
        SELECT job_labels.key, job_labels.value, jobs.created_at, jobs.id, jobs.seq
        FROM job_labels JOIN jobs USING (seq)""",
    "DROP TABLE job_labels",
    "ALTER TABLE job_labels_v2 RENAME TO job_labels",
    "CREATE INDEX job_labels_seq ON job_labels (seq)",
    """CREATE TRIGGER jobs_deleted AFTER DELETE ON jobs BEGIN
        DELETE FROM job_labels WHERE seq = old.seq;
        DELETE FROM job_stdin WHERE seq = old.seq;
    END""",
    # A state filter sorted by start or end is one index range too.
    "CREATE INDEX jobs_state_started ON jobs (state, started_at, id)",
    "CREATE INDEX jobs_state_ended ON jobs (state, ended_at, id)",
)

_STEP_COLUMNS = """
        started_at REAL,
        ended_at REAL,
        exitcode INTEGER,
        termsig TEXT,
        reason TEXT,
        stdout_bytes INTEGER NOT NULL DEFAULT 0,
        stderr_bytes INTEGER NOT NULL DEFAULT 0,
        dropped_bytes INTEGER NOT NULL DEFAULT 0,
        truncated INTEGER NOT NULL DEFAULT 0,
        progress_task INTEGER,
        progress_tasks INTEGER,
        progress_title TEXT,
        progress_percent INTEGER,
        progress_step TEXT"""

_V3 = (
    # Tasks: a job with steps (mode NULL: one program, as before).
    "ALTER TABLE jobs ADD COLUMN mode TEXT",
    "ALTER TABLE jobs ADD COLUMN steps INTEGER NOT NULL DEFAULT 0",
    f"""CREATE TABLE job_steps (
        seq INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        name TEXT NOT NULL,
        argv TEXT NOT NULL,
        depends_on TEXT NOT NULL,
        timeout REAL,
        state TEXT NOT NULL,{_STEP_COLUMNS},
        PRIMARY KEY (seq, idx)
    ) WITHOUT ROWID""",
    """CREATE TABLE step_stdin (
        seq INTEGER NOT NULL, idx INTEGER NOT NULL, data BLOB NOT NULL,
        PRIMARY KEY (seq, idx)
    ) WITHOUT ROWID""",
    # Events: ids never reused (AUTOINCREMENT), so since=<id> means one place in
    # the history for ever; by time for retention, by name for a named monitor.
    """CREATE TABLE job_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        job_id TEXT NOT NULL,
        name TEXT NOT NULL,
        body TEXT NOT NULL
    )""",
    "CREATE INDEX job_events_at ON job_events (at)",
    "CREATE INDEX job_events_name ON job_events (name, id)",
    # Callbacks: keyed by the job's id, not its row, so a delivery still pending
    # outlives the job's deletion (keep=false, DELETE, a purge).
    """CREATE TABLE job_callbacks (
        job_id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        state TEXT NOT NULL,
        body BLOB,
        attempts TEXT NOT NULL DEFAULT '[]',
        next_at REAL,
        delivered_at REAL
    ) WITHOUT ROWID""",
    "CREATE INDEX job_callbacks_due ON job_callbacks (next_at) WHERE state = 'pending'",
    "DROP TRIGGER jobs_deleted",
    """CREATE TRIGGER jobs_deleted AFTER DELETE ON jobs BEGIN
        DELETE FROM job_labels WHERE seq = old.seq;
        DELETE FROM job_stdin WHERE seq = old.seq;
        DELETE FROM job_steps WHERE seq = old.seq;
        DELETE FROM step_stdin WHERE seq = old.seq;
        DELETE FROM job_callbacks WHERE job_id = old.id AND state <> 'pending';
    END""",
)

#: ``MIGRATIONS[n]`` upgrades version ``n`` to ``n + 1``: append, never edit.
MIGRATIONS: Sequence[tuple[str, ...]] = (_V1, _V2, _V3)
SCHEMA_VERSION = len(MIGRATIONS)

#: How long a connection waits for a lock before SQLITE_BUSY. Readers of a WAL file
#: do not wait for the writer; this covers the brief exclusive moments (recovery of
#: the WAL index after a crash, a checkpoint's reset).
BUSY_TIMEOUT_MS = 10_000


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with our settings: autocommit (we write ``BEGIN`` ourselves),
    usable from any one thread at a time, WAL, ``synchronous=FULL``.

    ``synchronous=FULL`` syncs the WAL at every commit: a commit that returned
    survives ``kill -9`` and a power cut (in WAL mode, NORMAL would survive only the
    former). Readers are ``query_only``: nothing but the writer path can write.
    """
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not readonly:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise SchemaError(f"{path}: cannot switch the database to WAL mode ({mode})")
        conn.execute("PRAGMA synchronous = FULL")
        # Bounded page cache per connection: memory independent of history size.
        conn.execute("PRAGMA cache_size = -16000")
        if readonly:
            conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection, path: Path, target: int = SCHEMA_VERSION) -> int:
    """Upgrade the file to ``target`` (default: the latest); returns the version it had.

    Error handling: :class:`SchemaError` for a file newer than this code or one with
    tables that are not ours; SQLite errors propagate with everything rolled back.
    """
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{path} has schema version {version}, newer than this sockexec_py "
            f"({SCHEMA_VERSION}): upgrade sockexec_py"
        )
    if version == 0:
        foreign = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if foreign:
            raise SchemaError(f"{path} is an SQLite database that sockexec_py did not create")
    for number in range(version, target):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[number]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return version
