"""What a monitor may ask for (``/v1/monitor``'s query string) and how the route
is written in the OpenAPI document; the endpoint itself is :mod:`.monitor`'s.
Pure parsing: no I/O, no state."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sockexec_py.jobs.events import EVENT_TYPES

from .models import websocket_refusals
from .request import HTTPError

__all__ = ["MONITOR_PATH", "MonitorQuery", "parse_query"]

_NAME = re.compile(r"[A-Za-z0-9._:@+/-]{1,128}")

#: The WebSocket route in the OpenAPI document (written by hand, as /v1/exec/ws).
MONITOR_PATH: dict[str, Any] = {
    "get": {
        "summary": "Job events as they happen (WebSocket)",
        "description": "Upgrade to a WebSocket. With since=ID, the kept events after that "
        'id come first ({"type": "gap", "since", "first_id"} before them if some were '
        'purged), then {"type": "ready", "last_id"}, then events live, one JSON text '
        'message each: {"id", "type": "scheduled"|"queued"|"started"|"progress"|"finished", '
        '"job", "name", "time", "step"?, "state"?, "progress"?, "exitcode"?, "termsig"?, '
        '"duration"?, "reason"?} (finished: with the last progress). A monitor that falls '
        '--monitor-queue events behind gets {"type": "overflow", "last_id"} and a close '
        "(1013): reconnect with since=last_id. "
        "Needs the monitor scope; shows the names the token has status on.",
        "parameters": [
            {
                "name": "name",
                "in": "query",
                "required": False,
                "description": "Only this job name's events (empty: every name)",
                "schema": {"type": "string"},
            },
            {
                "name": "since",
                "in": "query",
                "required": False,
                "description": "Replay the events after this event id first",
                "schema": {"type": "integer", "minimum": 0},
            },
            {
                "name": "types",
                "in": "query",
                "required": False,
                "description": "Only these event types, comma-separated (empty: all)",
                "schema": {"type": "string", "example": "finished"},
            },
            {
                "name": "batch",
                "in": "query",
                "required": False,
                "description": "1: every message is a JSON array of one or more of the "
                "messages above, in order (what queued up while the previous one was sent)",
                "schema": {"type": "integer", "enum": [0, 1]},
            },
        ],
        "responses": {
            "101": {"description": "Switching protocols: events follow"},
            **websocket_refusals(
                (400, "A bad name, since, types or batch"),
                (401, "Missing, wrong or expired bearer token"),
                (403, "An Origin header, or the token lacks monitor or status"),
                (404, "Jobs are off (no --data-dir)"),
                (421, "Without tokens, the Host must be a loopback name"),
            ),
        },
    }
}


@dataclass(frozen=True, slots=True)
class MonitorQuery:
    """What a monitor asked for: a name (None: all), ``since``, event ``types``
    (None: all) and ``batch`` (arrays of messages instead of one each)."""

    name: str | None = None
    since: int | None = None
    types: frozenset[str] | None = None
    batch: bool = False


def parse_query(params: Mapping[str, str]) -> MonitorQuery:
    """The query string's options; :class:`HTTPError` 400 naming a bad one."""
    unknown = set(params) - {"name", "since", "types", "batch"}
    if unknown:
        raise HTTPError(400, "bad_request", f"unknown parameter: {sorted(unknown)[0]}")
    name = params.get("name") or None
    if name is not None and _NAME.fullmatch(name) is None:
        raise HTTPError(400, "bad_request", "name: not a job name")
    since_text = params.get("since")
    since = None
    if since_text is not None:
        if not (since_text.isascii() and since_text.isdigit()) or len(since_text) > 18:
            raise HTTPError(400, "bad_request", "since: expected an event id (an integer)")
        since = int(since_text)
    types = None
    if types_text := params.get("types"):
        types = frozenset(types_text.split(","))
        if not types <= EVENT_TYPES:
            wrong = sorted(types - EVENT_TYPES)[0]
            known = ", ".join(sorted(EVENT_TYPES))
            raise HTTPError(400, "bad_request", f"types: {wrong[:40]!r} is not one of {known}")
    batch = params.get("batch", "0")
    if batch not in ("0", "1"):
        raise HTTPError(400, "bad_request", "batch: expected 0 or 1")
    return MonitorQuery(name, since, types, batch == "1")
