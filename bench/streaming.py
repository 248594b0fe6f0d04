"""Rows 3-5: output streamed, stdin and stdout at once, and a reader that waits.

Row 3's limit is the same bytes through a pipe (``head -c SIZE /dev/zero | cat >
/dev/null``), run after each of ours; the C sockexec's run follows (rows 3 and 4).
Row 4 sends SIZE bytes to ``cat`` in 64 KiB netstrings from a thread while reading;
its limit is row 3's. Row 5 reads nothing for a while and measures the broker's RSS.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable

from .client import BenchError, Reply, connect, read_reply, request_for
from .config import END_OF_STDIN, STDIN_CHUNK, TARGETS, MiB, format_size
from .many import CpuMeter, ManyResult, cpu_text
from .measure import Context, Daemon, Row, verdict
from .reference import ReferenceDaemon, ReferenceSide


def pipe_run(size: int) -> float:
    """MiB/s of ``head -c SIZE /dev/zero | cat > /dev/null``."""
    start = time.perf_counter()
    subprocess.run(["sh", "-c", f"head -c {size} /dev/zero | cat > /dev/null"], check=True)
    return size / MiB / (time.perf_counter() - start)


def stream_once(path: str, size: int, parser: str) -> Reply:
    """``head -c SIZE /dev/zero``, its output read to close."""
    with connect(path) as sock:
        sock.sendall(request_for(["head", "-c", str(size), "/dev/zero"]))
        return read_reply(sock, parser)


def duplex_once(path: str, size: int, parser: str) -> Reply:
    """Send ``size`` bytes to ``cat`` in 64 KiB netstrings from a thread; read here.

    Never a half-close (the C sockexec kills the program on one): the empty netstring
    ends stdin.
    """
    frames, rest = divmod(size, STDIN_CHUNK)
    frame = b"%d:%b," % (STDIN_CHUNK, b"x" * STDIN_CHUNK)
    batch = 4  # netstrings per sendall: fewer syscalls, still 64 KiB netstrings
    errors: list[BaseException] = []
    with connect(path) as sock:
        sock.sendall(request_for(["cat"], close_stdin=False))

        def send(sock: socket.socket = sock) -> None:
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
            reply = read_reply(sock, parser)
        finally:
            sender.join()
    if errors:
        raise BenchError(f"sending stdin failed: {errors[0]}")
    return reply


def reference_run(
    once: Callable[[str, int, str], Reply], size: int
) -> Callable[[ReferenceDaemon], ManyResult]:
    """One run of ``once`` against the C sockexec, as a slice: a failure is counted."""

    def step(daemon: ReferenceDaemon) -> ManyResult:
        result = ManyResult()
        start = time.perf_counter()
        try:
            once(str(daemon.path), size, "reference").check(expected_stdout=size)
        except (BenchError, OSError) as exc:
            result.fail(str(exc))
        else:
            result.ok = 1
            result.latencies.append(time.perf_counter() - start)
        result.elapsed = time.perf_counter() - start
        return result

    return step


def _add_reference(row: Row, side: ReferenceSide, size: int, best: float) -> None:
    ref_best = size / MiB / side.latency(0.0) if side.sessions.ok else 0.0
    row.ref = side.cell(f"{ref_best:.0f} MiB/s" if ref_best else "no run completed")
    row.vs_ref = f"{best / ref_best:.2f}x" if ref_best else "n/a"
    row.data |= side.data() | {
        "ref_mib_per_s": ref_best,
        "vs_ref": best / ref_best if ref_best else None,
    }


def _best_of(
    ctx: Context,
    broker: Daemon,
    side: ReferenceSide | None,
    once: Callable[[str, int, str], Reply],
    size: int,
    between: Callable[[], None],
) -> tuple[float, dict[str, float]]:
    """Best MiB/s of --repeat runs of ``once`` on ours, and the CPU shares; after
    each run, ``between`` (a limit run) and a run of the C sockexec."""
    best = 0.0
    cpu = CpuMeter(broker)
    for _ in range(ctx.config.repeat):
        cpu.resume()
        start = time.perf_counter()
        reply = once(str(broker.path), size, ctx.config.parser)
        elapsed = time.perf_counter() - start
        cpu.pause()
        reply.check(expected_stdout=size)
        best = max(best, size / MiB / elapsed)
        between()
        if side is not None:
            side.run(reference_run(once, size))
    return best, cpu.shares()


def _row(
    key: str,
    name: str,
    ctx: Context,
    size: int,
    figures: tuple[float, dict[str, float]],
    limit: tuple[float, str],
    side: ReferenceSide | None,
) -> Row:
    (best, shares), (limit_mib_per_s, limit_text) = figures, limit
    ratio = best / limit_mib_per_s
    row = Row(
        key,
        name,
        ours=f"{best:.0f} MiB/s",
        limit=f"{limit_mib_per_s:.0f} MiB/s ({limit_text})",
        ratio=f"{ratio:.2f}x",
        target=f">= {TARGETS[key]:.2f}x",
        result=verdict(ratio >= TARGETS[key]),
        cpu=cpu_text(shares),
        data={
            "bytes": size,
            "mib_per_s": best,
            "limit_mib_per_s": limit_mib_per_s,
            "ratio": ratio,
            "parser": ctx.config.parser,
            **shares,
        },
    )
    if side is not None:
        _add_reference(row, side, size, best)
    return row


def stream(ctx: Context, broker: Daemon, ref: ReferenceDaemon | None) -> Row:
    """Row 3: best of --repeat runs, each followed by a run of the pipe limit and one
    of the C sockexec."""
    size = ctx.config.stream_bytes
    side = ReferenceSide(ref) if ref is not None else None
    limits: list[float] = []
    figures = _best_of(ctx, broker, side, stream_once, size, lambda: limits.append(pipe_run(size)))
    ctx.pipe_limit = max(limits)
    name = f"stdout streaming `head -c {format_size(size)} /dev/zero`"
    return _row("3", name, ctx, size, figures, (ctx.pipe_limit, "head | cat > /dev/null"), side)


def duplex(ctx: Context, broker: Daemon, ref: ReferenceDaemon | None) -> Row:
    """Row 4: best of --repeat runs, each followed by one of the C sockexec."""
    config = ctx.config
    size = config.duplex_bytes
    side = ReferenceSide(ref) if ref is not None else None
    figures = _best_of(ctx, broker, side, duplex_once, size, lambda: None)
    if ctx.pipe_limit is None:
        ctx.pipe_limit = max(pipe_run(config.stream_bytes) for _ in range(config.repeat))
    name = f"duplex: {format_size(size)} through `cat` in 64 KiB netstrings"
    return _row("4", name, ctx, size, figures, (ctx.pipe_limit, "raw pipe, row 3"), side)


def slow_reader(ctx: Context, broker: Daemon) -> Row:
    """Row 5: the client reads nothing for ``slow_idle`` s while the program writes;
    the broker's RSS growth over its idle RSS. (Not run against the C sockexec, which
    holds the program's output in memory: +568 MiB in issue 14's manual run.)"""
    config = ctx.config
    size = config.slow_bytes
    idle_rss = broker.rss_kib() * 1024
    peak = idle_rss
    with connect(str(broker.path)) as sock:
        sock.sendall(request_for(["head", "-c", str(size), "/dev/zero"]))
        end = time.perf_counter() + config.slow_idle
        while True:
            peak = max(peak, broker.rss_kib() * 1024)
            left = end - time.perf_counter()
            if left <= 0:
                break
            time.sleep(min(0.05, left))
        reply = read_reply(sock, config.parser)
    peak = max(peak, broker.rss_kib() * 1024)
    reply.check(expected_stdout=size)
    growth = (peak - idle_rss) / MiB
    return Row(
        "5",
        f"slow reader: idle {config.slow_idle:g} s while {format_size(size)} is written",
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
