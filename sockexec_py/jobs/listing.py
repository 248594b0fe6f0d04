"""Listing jobs: filters, sorts and keyset pagination with an opaque cursor.

Why keyset: an ``OFFSET`` page costs the rows it skips (slow deep in a million-row
history) and shifts when jobs are inserted; a page that continues after the last
row's (sort time, id) is an index range scan, and a job inserted meanwhile never
makes a later page repeat or skip another. The cursor carries the sort, the
direction and that last (time, id), base64url-encoded JSON: opaque to clients, and
refused (400, field ``cursor``) when it does not belong to the listing asked.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .errors import InvalidField
from .model import END_STATES, WAITING_STATES, Job, JobState
from .queries import COLUMNS, job_from_row

__all__ = ["MAX_PAGE", "ListQuery", "Page", "SortKey", "list_jobs"]

SortKey = Literal["created", "started", "ended"]
_SORT_COLUMNS: Mapping[str, str] = {
    "created": "created_at",
    "started": "started_at",
    "ended": "ended_at",
}
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class ListQuery:
    """A page of the job list: filters (all optional, combined with AND), the sort
    and the page. ``created_from`` ≤ created < ``created_to``. Sorting by ``started``
    or ``ended`` lists only the jobs that have that time. ``cursor`` is the
    ``next_cursor`` of the previous page of the same listing."""

    states: frozenset[JobState] | None = None
    name: str | None = None
    labels: Mapping[str, str] | None = None
    created_from: float | None = None
    created_to: float | None = None
    sort: SortKey = "created"
    descending: bool = True
    limit: int = 50
    cursor: str | None = None
    #: Only jobs whose name is one of these or starts with one of ``only_prefixes``
    #: (a scoped token's names); ``None``: every name.
    only_names: frozenset[str] | None = None
    only_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Page:
    jobs: list[Job]
    next_cursor: str | None


def encode_cursor(query: ListQuery, value: float, job_id: str) -> str:
    """Opaque to clients: the sort, its direction and the last row's (value, id)."""
    raw = json.dumps([query.sort, query.descending, value, job_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(query: ListQuery, cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        sort, descending, value, job_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidField("cursor", "not a cursor returned by this listing") from None
    if (
        sort != query.sort
        or descending is not query.descending
        or not isinstance(value, int | float)
        or isinstance(value, bool)
        or not isinstance(job_id, str)
    ):
        raise InvalidField("cursor", "not a cursor of this sort and order")
    return float(value), job_id


def _never_matches(query: ListQuery) -> bool:
    """Sorting by start (end) lists jobs that have one: none of these states do."""
    if not query.states:
        return False
    if query.sort == "ended":
        return not query.states & END_STATES
    return query.sort == "started" and query.states <= WAITING_STATES


def list_jobs(conn: sqlite3.Connection, query: ListQuery) -> Page:
    """One page, in a keyset order on (sort time, id): stable under inserts (a page
    never repeats or skips a job because others were added).

    Fast paths (one index range, whatever the history): no filter, a state filter
    or a name filter sorted by creation, a label filter (first label drives, through
    ``job_labels``' key) sorted by creation, and no filter or a state filter sorted
    by start or end. Other combinations filter rows along one of those ranges.
    """
    if not 1 <= query.limit <= MAX_PAGE:
        raise InvalidField("limit", f"expected 1 to {MAX_PAGE}")
    if _never_matches(query):
        return Page([], None)
    labels = sorted((query.labels or {}).items())
    # The table whose (time, id) columns drive the order: the first label's rows
    # carry the job's creation time, so they can.
    by_label = bool(labels) and query.sort == "created"
    key = "l" if by_label else "jobs"
    column = f"{key}.{_SORT_COLUMNS[query.sort]}"
    source = "jobs"
    where: list[str] = []
    params: list[object] = []
    if by_label:
        source = "job_labels AS l JOIN jobs ON jobs.seq = l.seq"
        where.append("l.key = ? AND l.value = ?")
        params.extend(labels.pop(0))
    if query.sort != "created":
        where.append(f"{column} IS NOT NULL")
    if query.states:
        where.append(f"jobs.state IN ({', '.join('?' * len(query.states))})")
        params.extend(sorted(state.value for state in query.states))
    if query.name is not None:
        where.append("jobs.name = ?")
        params.append(query.name)
    if query.only_names is not None:
        allowed = [f"jobs.name IN ({', '.join('?' * len(query.only_names))})"]
        params.extend(sorted(query.only_names))
        for prefix in query.only_prefixes:
            allowed.append("substr(jobs.name, 1, ?) = ?")
            params.extend((len(prefix), prefix))
        where.append(f"({' OR '.join(allowed)})")
    for label in labels:
        where.append("jobs.seq IN (SELECT seq FROM job_labels WHERE key = ? AND value = ?)")
        params.extend(label)
    if query.created_from is not None:
        where.append(f"{key}.created_at >= ?")
        params.append(query.created_from)
    if query.created_to is not None:
        where.append(f"{key}.created_at < ?")
        params.append(query.created_to)
    if query.cursor is not None:
        where.append(f"({column}, {key}.id) {'<' if query.descending else '>'} (?, ?)")
        params.extend(decode_cursor(query, query.cursor))
    direction = "DESC" if query.descending else "ASC"
    sql = (
        f"SELECT {COLUMNS} FROM {source} {'WHERE ' + ' AND '.join(where) if where else ''}"
        f" ORDER BY {column} {direction}, {key}.id {direction} LIMIT ?"
    )
    rows = conn.execute(sql, (*params, query.limit + 1)).fetchall()
    jobs = [job_from_row(row) for row in rows[: query.limit]]
    next_cursor = None
    if len(rows) > query.limit:
        last = jobs[-1]
        times = {"created": last.created_at, "started": last.started_at, "ended": last.ended_at}
        sort_value = times[query.sort]
        assert sort_value is not None
        next_cursor = encode_cursor(query, sort_value, last.id)
    return Page(jobs, next_cursor)
