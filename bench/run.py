"""Benchmarks: the broker measured against the machine's limits, in one run.

Starts the broker (``python -m sockexec_py``) on a temporary socket, runs each
measure with clients in this process (a blocking socket for one session at a time,
one selector loop for many), measures the matching physical limit in the same run,
and prints one table: our figure, the limit, the ratio, the target and whether it is
met. Limits are measured interleaved with our runs (row 1: alternate one-second
slices; rows 3-4: one limit run after each of ours), so that a change in the load of
a shared machine hits both alike; the CPU column says how busy the machine was.

Clients connect the way nginx does, without blocking: a full listen backlog is an
immediate ``EAGAIN``, counted as an error (SPEC §5: the broker must keep accepting).

Measures (numbers as in issue 3):

1. sequential round trips of ``true`` — limit: ``os.posix_spawn`` + ``waitpid`` of
   ``true`` in a loop, in this process;
2. N concurrent clients running ``true`` — reference: the sequential figure of (1);
3. stdout streaming of ``head -c SIZE /dev/zero`` — limit: the same through a pipe to
   ``cat > /dev/null``;
4. duplex: SIZE bytes through ``cat`` in 64 KiB stdin netstrings while reading —
   limit: the pipe limit of (3);
5. slow reader: the client reads nothing for a while as the program writes — the
   broker's RSS growth over its idle RSS;
6. many concurrent ``sleep`` sessions on a fresh broker with ``-m 1000`` — all must
   succeed; the broker's peak RSS;
7. the same one-shot through the HTTP gateway (not written yet: ``n/a``).

Correctness is checked on every session (exit status 0, exact byte counts); the exit
status of the benchmark is 1 when a check failed, never because a target was missed.
Profiles of the broker per measure: ``--profile DIR`` (needs ``py-spy``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import http.client
import json
import os
import platform
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from sockexec_py.errors import ProtocolError
from sockexec_py.events import Exited, Output
from sockexec_py.protocol import NEED_DATA, ClientSession, encode_request

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
MiB = 1 << 20
GiB = 1 << 30
RECV_SIZE = 256 * 1024
STDIN_CHUNK = 64 * 1024
END_OF_STDIN = b"0:,"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Config:
    """Sizes and durations of one run (``--quick``, ``--tiny`` and flags set them)."""

    seq_seconds: float = 10.0
    limit_seconds: float = 5.0
    conc_clients: int = 16
    conc_seconds: float = 10.0
    stream_bytes: int = GiB
    duplex_bytes: int = 512 * MiB
    slow_bytes: int = GiB
    slow_idle: float = 6.0
    sessions: int = 1000
    session_sleep: float = 3.0
    repeat: int = 3
    parser: str = "fast"


PRESETS: dict[str, Config] = {
    "full": Config(),
    "quick": Config(
        seq_seconds=4.0,
        limit_seconds=2.0,
        conc_seconds=4.0,
        stream_bytes=512 * MiB,
        duplex_bytes=256 * MiB,
        slow_bytes=256 * MiB,
        repeat=2,
    ),
    "tiny": Config(
        seq_seconds=0.3,
        limit_seconds=0.2,
        conc_clients=4,
        conc_seconds=0.3,
        stream_bytes=4 * MiB,
        duplex_bytes=2 * MiB,
        slow_bytes=4 * MiB,
        slow_idle=0.3,
        sessions=50,
        session_sleep=0.2,
        repeat=1,
    ),
}

MEASURES = ("1", "2", "3", "4", "5", "6", "7")

TARGETS = {
    "1": 0.8,  # x the posix_spawn limit
    "2": 1.2,  # x the sequential figure of (1)
    "3": 0.4,  # x the raw pipe limit
    "4": 0.3,  # x the raw pipe limit
    "5": 4.0,  # MiB of RSS growth, at most
    "6": 64.0,  # MiB of peak RSS, at most (and every session succeeds)
}


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``512M``, ``1G`` (binary units) -> bytes."""
    match = re.fullmatch(r"(\d+)([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 64K, 512M, 1G)")
    shift = {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2).upper()]
    return int(match.group(1)) << shift


def format_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------------
# The broker under test


class BrokerError(Exception):
    """The broker did not start or died."""


