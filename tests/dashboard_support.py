"""Shared by the dashboard's tests: a policy with named commands, a job history
written straight into the store's schema, and a cookie-keeping HTTP client."""

from __future__ import annotations

import http.client
import json
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sockexec_py.jobs.model import new_job_id
from sockexec_py.jobs.schema import connect, migrate
from sockexec_py.jobs.store import DATABASE

TOKEN = "dashboard-test-token"
POLICY = r"""
[[allow]]
program = "sh"

[[allow]]
program = "sleep"

[[allow]]
program = "echo"

[[allow]]
program = "printf"

[[allow]]
program = "head"

[[allow]]
program = "true"

# Prints a line, waits for a line on the FIFO @@1, and so on: the tests say when
# it goes on, so nothing depends on timing. A read that finds only the end of the
# previous writer (its close came after this open) waits again.
[[command]]
name = "talk"
argv = [
    "/bin/sh", "-c",
    '''echo "[1/3] start $2"; printf '\033[31mred\033[0m plain\n';
    until read x < "$1"; do :; done; echo "[2/3] middle";
    until read x < "$1"; do :; done; echo "[3/3] end"''',
    "talk", "@@1", "@@2",
]
params_regex = ['/[\w./-]+', '[A-Za-z]{1,20}']

[[command]]
name = "hello"
argv = ["/bin/echo", "hello", "@@1"]
params_regex = ['[a-z]+']
"""


def write_files(directory: Path) -> tuple[Path, Path]:
    """The policy and the token file; returns their paths."""
    policy = directory / "policy.toml"
    policy.write_text(POLICY)
    tokens = directory / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    return policy, tokens


def build_history(data_dir: Path, count: int, name: str = "bulk") -> None:
    """``count`` finished jobs of ``name``, one a second until a minute ago, written
    with the store's own schema and migrations (before the gateway opens it)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / DATABASE
    conn = connect(path)
    try:
        migrate(conn, path)
        start = time.time() - 60 - count
        rows = []
        for index in range(count):
            created = start + index
            rows.append(
                (
                    new_job_id(created),
                    name,
                    json.dumps([name, str(index)]),
                    created,
                    created,
                    created + 0.5,
                )
            )
        conn.execute("BEGIN")
        conn.executemany(
            """INSERT INTO jobs (id, name, argv, labels, state, created_at, queued_at,
                started_at, ended_at, keep, exitcode) VALUES (?, ?, ?, '{}', 'succeeded',
                ?, ?, ?, ?, 1, 0)""",
            [(i, n, a, c, q, s, s + 0.25) for i, n, a, c, q, s in rows],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


class Browserless:
    """An HTTP client keeping the gateway's cookies, for the dashboard's rules."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}

    def request(
        self,
        method: str,
        path: str,
        *,
        form: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        cookies: bool = True,
    ) -> tuple[int, http.client.HTTPMessage, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = dict(headers or {})
        if cookies and self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urlencode(form, doseq=True)
            sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
        finally:
            conn.close()
        for value in response.headers.get_all("set-cookie") or []:
            name, _, rest = value.partition("=")
            cookie_value = rest.partition(";")[0]
            if "max-age=0" in value.lower() or "expires=thu, 01 jan 1970" in value.lower():
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = cookie_value
        return response.status, response.headers, text

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def login(self, token: str = TOKEN) -> None:
        status, _, page = self.request("GET", "/login")
        assert status == 200, page
        status, _, _ = self.request(
            "POST",
            "/login",
            form={"csrf": hidden(page, "csrf"), "token": token, "next": "/"},
            headers={"Origin": self.origin},
        )
        assert status == 303

    def csrf(self) -> str:
        status, _, page = self.request("GET", "/run")
        assert status == 200, page
        match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
        assert match
        return match.group(1)


def hidden(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert match, page
    return match.group(1)
