"""Many sessions at once in one thread (:func:`run_many`), and the CPU meter that says
who used the machine's cores while a measure ran (:class:`CpuMeter`)."""

from __future__ import annotations

import errno
import os
import resource
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .client import BenchError, ReplyParser, SessionParser, connect
from .config import RECV_SIZE

_CLK_TCK = os.sysconf("SC_CLK_TCK")


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

    def add(self, other: ManyResult) -> None:
        """Count ``other`` (a later slice of the same measure) in this one."""
        self.ok += other.ok
        self.errors += other.errors
        self.first_error = self.first_error or other.first_error
        for kind, n in other.error_kinds.items():
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + n
        self.latencies += other.latencies
        self.elapsed += other.elapsed

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
    parser_factory: Callable[[], ReplyParser] = SessionParser,
) -> ManyResult:
    """Keep ``concurrency`` one-shot sessions in flight with one selector loop.

    New sessions start while fewer than ``total`` were started and ``duration`` has
    not elapsed; the call returns when the last one has ended. One thread and
    non-blocking sockets: no GIL hand-offs between client threads, so the client costs
    the 2-core machine as little CPU as possible. ``on_tick`` runs about every 50 ms.
    Each request goes out in one write (the C sockexec crashes on a partial argc).

    Error handling: a session that fails (connect, send, recv, a bad or short reply,
    an exit status other than 0, no reply ``give_up_after`` seconds past
    ``duration``) is counted in the result, never raised.
    """
    sel = selectors.DefaultSelector()
    inflight: dict[socket.socket, tuple[ReplyParser, float]] = {}
    result = ManyResult()
    started = 0
    start = time.perf_counter()
    deadline = start + duration if duration is not None else float("inf")
    next_tick = start
    last_end = start
    gave_up = False

    def finish(sock: socket.socket, error: str | None) -> None:
        nonlocal last_end
        last_end = time.perf_counter()
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
                inflight[sock] = (parser_factory(), now)
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
                waited = give_up_after + (duration or 0.0)
                for _ in inflight:
                    result.fail(f"still open after {waited:g} s", "no reply")
                gave_up = True
                break
    finally:
        for sock in inflight:
            sock.close()
        sel.close()
    # Sessions given up on do not count their wait: the rate is that of the others.
    result.elapsed = (last_end if gave_up else time.perf_counter()) - start
    return result


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores) since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _CLK_TCK


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class CpuSource(Protocol):
    """A daemon whose CPU time can be read (a ``BrokerProcess``, the C sockexec)."""

    def cpu_seconds(self) -> tuple[float, float]: ...


class CpuMeter:
    """CPU use over an interval, in cores, split by whom.

    ``broker``: the daemon under test (ours or the C sockexec); ``programs``: the
    programs it ran (counted once reaped); ``client``: this process (the benchmark's
    clients); ``other``: the rest of the machine (other users of a shared machine,
    kernel threads). Intervals can be paused so that an interleaved limit measure (or
    the other daemon's run) is not counted.
    """

    KEYS = ("broker", "programs", "client", "other")

    def __init__(self, broker: CpuSource) -> None:
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


def raise_fd_limit(needed: int) -> None:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (1000 client sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise BenchError(f"RLIMIT_NOFILE is {soft}; {needed} descriptors are needed")