class Broker:
    """A ``python -m sockexec_py`` process on a socket in ``workdir``.

    Readiness comes from ``--notify-fd``; :meth:`stop` sends SIGTERM and waits.
    """

    def __init__(
        self, workdir: Path, name: str, args: Sequence[str], pythonpath: Path = ROOT
    ) -> None:
        self.socket_path = str(workdir / f"{name}.sock")
        self._pythonpath = pythonpath
        self.log_path = workdir / f"{name}.log"
        self._args = list(args)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self, timeout: float = 20.0) -> None:
        read_end, write_end = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(self._pythonpath), env.get("PYTHONPATH")])
        )
        cmd = [sys.executable, "-m", "sockexec_py", *self._args]
        cmd += ["--notify-fd", str(write_end), self.socket_path]
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(write_end,),
                env=env,
                cwd=self._pythonpath,
            )
        os.close(write_end)
        try:
            ready = _read_with_timeout(read_end, timeout)
        finally:
            os.close(read_end)
        if ready != b"\n":
            self.stop()
            raise BrokerError(f"the broker did not become ready: {self.log_tail()}")

    def check_alive(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise BrokerError(
                f"the broker exited with status {self._proc.returncode}: {self.log_tail()}"
            )

    def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 10) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"

    def rss(self) -> int:
        """Resident set size in bytes (VmRSS)."""
        return _status_field(self.pid, "VmRSS")

    def peak_rss(self) -> int:
        """Peak resident set size in bytes (VmHWM)."""
        return _status_field(self.pid, "VmHWM")

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time (user + system) of the broker, and of the programs it reaped."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = [int(x) for x in f.read().rsplit(")", 1)[1].split()[11:15]]
        return (fields[0] + fields[1]) / _CLK_TCK, (fields[2] + fields[3]) / _CLK_TCK

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Gateway:
    """A ``python -m sockexec_py.gateway`` process on a free loopback port."""

    def __init__(self, socket_path: str, pythonpath: Path = ROOT) -> None:
        self._socket_path = socket_path
        self._pythonpath = pythonpath
        self._proc: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> Gateway:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(self._pythonpath), env.get("PYTHONPATH")])
        )
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sockexec_py.gateway",
                "--socket",
                self._socket_path,
                "--listen",
                "127.0.0.1:0",
            ],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self._proc.stderr is not None
        for line in self._proc.stderr:  # ends at EOF if the gateway dies
            if "listening on http://" in line:
                self.port = int(line.rsplit(":", 1)[1])
                break
        else:
            raise BrokerError("the gateway did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self._proc
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


def _read_with_timeout(fd: int, timeout: float) -> bytes:
    sel = selectors.DefaultSelector()
    try:
        sel.register(fd, selectors.EVENT_READ)
        if not sel.select(timeout):
            return b""
        return os.read(fd, 1)
    finally:
        sel.close()


def _status_field(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise BrokerError(f"/proc/{pid}/status has no {name}")


@contextlib.contextmanager
def profiled(profile_dir: Path | None, fmt: str, broker: Broker, name: str) -> Iterator[None]:
    """Record the broker with py-spy while the block runs (no-op without a dir)."""
    if profile_dir is None:
        yield
        return
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    ext = {"flamegraph": "svg", "speedscope": "json", "raw": "txt"}[fmt]
    out = profile_dir / f"{name}.{ext}"
    with open(profile_dir / f"{name}.py-spy.log", "wb") as log:
        proc = subprocess.Popen(
            [
                pyspy,
                "record",
                "--pid",
                str(broker.pid),
                "--rate",
                "250",
                "--format",
                fmt,
                "--nonblocking",
                "-o",
                str(out),
            ],
            stdout=log,
            stderr=log,
        )
    time.sleep(0.5)  # let py-spy attach before the measure starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------------
# Clients


class BenchError(Exception):
    """A session did not end as expected (wrong status, wrong byte count, bad reply)."""


@dataclass
class Reply:
    """What one session returned (output counted, stderr kept up to a few KiB)."""

    exited: Exited | None = None
    stdout_bytes: int = 0
    stderr: bytes = b""

    def check(self, expected_stdout: int | None = 0) -> None:
        if self.exited is None:
            raise BenchError("no exit pair")
        if self.exited.exitcode != 0:
            raise BenchError(f"program ended with {self.exited} stderr={self.stderr[:200]!r}")
        if expected_stdout is not None and self.stdout_bytes != expected_stdout:
            raise BenchError(f"got {self.stdout_bytes} stdout bytes, expected {expected_stdout}")


class SessionParser:
    """The project's :class:`ClientSession`, collecting a :class:`Reply`."""

    def __init__(self) -> None:
        self.session = ClientSession(max_frame=1 << 20)
        self.reply = Reply()

    def feed(self, data: bytes) -> None:
        try:
            self._feed(data)
        except ProtocolError as exc:
            raise BenchError(f"bad reply: {exc}") from None

    def _feed(self, data: bytes) -> None:
        self.session.receive_data(data)
        reply = self.reply
        while (event := self.session.next_event()) is not NEED_DATA:
            if isinstance(event, Output):
                if event.kind == "stdout":
                    reply.stdout_bytes += len(event.data)
                elif len(reply.stderr) < 4096:
                    reply.stderr += event.data
            else:
                assert isinstance(event, Exited)
                reply.exited = event
        if not data and not self.session.done:
            raise BenchError("connection closed before the exit pair")


_HEADER, _PAYLOAD, _COMMA = 0, 1, 2
_TYPES = frozenset((b"stdout", b"stderr", b"exitcode", b"termsig", b"unknown"))


class CountingParser:
    """A lean parser of the server's pairs that counts output without copying it.

    Same checks as :class:`ClientSession` on framing and types, but payloads of
    ``stdout``/``stderr`` pairs are only counted: per 64 KiB pair it costs a handful
    of Python operations and no copy, so the client stays off the critical path in the
    throughput measures.
    """

    def __init__(self) -> None:
        self.reply = Reply()
        self._state = _HEADER
        self._digits = bytearray()
        self._small = bytearray()  # a type, or the data of an exit pair
        self._remaining = 0
        self._type: bytes | None = None  # set while the data frame of a pair is read
        self._stderr = bytearray()

    def feed_buffer(self, buf: bytearray, n: int) -> None:
        """Parse ``buf[:n]``; ``n == 0`` means the server closed."""
        reply = self.reply
        if n == 0:
            if reply.exited is None:
                raise BenchError("connection closed before the exit pair")
            return
        i = 0
        while i < n:
            if reply.exited is not None:
                raise BenchError("data after the exit pair")
            state = self._state
            if state == _PAYLOAD:
                take = min(self._remaining, n - i)
                kind = self._type
                if kind == b"stdout":
                    reply.stdout_bytes += take
                elif kind == b"stderr":
                    if len(self._stderr) < 4096:
                        self._stderr += buf[i : i + take]
                else:
                    self._small += buf[i : i + take]
                    if len(self._small) > 64:
                        raise BenchError("oversized type or exit frame")
                i += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _COMMA
            elif state == _HEADER:
                colon = buf.find(b":", i, n)
                end = n if colon < 0 else colon
                self._digits += buf[i:end]
                if len(self._digits) > 9:
                    raise BenchError("netstring length too long")
                if colon < 0:
                    return
                i = colon + 1
                if not self._digits.isdigit():
                    raise BenchError(f"bad netstring length {bytes(self._digits)!r}")
                self._remaining = int(self._digits)
                self._digits.clear()
                self._state = _PAYLOAD if self._remaining else _COMMA
            else:
                if buf[i] != 0x2C:
                    raise BenchError("netstring not terminated by ','")
                i += 1
                self._state = _HEADER
                self._frame_done()

    def feed(self, data: bytes) -> None:
        self.feed_buffer(bytearray(data), len(data))

    def _frame_done(self) -> None:
        if self._type is None:
            kind = bytes(self._small)
            self._small.clear()
            if kind not in _TYPES:
                raise BenchError(f"unknown frame type {kind!r}")
            self._type = kind
            return
        kind, self._type = self._type, None
        data = bytes(self._small)
        self._small.clear()
        if kind == b"stderr":
            self.reply.stderr = bytes(self._stderr)
        elif kind == b"exitcode":
            if not data.isdigit():
                raise BenchError(f"exitcode is not a number: {data!r}")
            self.reply.exited = Exited(exitcode=int(data))
        elif kind == b"termsig":
            self.reply.exited = Exited(termsig=data.decode("ascii", "replace"))


def connect(path: str, timeout: float | None = 60.0) -> socket.socket:
    """Connect to the broker. With a timeout the socket is non-blocking underneath, so,
    as for nginx, a full listen backlog fails at once with EAGAIN instead of waiting."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def one_shot(path: str, request: bytes) -> Reply:
    """connect, send the whole request, read to close (ClientSession)."""
    parser = SessionParser()
    with connect(path) as sock:
        sock.sendall(request)
        while True:
            data = sock.recv(RECV_SIZE)
            parser.feed(data)
            if not data:
                return parser.reply


def read_reply(sock: socket.socket, parser_kind: str) -> Reply:
    """Read the reply to close with the chosen parser (``fast`` or ``session``)."""
    buf = bytearray(RECV_SIZE)
    if parser_kind == "fast":
        counting = CountingParser()
        while True:
            n = sock.recv_into(buf)
            counting.feed_buffer(buf, n)
            if n == 0:
                return counting.reply
    session = SessionParser()
    while True:
        data = sock.recv(RECV_SIZE)
        session.feed(data)
        if not data:
            return session.reply


def request_for(argv: Sequence[str], close_stdin: bool = True) -> bytes:
    return encode_request(argv) + (END_OF_STDIN if close_stdin else b"")


# ----------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    """One line of the table."""

    key: str
    name: str
    ours: str = "-"
    limit: str = "-"
    ratio: str = "-"
    target: str = "-"
    result: str = "n/a"
    cpu: str = "-"
    ok: bool = True
    data: dict[str, Any] = field(default_factory=dict)


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def percent(share: float) -> str:
    return f"{share * 100:.0f}%"


def quantile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


# ----------------------------------------------------------------------------------
# Many sessions at once, in one thread


@dataclass
class ManyResult:
    """Outcome of :func:`run_many`."""

    ok: int = 0
    errors: int = 0
    first_error: str = ""
    error_kinds: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    def fail(self, message: str, kind: str = "session") -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        if not self.first_error:
            self.first_error = message

    def errors_text(self) -> str:
        """``"22 connect EAGAIN, 1 session (first: ...)"``; empty without errors."""
        text = ", ".join(f"{n} {kind}" for kind, n in sorted(self.error_kinds.items()))
        if set(self.error_kinds) - {k for k in self.error_kinds if k.startswith("connect")}:
            text += f" (first: {self.first_error})"
        return text


def run_many(
    path: str,
    request: bytes,
    *,
    concurrency: int,
    total: int | None = None,
    duration: float | None = None,
    give_up_after: float = 120.0,
    on_tick: Callable[[], None] | None = None,
) -> ManyResult:
    """Keep ``concurrency`` one-shot sessions in flight with one selector loop.

    New sessions start while fewer than ``total`` were started and ``duration`` has
    not elapsed; the call returns when the last one has ended. One thread and
    non-blocking sockets: no GIL hand-offs between client threads, so the client costs
    the 2-core machine as little CPU as possible. ``on_tick`` runs about every 50 ms.
    """
    sel = selectors.DefaultSelector()
    inflight: dict[socket.socket, tuple[SessionParser, float]] = {}
    result = ManyResult()
    started = 0
    start = time.perf_counter()
    deadline = start + duration if duration is not None else float("inf")
    next_tick = start

    def finish(sock: socket.socket, error: str | None) -> None:
        parser, t0 = inflight.pop(sock)
        sel.unregister(sock)
        sock.close()
        if error is None:
            try:
                parser.reply.check()
            except BenchError as exc:
                error = str(exc)
        if error is None:
            result.ok += 1
            result.latencies.append(time.perf_counter() - t0)
        else:
            result.fail(error)

    try:
        while True:
            now = time.perf_counter()
            while (
                len(inflight) < concurrency
                and (total is None or started < total)
                and now < deadline
            ):
                started += 1
                try:
                    sock = connect(path)
                except OSError as exc:
                    name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
                    result.fail(f"connect: {exc}", f"connect {name}")
                    continue
                try:
                    sock.sendall(request)
                    sock.setblocking(False)
                except OSError as exc:
                    sock.close()
                    result.fail(f"send: {exc}", "send")
                    continue
                inflight[sock] = (SessionParser(), now)
                sel.register(sock, selectors.EVENT_READ)
            if not inflight:
                if (total is not None and started >= total) or time.perf_counter() >= deadline:
                    break
                continue
            for key, _ in sel.select(0.05):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                try:
                    data = ready.recv(RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    finish(ready, f"recv: {exc}")
                    continue
                try:
                    inflight[ready][0].feed(data)
                except BenchError as exc:
                    finish(ready, str(exc))
                    continue
                if not data:
                    finish(ready, None)
            now = time.perf_counter()
            if on_tick is not None and now >= next_tick:
                next_tick = now + 0.05
                on_tick()
            if now - start > give_up_after + (duration or 0.0):
                raise BenchError(f"{len(inflight)} sessions still open after {give_up_after} s")
    finally:
        for sock in inflight:
            sock.close()
        sel.close()
    result.elapsed = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------
# CPU accounting


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores) since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _CLK_TCK


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class CpuMeter:
    """CPU use over an interval, in cores, split by whom.

    ``broker``: the broker process; ``programs``: the programs it ran (counted once
    reaped); ``client``: this process (the benchmark's clients); ``other``: the rest of
    the machine (other users of a shared machine, kernel threads). Intervals can be
    paused so that an interleaved limit measure is not counted.
    """

    KEYS = ("broker", "programs", "client", "other")

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._wall = 0.0
        self._totals = dict.fromkeys(self.KEYS, 0.0)
        self._marks: tuple[float, dict[str, float]] | None = None

    def _now(self) -> tuple[float, dict[str, float]]:
        wall = time.perf_counter()
        broker, programs = self._broker.cpu_seconds()
        client = _own_cpu_seconds()
        other = _machine_busy_seconds() - broker - programs - client
        return wall, {"broker": broker, "programs": programs, "client": client, "other": other}

    def resume(self) -> CpuMeter:
        self._marks = self._now()
        return self

    def pause(self) -> None:
        assert self._marks is not None
        wall, values = self._now()
        wall0, values0 = self._marks
        self._wall += wall - wall0
        for key in self.KEYS:
            self._totals[key] += values[key] - values0[key]
        self._marks = None

    def shares(self) -> dict[str, float]:
        """Cores used, by key (``cpu_broker``...; 1.0 = one core busy all along)."""
        if self._marks is not None:
            self.pause()
        wall = self._wall or 1e-9
        return {f"cpu_{k}": max(0.0, v / wall) for k, v in self._totals.items()}


def cpu_text(shares: dict[str, float]) -> str:
    return "/".join(f"{shares[f'cpu_{k}'] * 100:.0f}" for k in CpuMeter.KEYS)


# ----------------------------------------------------------------------------------
# Measures


class Bench:
    """Runs the selected measures and collects the rows."""

    def __init__(
        self,
        config: Config,
        workdir: Path,
        only: set[str],
        profile_dir: Path | None,
        profile_format: str,
        log: Callable[[str], None],
        broker_pythonpath: Path = ROOT,
        broker_args: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.broker_pythonpath = broker_pythonpath
        self.broker_args = list(broker_args)
        self.workdir = workdir
        self.only = only
        self.profile_dir = profile_dir
        self.profile_format = profile_format
        self.log = log
        self.rows: dict[str, Row] = {}
        self.true_path = shutil.which("true") or "/bin/true"
        self.seq_rate: float | None = None
        self.pipe_limit: float | None = None

    def run(self) -> list[Row]:
        main_measures = [k for k in ("1", "2", "3", "4", "5") if k in self.only]
        if main_measures:
            broker = Broker(
                self.workdir,
                "broker",
                ["-m", "100", "-t", "600", *self.broker_args],
                self.broker_pythonpath,
            )
            with broker:
                self.log(f"broker pid {broker.pid} on {broker.socket_path}")
                steps: dict[str, Callable[[Broker], Row]] = {
                    "1": self.sequential,
                    "2": self.concurrent,
                    "3": self.stream,
                    "4": self.duplex,
                    "5": self.slow_reader,
                }
                for key in main_measures:
                    self._run_measure(key, steps[key], broker)
        if "6" in self.only:
            broker = Broker(
                self.workdir,
                "broker-m1000",
                ["-m", "1000", "-t", "120", *self.broker_args],
                self.broker_pythonpath,
            )
            with broker:
                self.log(f"broker (-m 1000) pid {broker.pid}")
                self._run_measure("6", self.sessions, broker)
        if "7" in self.only:
            broker = Broker(
                self.workdir,
                "broker-gw",
                ["-m", "100", "-t", "600", *self.broker_args],
                self.broker_pythonpath,
            )
            with broker, Gateway(broker.socket_path, self.broker_pythonpath) as gateway:
                self.log(f"gateway on port {gateway.port}")
                self._run_measure("7", lambda b: self.gateway_one_shot(b, gateway), broker)
        return [self.rows.get(k) or Row(k, "(not selected)", result="skipped") for k in MEASURES]

    def _run_measure(self, key: str, measure: Callable[[Broker], Row], broker: Broker) -> None:
        self.log(f"measure {key} ...")
        start = time.perf_counter()
        try:
            with profiled(self.profile_dir, self.profile_format, broker, f"measure-{key}"):
                row = measure(broker)
            broker.check_alive()
        except (BenchError, BrokerError, OSError) as exc:
            row = Row(key, f"measure {key}", ours=f"FAILED: {exc}", result="FAILED", ok=False)
        self.rows[key] = row
        self.log(f"measure {key}: {row.ours} ({time.perf_counter() - start:.1f} s)")

    # -- 7 ---------------------------------------------------------------------------

    def gateway_one_shot(self, broker: Broker, gateway: Gateway) -> Row:
        """Sequential ``POST /v1/exec`` of ``true`` on one keep-alive connection,
        against the broker's own sequential figure (row 1) measured just before."""
        body = json.dumps({"argv": ["true"]}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
        headers = {"Content-Type": "application/json"}

        def post() -> None:
            conn.request("POST", "/v1/exec", body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            if response.status != 200 or json.loads(data).get("exitcode") != 0:
                raise BenchError(f"gateway answered {response.status}: {data[:200]!r}")

        try:
            for _ in range(20):
                post()
            latencies: list[float] = []
            cpu = CpuMeter(broker)
            cpu.resume()
            start = time.perf_counter()
            deadline = start + self.config.seq_seconds
            while True:
                t0 = time.perf_counter()
                post()
                t1 = time.perf_counter()
                latencies.append(t1 - t0)
                if t1 >= deadline:
                    break
            elapsed = time.perf_counter() - start
            cpu.pause()
        finally:
            conn.close()
        rate = len(latencies) / elapsed
        latencies.sort()
        reference = self.seq_rate
        return Row(
            "7",
            "HTTP gateway one-shot `true` (keep-alive)",
            ours=f"{rate:.0f} requests/s (p50 {ms(quantile(latencies, 0.5))})",
            limit=f"{reference:.0f} runs/s (broker direct, row 1)" if reference else "n/a",
            ratio=f"{rate / reference:.2f}x" if reference else "n/a",
            target="-",
            result="measured",
            cpu=cpu_text(cpu.shares()),
            data={"rate": rate, "p50": quantile(latencies, 0.5), "runs": len(latencies)},
        )

    # -- 1 ---------------------------------------------------------------------------

    def _spawn_loop(self, seconds: float) -> tuple[int, float]:
        """``os.posix_spawn`` + ``waitpid`` of ``true`` for ``seconds``: (runs, elapsed)."""
        argv = ["true"]
        env = dict(os.environ)
        runs = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            _, status = os.waitpid(os.posix_spawn(self.true_path, argv, env), 0)
            if status != 0:
                raise BenchError(f"true exited with status {status}")
            runs += 1
            now = time.perf_counter()
            if now >= deadline:
                return runs, now - start

    def sequential(self, broker: Broker) -> Row:
        """Round trips one after the other, interleaved with the spawn limit.

        Both run in slices of about a second, alternately, so that a change in the
        machine's load (it is shared) hits both figures alike.
        """
        request = request_for(["true"])
        path = broker.socket_path
        for _ in range(20):  # warm up both
            one_shot(path, request).check()
        self._spawn_loop(0.0)
        slices = max(1, round(self.config.seq_seconds))
        latencies: list[float] = []
        elapsed = 0.0
        limit_runs, limit_elapsed = 0, 0.0
        cpu = CpuMeter(broker)
        for _ in range(slices):
            cpu.resume()
            start = time.perf_counter()
            deadline = start + self.config.seq_seconds / slices
            while True:
                t0 = time.perf_counter()
                one_shot(path, request).check()
                t1 = time.perf_counter()
                latencies.append(t1 - t0)
                if t1 >= deadline:
                    break
            elapsed += time.perf_counter() - start
            cpu.pause()
            runs, spent = self._spawn_loop(self.config.limit_seconds / slices)
            limit_runs += runs
            limit_elapsed += spent
        shares = cpu.shares()
        rate = len(latencies) / elapsed
        self.seq_rate = rate
        limit = limit_runs / limit_elapsed
        latencies.sort()
        p50, p99 = quantile(latencies, 0.5), quantile(latencies, 0.99)
        ratio = rate / limit
        return Row(
            "1",
            "sequential round trip of `true`",
            ours=f"{rate:.0f} runs/s (p50 {ms(p50)}, p99 {ms(p99)})",
            limit=f"{limit:.0f} runs/s (posix_spawn+waitpid loop)",
            ratio=f"{ratio:.2f}x",
            target=f">= {TARGETS['1']:.2f}x",
            result=verdict(ratio >= TARGETS["1"]),
            cpu=cpu_text(shares),
            data={
                "runs": len(latencies),
                "runs_per_s": rate,
                "p50_ms": p50 * 1000,
                "p99_ms": p99 * 1000,
                "limit_runs_per_s": limit,
                "ratio": ratio,
                **shares,
            },
        )

    # -- 2 ---------------------------------------------------------------------------

    def concurrent(self, broker: Broker) -> Row:
        clients = self.config.conc_clients
        cpu = CpuMeter(broker).resume()
        many = run_many(
            broker.socket_path,
            request_for(["true"]),
            concurrency=clients,
            duration=self.config.conc_seconds,
        )
        shares = cpu.shares()
        rate = many.ok / many.elapsed
        reference = self.seq_rate
        ratio = rate / reference if reference else None
        met = many.errors == 0 and ratio is not None and ratio >= TARGETS["2"]
        many.latencies.sort()
        p50 = quantile(many.latencies, 0.5)
        ours = f"{rate:.0f} runs/s, {many.errors} errors (p50 {ms(p50)}, {many.ok} runs)"
        if many.errors:
            ours += f"; errors: {many.errors_text()}"
        return Row(
            "2",
            f"{clients} concurrent clients running `true`",
            ours=ours,
            limit=f"{reference:.0f} runs/s (sequential, row 1)" if reference else "n/a",
            ratio=f"{ratio:.2f}x" if ratio is not None else "n/a",
            target=f">= {TARGETS['2']:.2f}x row 1, 0 errors",
            result=verdict(met) if ratio is not None else "n/a",
            cpu=cpu_text(shares),
            ok=many.errors == 0 and many.ok > 0,
            data={
                "clients": clients,
                "runs": many.ok,
                "errors": many.errors,
                "error_kinds": many.error_kinds,
                "runs_per_s": rate,
                "p50_ms": p50 * 1000,
                "sequential_runs_per_s": reference,
                "ratio": ratio,
                **shares,
            },
        )

    # -- 3 ---------------------------------------------------------------------------

    def _pipe_run(self, size: int) -> float:
        """MiB/s of ``head -c SIZE /dev/zero | cat > /dev/null``."""
        start = time.perf_counter()
        subprocess.run(["sh", "-c", f"head -c {size} /dev/zero | cat > /dev/null"], check=True)
        return size / MiB / (time.perf_counter() - start)

    def stream(self, broker: Broker) -> Row:
        """Best of --repeat runs, each followed by a run of the pipe limit."""
        size = self.config.stream_bytes
        request = request_for(["head", "-c", str(size), "/dev/zero"])
        best = limit = 0.0
        cpu = CpuMeter(broker)
        for _ in range(self.config.repeat):
            cpu.resume()
            start = time.perf_counter()
            with connect(broker.socket_path) as sock:
                sock.sendall(request)
                reply = read_reply(sock, self.config.parser)
            elapsed = time.perf_counter() - start
            cpu.pause()
            reply.check(expected_stdout=size)
            best = max(best, size / MiB / elapsed)
            limit = max(limit, self._pipe_run(size))
        self.pipe_limit = limit
        shares = cpu.shares()
        ratio = best / limit
        return Row(
            "3",
            f"stdout streaming `head -c {format_size(size)} /dev/zero`",
            ours=f"{best:.0f} MiB/s",
            limit=f"{limit:.0f} MiB/s (head | cat > /dev/null)",
            ratio=f"{ratio:.2f}x",
            target=f">= {TARGETS['3']:.2f}x",
            result=verdict(ratio >= TARGETS["3"]),
            cpu=cpu_text(shares),
            data={
                "bytes": size,
                "mib_per_s": best,
                "limit_mib_per_s": limit,
                "ratio": ratio,
                "parser": self.config.parser,
                **shares,
            },
        )

    # -- 4 ---------------------------------------------------------------------------

    def duplex(self, broker: Broker) -> Row:
        size = self.config.duplex_bytes
        best = 0.0
        cpu = CpuMeter(broker)
        for _ in range(self.config.repeat):
            cpu.resume()
            start = time.perf_counter()
            reply = self._duplex_once(broker.socket_path, size)
            elapsed = time.perf_counter() - start
            cpu.pause()
            reply.check(expected_stdout=size)
            best = max(best, size / MiB / elapsed)
        if self.pipe_limit is None:
            self.pipe_limit = max(
                self._pipe_run(self.config.stream_bytes) for _ in range(self.config.repeat)
            )
        limit = self.pipe_limit
        shares = cpu.shares()
        ratio = best / limit
        return Row(
            "4",
            f"duplex: {format_size(size)} through `cat` in 64 KiB netstrings",
            ours=f"{best:.0f} MiB/s",
            limit=f"{limit:.0f} MiB/s (raw pipe, row 3)",
            ratio=f"{ratio:.2f}x",
            target=f">= {TARGETS['4']:.2f}x",
            result=verdict(ratio >= TARGETS["4"]),
            cpu=cpu_text(shares),
            data={
                "bytes": size,
                "mib_per_s": best,
                "limit_mib_per_s": limit,
                "ratio": ratio,
                "parser": self.config.parser,
                **shares,
            },
        )

    def _duplex_once(self, path: str, size: int) -> Reply:
        """Send ``size`` bytes to ``cat`` in 64 KiB netstrings from a thread; read here."""
        frames, rest = divmod(size, STDIN_CHUNK)
        frame = b"%d:%b," % (STDIN_CHUNK, b"x" * STDIN_CHUNK)
        batch = 4  # netstrings per sendall: fewer syscalls, still 64 KiB netstrings
        errors: list[BaseException] = []
        with connect(path) as sock:
            sock.sendall(request_for(["cat"], close_stdin=False))

            def send() -> None:
                try:
                    full, tail = divmod(frames, batch)
                    block = frame * batch
                    for _ in range(full):
                        sock.sendall(block)
                    if tail:
                        sock.sendall(frame * tail)
                    if rest:
                        sock.sendall(b"%d:%b," % (rest, b"x" * rest))
                    sock.sendall(END_OF_STDIN)
                except OSError as exc:
                    errors.append(exc)

            sender = threading.Thread(target=send, name="duplex-sender")
            sender.start()
            try:
                reply = read_reply(sock, self.config.parser)
            finally:
                sender.join()
        if errors:
            raise BenchError(f"sending stdin failed: {errors[0]}")
        return reply

    # -- 5 ---------------------------------------------------------------------------

    def slow_reader(self, broker: Broker) -> Row:
        size = self.config.slow_bytes
        idle_rss = broker.rss()
        request = request_for(["head", "-c", str(size), "/dev/zero"])
        peak = idle_rss
        with connect(broker.socket_path) as sock:
            sock.sendall(request)
            end = time.perf_counter() + self.config.slow_idle
            while True:
                peak = max(peak, broker.rss())
                left = end - time.perf_counter()
                if left <= 0:
                    break
                time.sleep(min(0.05, left))
            reply = read_reply(sock, self.config.parser)
        peak = max(peak, broker.rss())
        reply.check(expected_stdout=size)
        growth = (peak - idle_rss) / MiB
        return Row(
            "5",
            f"slow reader: idle {self.config.slow_idle:g} s while {format_size(size)} is written",
            ours=f"+{growth:.2f} MiB RSS (idle {idle_rss / MiB:.1f}, peak {peak / MiB:.1f} MiB)",
            target=f"<= {TARGETS['5']:g} MiB",
            result=verdict(growth <= TARGETS["5"]),
            data={
                "bytes": size,
                "idle_rss_mib": idle_rss / MiB,
                "peak_rss_mib": peak / MiB,
                "growth_mib": growth,
                "delivered_bytes": reply.stdout_bytes,
            },
        )

    # -- 6 ---------------------------------------------------------------------------

    def sessions(self, broker: Broker) -> Row:
        count = self.config.sessions
        raise_fd_limit(count + 64)
        idle_rss = broker.rss()
        peak = idle_rss

        def sample() -> None:
            nonlocal peak
            peak = max(peak, broker.rss())

        cpu = CpuMeter(broker).resume()
        many = run_many(
            broker.socket_path,
            request_for(["sleep", f"{self.config.session_sleep:g}"]),
            concurrency=count,
            total=count,
            on_tick=sample,
        )
        shares = cpu.shares()
        peak = max(peak, broker.peak_rss())
        peak_mib = peak / MiB
        all_ok = many.ok == count and many.errors == 0
        met = all_ok and peak_mib <= TARGETS["6"]
        ours = (
            f"{many.ok}/{count} ok in {many.elapsed:.2f} s, peak RSS {peak_mib:.1f} MiB "
            f"(idle {idle_rss / MiB:.1f})"
        )
        if many.errors:
            ours += f"; errors: {many.errors_text()}"
        return Row(
            "6",
            f"{count} concurrent `sleep {self.config.session_sleep:g}` with -m 1000",
            ours=ours,
            target=f"{count}/{count}, <= {TARGETS['6']:g} MiB",
            result=verdict(met),
            cpu=cpu_text(shares),
            ok=all_ok,
            data={
                "sessions": count,
                "succeeded": many.ok,
                "errors": many.errors,
                "error_kinds": many.error_kinds,
                "elapsed_s": many.elapsed,
                "idle_rss_mib": idle_rss / MiB,
                "peak_rss_mib": peak_mib,
                **shares,
            },
        )


def raise_fd_limit(needed: int) -> None:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (1000 client sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise BenchError(f"RLIMIT_NOFILE is {soft}; {needed} descriptors are needed")


# ----------------------------------------------------------------------------------
# Output

COLUMNS = (
    ("#", "key"),
    ("measure", "name"),
    ("ours", "ours"),
    ("limit / reference (same run)", "limit"),
    ("ratio", "ratio"),
    ("target", "target"),
    ("result", "result"),
    ("CPU % broker/progs/client/other", "cpu"),
)

LEGEND = (
    "ratio = ours / limit: higher is better (rows 1-4). Rows 5-6: lower RSS is better. "
    "CPU % = CPU time over wall time during our runs (100 = one core busy) of the broker, "
    "the programs it ran, the benchmark's clients, and everything else on the machine."
)


def render_text(rows: Sequence[Row]) -> str:
    cells = [[h for h, _ in COLUMNS]] + [[str(getattr(r, a)) for _, a in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines) + "\n" + LEGEND + "\n"


def render_markdown(rows: Sequence[Row]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in rows:
        lines.append("| " + " | ".join(cell(str(getattr(row, a))) for _, a in COLUMNS) + " |")
    return "\n".join(lines) + "\n\n" + LEGEND + "\n"


def machine_facts() -> dict[str, str]:
    def run(cmd: Sequence[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    commit = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "sockexec_py"])
    return {
        "commit": commit + (" + uncommitted changes in sockexec_py/" if dirty else ""),
        "date": run(["date"]),
        "nproc": run(["nproc"]),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def write_results(
    path: Path, command: str, facts: dict[str, str], config: Config, rows: Sequence[Row]
) -> None:
    sizes = (
        f"row 1: {config.seq_seconds:g} s of round trips and {config.limit_seconds:g} s of "
        f"the spawn loop, interleaved; row 2: {config.conc_clients} clients for "
        f"{config.conc_seconds:g} s; rows 3-4: best of {config.repeat} run(s), the pipe "
        f"limit likewise; row 5: {format_size(config.slow_bytes)}, "
        f"{config.slow_idle:g} s idle; row 6: {config.sessions} x "
        f"`sleep {config.session_sleep:g}`"
    )
    text = [
        "# Benchmark results",
        "",
        "The latest full run of `bench/` (issue 3), written by the command below.",
        "Figures move with what else the machine is doing (the last column shows it as",
        "`other`) and with the VM's state from day to day, so each limit is measured in",
        "the same run, interleaved with ours: compare ratios across runs, not figures.",
        "`python -m bench.compare BASE_DIR` measures a change against a base checkout",
        "with alternating runs.",
        "",
        f"- command: `{command}`",
        f"- date: {facts['date']}",
        f"- nproc: {facts['nproc']}; Python {facts['python']}; kernel {facts['kernel']}",
        f"- broker: commit {facts['commit']}",
        f"- load average at start: {facts['load average']}",
        f"- sizes: {sizes}",
        f"- client parser for rows 3-5: `{config.parser}`"
        + (
            " (counts payload bytes without copying; the project's `ClientSession`, "
            "`--parser session`, costs the client enough CPU on 2 cores to lower rows 3-4)"
            if config.parser == "fast"
            else ""
        ),
        "",
        render_markdown(rows),
    ]
    path.write_text("\n".join(text))


# ----------------------------------------------------------------------------------
# Command line


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark the sockexec_py broker against the machine's limits.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a run of about a minute")
    mode.add_argument("--tiny", action="store_true", help="seconds: for the smoke test")
    add = parser.add_argument
    add("--seq-seconds", type=float, help="duration of measure 1")
    add("--limit-seconds", type=float, help="duration of the posix_spawn limit loop")
    add("--conc-clients", type=int, help="clients of measure 2 (16)")
    add("--conc-seconds", type=float, help="duration of measure 2")
    add("--stream-bytes", type=parse_size, help="bytes streamed in measure 3 (1G)")
    add("--duplex-bytes", type=parse_size, help="bytes through cat in measure 4 (512M)")
    add("--slow-bytes", type=parse_size, help="bytes written in measure 5 (1G)")
    add("--slow-idle", type=float, help="seconds the slow reader reads nothing (6)")
    add("--sessions", type=int, help="concurrent sessions of measure 6 (1000)")
    add("--session-sleep", type=float, help="seconds each session of measure 6 sleeps (3)")
    add("--repeat", type=int, help="throughput runs per measure, best kept (3)")
    add(
        "--parser",
        choices=("fast", "session"),
        help="client parser for rows 3-5: fast (counts, no copy) or session (ClientSession)",
    )
    add("--only", help="comma-separated measures to run, e.g. 1,3 (default: all)")
    add("--profile", type=Path, metavar="DIR", help="record the broker with py-spy per measure")
    add(
        "--profile-format",
        choices=("flamegraph", "speedscope", "raw"),
        default="flamegraph",
        help="py-spy output format (flamegraph)",
    )
    add(
        "--broker-pythonpath",
        type=Path,
        metavar="DIR",
        default=ROOT,
        help="directory holding the sockexec_py to benchmark (default: this checkout)",
    )
    add(
        "--backlog",
        type=int,
        metavar="Q",
        help="pass -q Q (listen backlog) to the brokers (default: the broker's own, 100)",
    )
    add(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="keep the brokers' sockets and logs in DIR (default: a temporary directory)",
    )
    add("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
    add(
        "--results",
        type=Path,
        metavar="PATH",
        nargs="?",
        const=RESULTS_MD,
        help=f"also write the table as Markdown (default path: {RESULTS_MD.relative_to(ROOT)})",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    config = PRESETS["quick" if args.quick else "tiny" if args.tiny else "full"]
    overrides = {
        name: getattr(args, name)
        for name in Config.__dataclass_fields__
        if getattr(args, name, None) is not None
    }
    return replace(config, **overrides)


def main(argv: Sequence[str] | None = None, prog: str = "python bench/run.py") -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(args_list)
    config = config_from_args(args)
    only = set(MEASURES) if not args.only else {k.strip() for k in args.only.split(",")}
    if not only <= set(MEASURES):
        parser.error(f"--only takes measures among {','.join(MEASURES)}")
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    command = " ".join([prog, *map(shlex.quote, args_list)])
    facts = machine_facts()
    err: IO[str] = sys.stderr

    def log(message: str) -> None:
        err.write(f"bench: {message}\n")
        err.flush()

    log(f"{command} — {facts['date']}, nproc {facts['nproc']}, Python {facts['python']}")
    log(f"config: {config}")
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = args.workdir.resolve()
        else:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="sockexec-bench-"))
            )
        bench = Bench(
            config,
            workdir,
            only,
            args.profile,
            args.profile_format,
            log,
            broker_pythonpath=args.broker_pythonpath.resolve(),
            broker_args=["-q", str(args.backlog)] if args.backlog else [],
        )
        rows = bench.run()
    sys.stdout.write(f"\n{command}\n{facts['date']} | nproc {facts['nproc']} | ")
    sys.stdout.write(f"Python {facts['python']} | load {facts['load average']}\n\n")
    sys.stdout.write(render_text(rows))
    sys.stdout.flush()
    if args.json is not None:
        payload = {
            "command": command,
            "facts": facts,
            "config": asdict(config),
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.results is not None:
        write_results(args.results, command, facts, config, rows)
        log(f"wrote {args.results}")
    failed = [r.key for r in rows if not r.ok]
    if failed:
        log(f"correctness checks failed in measure(s) {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
