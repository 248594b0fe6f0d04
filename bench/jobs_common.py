"""What the jobs benchmarks share: keep-alive HTTP clients on threads, the rows of
their tables and how a table is printed; submits at a steady rate and the wait for
their ends (issue 16's benchmarks)."""

from __future__ import annotations

import functools
import http.client
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

CLIENTS = 4
WINDOW = 32
JSON = {"Content-Type": "application/json"}


@dataclass
class Row:
    name: str
    value: str
    target: str = ""
    met: bool | None = None


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Client:
    """One keep-alive connection to the gateway (reconnects when it is dropped)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        payload = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=payload, headers=JSON if body else {})
                response = self.conn.getresponse()
                data = response.read()
                return response.status, json.loads(data) if data else None
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


def run_threads(count: int, work: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            work(index)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def report(rows: list[Row], figures: dict[str, Any], json_path: Path | None) -> int:
    """Print the table, write the figures to ``json_path`` if given; the exit
    status: 1 when a target was missed."""
    print(render(rows))
    if json_path is not None:
        json_path.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if all(row.met is not False for row in rows) else 1


def render(rows: Sequence[Row]) -> str:
    header = ("measure", "value", "target", "")
    table = [header] + [
        (
            row.name,
            row.value,
            row.target,
            "" if row.met is None else ("met" if row.met else "MISSED"),
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in table) for column in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )


# -- issue 16: jobs at a steady rate ------------------------------------------------

SUBMITTERS = 4


@functools.lru_cache(maxsize=4096)  # a thousand monitors read the same stamps
def stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def submit_at_rate(port: int, rate: float, seconds: float, body: dict[str, Any]) -> list[str]:
    """Submit ``body`` ``rate`` times a second for ``seconds`` from a few threads."""
    total = int(rate * seconds)
    ids: list[str] = []
    lock = threading.Lock()
    start = time.monotonic() + 0.2

    def submitter(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        payload = json.dumps(body).encode()
        for n in range(offset, total, SUBMITTERS):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                conn.request("POST", "/v1/jobs", body=payload, headers=JSON)
                response = conn.getresponse()
                answer = json.loads(response.read())
            except OSError:  # an overloaded gateway: counted, not fatal
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            if response.status != 202:
                raise RuntimeError(f"submit: {response.status} {answer}")
            with lock:
                ids.append(answer["id"])
        conn.close()

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(SUBMITTERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ids


def all_ended(port: int, count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", "/v1/jobs?limit=1")
            totals = json.loads(conn.getresponse().read())["totals"]
        except OSError:
            continue
        finally:
            conn.close()
        if sum(totals[state] for state in ("succeeded", "failed", "cancelled", "lost")) >= count:
            return True
        time.sleep(0.1)
    return False


def row(key: str, name: str, value: str, target: str, met: bool | None) -> dict[str, Any]:
    return {"key": key, "name": name, "value": value, "target": target, "met": met}
