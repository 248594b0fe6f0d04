"""The C sockexec 3.1.1, run beside ours as the reference column (issue 14).

Where its binary comes from: ``SOCKEXEC_REF`` names one; otherwise
``build-sockexec.sh`` of :data:`~bench.config.REFERENCE_DIR` builds one, once, into
``$XDG_CACHE_HOME/sockexec_py-bench/`` (``~/.cache`` without it), in a folder named
after the script's sha256, so that a changed script builds again.

The C daemon has no readiness fd: it is ready when a ``true`` round trip through its
socket succeeds. Its known bugs (``shared/reference/README.md``) shape the clients
that talk to it, never the figures: each request goes out in one write (it crashes on
a first read without a complete argc netstring), nobody half-closes (it kills the
program), output is counted to EOF (its exit pair may come before the last stdout
pair), its failures are counted in the row (it accepts and drops clients past
``-m``), and stopping it never fails the run (it may abort on SIGTERM after load:
SIGKILL after a short wait). If it dies during a measure, :meth:`ReferenceDaemon.
ensure_running` starts it again and the row says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .client import BenchError, one_shot, reference_parser, request_for
from .config import REFERENCE_DIR
from .many import CpuMeter, ManyResult
from .measure import quantile

BUILD_SCRIPT = REFERENCE_DIR / "build-sockexec.sh"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PROBE = request_for(["true"])
#: Seconds after which a session of the C sockexec counts as lost: now and then it
#: leaves one without a reply (seen in row 6), where ours would fail the run.
REFERENCE_TIMEOUT = 10.0


class ReferenceError(Exception):
    """The C sockexec could not be found, built or started."""


@dataclass(frozen=True)
class Reference:
    """Where the C sockexec is (``binary``), or why there is none (``origin`` says)."""

    binary: Path | None
    origin: str


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sockexec_py-bench"


def locate(*, build: bool = True, timeout: float = 300.0) -> Reference:
    """The binary from ``SOCKEXEC_REF``, else a cached build, else (``build``) a new one.

    Error handling: never raises; a missing binary comes back with the reason.
    """
    named = os.environ.get("SOCKEXEC_REF")
    if named:
        path = Path(named)
        if path.is_file() and os.access(path, os.X_OK):
            return Reference(path, f"SOCKEXEC_REF={named}")
        return Reference(None, f"SOCKEXEC_REF={named} is not an executable file")
    try:
        digest = hashlib.sha256(BUILD_SCRIPT.read_bytes()).hexdigest()[:16]
    except OSError as exc:
        return Reference(None, f"no build script: {exc}")
    folder = cache_dir() / f"sockexec-{digest}"
    binary = folder / "sockexec"
    origin = f"{BUILD_SCRIPT.name} (sha256 {digest}) built in {folder}"
    if binary.is_file():
        return Reference(binary, origin)
    if not build:
        return Reference(None, f"not built yet ({folder})")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f"{folder.name}.{os.getpid()}.tmp"
    try:
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT), str(staging)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Reference(None, f"{BUILD_SCRIPT.name} failed: {exc}")
    if proc.returncode != 0 or not (staging / "sockexec").is_file():
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return Reference(None, f"{BUILD_SCRIPT.name} failed ({proc.returncode}): {last}")
    # A build racing ours may have won: keep whichever landed first.
    with contextlib.suppress(OSError):
        staging.rename(folder)
    if staging.exists():
        subprocess.run(["rm", "-rf", str(staging)], check=False)
    return Reference(binary, origin + " (just now)")


def describe_status(returncode: int) -> str:
    if returncode < 0:
        return f"died of {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("State:"):
                return line.split(None, 1)[1].strip()
    return "?"


class ReferenceDaemon:
    """A running C ``sockexec ARGS PATH``; its stderr goes to ``PATH.log``.

    Args:
        binary: the C sockexec.
        path: the socket path (a stale file there is removed first).
        args: flags before the path (``-m``, ``-t``, ``-q``: SPEC §5).

    Resource handling: :meth:`stop` ends it (SIGTERM, SIGKILL after a short wait) and
    never raises. Error handling: :class:`ReferenceError` when it does not start.
    """

    def __init__(
        self, binary: Path, path: Path, args: Sequence[str], *, ready_timeout: float = 10.0
    ) -> None:
        self.binary = binary
        self.path = path
        self.args = list(args)
        self.log_path = path.with_suffix(".log")
        self.ready_timeout = ready_timeout
        self.crashes: list[str] = []
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                [str(self.binary), *self.args, str(self.path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if proc.poll() is not None:
                raise ReferenceError(f"the C sockexec {describe_status(proc.returncode)}")
            try:
                one_shot(str(self.path), _PROBE, reference_parser, REFERENCE_TIMEOUT).check()
                return proc
            except (OSError, BenchError) as exc:
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise ReferenceError(f"the C sockexec did not answer: {exc}") from None
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ensure_running(self) -> None:
        """Start it again if it died (its crash is kept in :attr:`crashes`)."""
        if self.proc.poll() is not None:
            self.crashes.append(describe_status(self.proc.returncode))
            self.proc = self._start()

    def state(self) -> str:
        """Its scheduler state, open fds and children (with theirs), for a hang's note."""
        try:
            me = _proc_state(self.pid)
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                children = [f"{pid} {_proc_state(int(pid))}" for pid in f.read().split()]
        except OSError as exc:
            return f"unreadable ({exc.strerror})"
        return f"{me}, {fds} fds, children: {', '.join(children) or 'none'}"

    def log_count(self, needle: str) -> int:
        """Lines of its log that contain ``needle`` (its warnings: dropped clients)."""
        try:
            return self.log_path.read_text(errors="replace").count(needle)
        except OSError:
            return 0

    # The harness's BrokerProcess reads the same two /proc files; it takes no pid of a
    # process it did not start, hence this small copy.
    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time (user + system) of the daemon, and of the programs it reaped."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = [int(x) for x in f.read().rsplit(")", 1)[1].split()[11:15]]
        return (fields[0] + fields[1]) / _CLK_TCK, (fields[2] + fields[3]) / _CLK_TCK

    def rss_kib(self, field: str = "VmRSS") -> int:
        """``VmRSS`` (now) or ``VmHWM`` (peak) of /proc/PID/status, in KiB."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
        raise ReferenceError(f"/proc/{self.pid}/status has no {field}")

    def stop(self, wait: float = 2.0) -> str:
        """End it; returns how it ended, for the notes. Never raises."""
        proc = self.proc
        if proc.poll() is not None:
            return f"had {describe_status(proc.returncode)} before the end"
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            ended = f"ignored SIGTERM for {wait:g} s: killed"
        else:
            ended = (
                "ended on SIGTERM"
                if proc.returncode == 0
                else describe_status(proc.returncode) + " on SIGTERM"
            )
        with contextlib.suppress(OSError):
            self.path.unlink()
        return ended

    def __enter__(self) -> ReferenceDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class ReferenceSide:
    """The C sockexec's share of a measure: its sessions (failures counted, never
    raised), its CPU, and the crashes it had during this measure."""

    daemon: ReferenceDaemon
    sessions: ManyResult = field(default_factory=ManyResult)
    cpu: CpuMeter = field(init=False)
    crashes_before: int = field(init=False)
    hung: str = ""  # the daemon's state after its first session left without a reply

    def __post_init__(self) -> None:
        self.cpu = CpuMeter(self.daemon)
        self.crashes_before = len(self.daemon.crashes)

    def run(self, step: Callable[[ReferenceDaemon], ManyResult]) -> None:
        """One slice: ``step`` against the daemon, which is started again if it died
        (before, or during the slice: its crash counts in this measure)."""
        if not self._restart():
            return
        self.cpu.resume()
        try:
            self.sessions.add(step(self.daemon))
        except (BenchError, ReferenceError, OSError) as exc:  # it died under the step
            self.sessions.fail(str(exc))
        finally:
            self.cpu.pause()  # a dead daemon is a zombie until polled: still readable
        if not self.hung and "no reply" in self.sessions.error_kinds:
            self.hung = self.daemon.state()
        self._restart()

    def warm_up(self, request: bytes, runs: int = 20) -> None:
        """A few sessions outside the figures, as ours get (up to the first failure)."""
        if self._restart():
            for _ in range(runs):
                try:
                    one_shot(str(self.daemon.path), request, reference_parser, REFERENCE_TIMEOUT)
                except (BenchError, OSError):
                    return

    def _restart(self) -> bool:
        try:
            self.daemon.ensure_running()
        except ReferenceError as exc:
            self.sessions.fail(str(exc), "restart")
            return False
        return True

    @property
    def rate(self) -> float:
        """Successful runs per second of its slices."""
        return self.sessions.ok / self.sessions.elapsed if self.sessions.elapsed else 0.0

    def latency(self, q: float) -> float:
        """A quantile of the successful sessions' durations (NaN without any)."""
        self.sessions.latencies.sort()
        return quantile(self.sessions.latencies, q)

    def cell(self, figure: str) -> str:
        """``figure``, then its CPU and what failed, for the row's C column."""
        text = f"{figure}; daemon CPU {self.cpu.shares()['cpu_broker'] * 100:.0f}%"
        if self.sessions.errors:
            text += f"; {self.sessions.errors} failed: {self.sessions.errors_text()}"
        crashes = self.daemon.crashes[self.crashes_before :]
        if crashes:
            text += f"; crashed {len(crashes)}x ({', '.join(sorted(set(crashes)))}), restarted"
        if self.hung:
            text += f"; after its first hang: {self.hung}"
        return text

    def data(self) -> dict[str, Any]:
        return {
            "ref_runs_per_s": self.rate,
            "ref_runs": self.sessions.ok,
            "ref_failures": self.sessions.errors,
            "ref_failure_kinds": self.sessions.error_kinds,
            "ref_crashes": self.daemon.crashes[self.crashes_before :],
            "ref_hung_state": self.hung,
            "ref_p50_ms": self.latency(0.5) * 1000,
            "ref_p99_ms": self.latency(0.99) * 1000,
            **{f"ref_{k}": v for k, v in self.cpu.shares().items()},
        }
