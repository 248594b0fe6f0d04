"""A real ``sockexec-py`` process for tests and benchmarks, started as users start it.

Readiness comes from ``--notify-fd`` (a newline once the socket accepts), never from
a sleep; the broker's stderr goes to a log file beside its socket.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


class HarnessError(Exception):
    """A process of the harness did not start, or did not do what was waited for."""


def with_pythonpath(env: Mapping[str, str] | None, pythonpath: Path | None) -> dict[str, str]:
    """``env`` (default: ours) with ``pythonpath`` first on PYTHONPATH, so the process
    runs the ``sockexec_py`` of that checkout (bench.compare's base, say)."""
    merged = dict(os.environ if env is None else env)
    if pythonpath is not None:
        merged["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(pythonpath), merged.get("PYTHONPATH")])
        )
    return merged


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition that has no event to wait on (a process dying elsewhere)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class BrokerProcess:
    """A running ``python -m sockexec_py ARGS --notify-fd N SOCKET``.

    Args:
        path: the socket path; the log is ``path`` with the suffix ``.log``.
        args: flags before the socket path.
        env: the environment (default: ours).
        pythonpath: a checkout whose ``sockexec_py`` to run instead of ours.
        cwd: the broker's working directory, which its programs inherit (default:
            ``pythonpath``, else ours).
        start_timeout: seconds to wait for readiness.

    Resource handling: :meth:`stop` (SIGTERM, then a wait) ends it and closes the log.
    Error handling: :class:`HarnessError` when it does not become ready.
    """

    def __init__(
        self,
        path: Path,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        pythonpath: Path | None = None,
        cwd: Path | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self.path = path
        self.stderr_path = path.with_suffix(".log")
        read_fd, write_fd = os.pipe()
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sockexec_py", *args, "--notify-fd", str(write_fd), str(path)],
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            pass_fds=(write_fd,),
            env=with_pythonpath(env, pythonpath) if (env or pythonpath) else None,
            cwd=cwd or pythonpath,
        )
        os.close(write_fd)
        try:
            ready, _, _ = select.select([read_fd], [], [], start_timeout)
            line = os.read(read_fd, 1) if ready else b""
        finally:
            os.close(read_fd)
        if line != b"\n":
            self.proc.kill()
            self.proc.wait()
            self._stderr.close()
            raise HarnessError(f"the broker did not start: {self.log_tail()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_tail(self, lines: int = 10) -> str:
        try:
            text = self.log()
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise HarnessError(
                f"the broker exited with status {self.proc.returncode}: {self.log_tail()}"
            )

    def rss_kib(self, field: str = "VmRSS") -> int:
        """A memory figure of /proc/PID/status in KiB: ``VmRSS`` now, ``VmHWM`` its peak."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
        raise HarnessError(f"/proc/{self.pid}/status has no {field}")

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time (user + system) of the broker, and of the programs it reaped."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = [int(x) for x in f.read().rsplit(")", 1)[1].split()[11:15]]
        return (fields[0] + fields[1]) / _CLK_TCK, (fields[2] + fields[3]) / _CLK_TCK

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def children(self) -> list[int]:
        """Direct children of the broker (zombies included)."""
        with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
            return [int(p) for p in f.read().split()]

    def dump_until(self, needle: str, timeout: float = 10) -> str:
        """Ask for the SIGUSR1 report until it contains ``needle``; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            offset = len(self.log())
            os.kill(self.pid, signal.SIGUSR1)
            wait_until(
                lambda start=offset: "active connection(s)" in self.log()[start:],  # type: ignore[misc]
                5,
                "the dump",
            )
            report = self.log()[offset:]
            if needle in report:
                return report
            if time.monotonic() > deadline:
                raise HarnessError(f"{needle!r} never appeared in the dump {report!r}")

    def wait_idle(self) -> None:
        """Wait until the broker has finished with every connection."""
        self.dump_until("sockexec-py: 0 active connection(s)")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; returns the exit status (SIGKILL past ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._stderr.close()
        return code

    def __enter__(self) -> BrokerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()
