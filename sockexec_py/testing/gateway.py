"""A real ``sockexec-gateway`` process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import http.client
import json
import re
import select
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .broker import HarnessError, with_pythonpath


class GatewayProcess:
    """A running ``python -m sockexec_py.gateway --socket PATH --listen 127.0.0.1:0``.

    The port is read from its "listening on" line. :meth:`request` makes one HTTP
    request (a JSON ``body`` is sent with ``Content-Type: application/json``, as JSON
    clients do). :meth:`stop` ends it (SIGTERM, then SIGKILL past 20 s).
    """

    def __init__(
        self,
        socket_path: Path | str,
        *args: str,
        pythonpath: Path | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sockexec_py.gateway",
                "--socket",
                str(socket_path),
                "--listen",
                "127.0.0.1:0",
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=with_pythonpath(env, pythonpath) if (env or pythonpath) else None,
        )
        assert self.proc.stderr is not None
        self.lines: list[str] = []
        ready, _, _ = select.select([self.proc.stderr], [], [], start_timeout)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            raise HarnessError("the gateway did not start")
        for line in self.proc.stderr:  # ends at EOF if the gateway dies
            self.lines.append(line)
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                break
        else:
            self.proc.wait()
            raise HarnessError(f"the gateway exited: {''.join(self.lines)}")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection: (status, headers, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        payload = (
            raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        )
        if body is not None:  # what a JSON client sends (the gateway requires it)
            headers = {"Content-Type": "application/json", **(headers or {})}
        try:
            conn.request(method, path, body=payload, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        return response.status, dict(response.getheaders()), data

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stderr is not None:
                self.proc.stderr.close()

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
