"""A real ``sockexec-gateway`` process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import http.client
import json
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .broker import HarnessError, with_pythonpath


class GatewayProcess:
    """A running ``python -m sockexec_py.gateway --socket PATH --listen 127.0.0.1:0``.

    The port is read from its "listening on" line. :meth:`request` makes one HTTP
    request (a JSON ``body`` is sent with ``Content-Type: application/json``, as JSON
    clients do). Once it listens, a thread reads its stderr into :attr:`lines` (a
    gateway that logs a lot never blocks on a full pipe); :meth:`log_until` waits for
    a line. :meth:`stop` ends it (SIGTERM, then SIGKILL past 20 s).
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
            cwd=pythonpath,  # `python -m` looks in the working directory first
        )
        assert self.proc.stderr is not None
        self.lines: list[str] = []
        self._log_changed = threading.Condition()
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
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

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

    def log_until(self, needle: str, timeout: float = 20.0, count: int = 1) -> list[str]:
        """Wait until ``needle`` appeared ``count`` times in the gateway's stderr;
        returns the lines that have it.

        Error handling: :class:`HarnessError` past ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._log_changed:
            while len(found := [line for line in self.lines if needle in line]) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HarnessError(
                        f"{needle!r} not {count} time(s) in the gateway's log after {timeout}s: "
                        f"{''.join(self.lines)[-2000:]}"
                    )
                self._log_changed.wait(left)
        return found

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._log_changed:
                self.lines.append(line)
                self._log_changed.notify_all()

    def rss_kib(self) -> int:
        """The gateway's resident memory now, in KiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise HarnessError(f"/proc/{self.proc.pid}/status has no VmRSS")

    def kill(self) -> None:
        """SIGKILL: the gateway dies at once, as in a crash (nothing of it runs)."""
        self.proc.kill()
        self._close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._close()

    def _close(self) -> None:
        """Reap the process, let the log reader reach the end, close the pipe."""
        self.proc.wait()
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
