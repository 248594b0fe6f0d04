"""Rows 1 and 2: round trips of ``true``, one after the other and from N clients.

Row 1's limit is ``os.posix_spawn`` + ``waitpid`` of ``true`` in a loop in this
process; row 2's reference is row 1's figure. Both rows run in slices of about a
second, alternately with the limit (row 1) and with the C sockexec (when it runs), so
that a change in the load of the shared machine hits every figure alike.

Our replies are parsed by the project's ``ClientSession`` (every check of the
protocol), the C sockexec's by the lean counting parser (its exit pair may come before
its output): on a ``true`` reply the difference is ~3 µs of client CPU per run, under
0.5 % of a round trip, against ours.
"""

from __future__ import annotations

import errno
import os
import time

from .client import BenchError, one_shot, reference_parser, request_for
from .config import TARGETS
from .many import CpuMeter, ManyResult, cpu_text, run_many
from .measure import Context, Daemon, Row, ms, quantile, verdict
from .reference import REFERENCE_TIMEOUT, ReferenceDaemon, ReferenceSide


def spawn_loop(true_path: str, seconds: float) -> tuple[int, float]:
    """``os.posix_spawn`` + ``waitpid`` of ``true`` for ``seconds``: (runs, elapsed)."""
    argv = ["true"]
    env = dict(os.environ)
    runs = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        _, status = os.waitpid(os.posix_spawn(true_path, argv, env), 0)
        if status != 0:
            raise BenchError(f"true exited with status {status}")
        runs += 1
        now = time.perf_counter()
        if now >= deadline:
            return runs, now - start


def sequential_round_trips(
    path: str, request: bytes, seconds: float, *, reference: bool = False
) -> ManyResult:
    """Round trips one after the other for ``seconds``. A failed session raises,
    except against the C sockexec (``reference``), where it is counted."""
    result = ManyResult()
    start = time.perf_counter()
    deadline = start + seconds
    lost = 0.0  # time spent waiting on sessions given up on (C only)
    while True:
        t0 = time.perf_counter()
        try:
            if reference:
                one_shot(path, request, reference_parser, REFERENCE_TIMEOUT).check()
            else:
                one_shot(path, request).check()
        except TimeoutError as exc:
            if not reference:
                raise
            result.fail(str(exc) or "timed out", "no reply")
            lost += time.perf_counter() - t0
        except (BenchError, OSError) as exc:
            if not reference:
                raise
            name = errno.errorcode.get(exc.errno or 0, "?") if isinstance(exc, OSError) else ""
            result.fail(str(exc), f"connect {name}" if name else "session")
            if name in ("ECONNREFUSED", "ENOENT"):
                break  # it died: the next slice starts it again
        else:
            result.ok += 1
            result.latencies.append(time.perf_counter() - t0)
        if time.perf_counter() >= deadline:
            break
    result.elapsed = time.perf_counter() - start - lost
    return result


def _versus(rate: float, ref_rate: float, ours_p50: float, ref_p50: float) -> str:
    return f"{rate / ref_rate:.2f}x (p50 {ms(ours_p50)} vs {ms(ref_p50)})" if ref_rate else "n/a"


def sequential(ctx: Context, broker: Daemon, ref: ReferenceDaemon | None) -> Row:
    """Row 1: round trips one after the other, in slices of about a second, each
    followed by a slice of the spawn limit and one of the C sockexec."""
    config = ctx.config
    request = request_for(["true"])
    path = str(broker.path)
    for _ in range(20):  # warm up both
        one_shot(path, request).check()
    spawn_loop(ctx.true_path, 0.0)
    slices = max(1, round(config.seq_seconds))
    ours = ManyResult()
    limit_runs, limit_elapsed = 0, 0.0
    cpu = CpuMeter(broker)
    side = ReferenceSide(ref) if ref is not None else None
    if side is not None:
        side.warm_up(request)
    for _ in range(slices):
        cpu.resume()
        ours.add(sequential_round_trips(path, request, config.seq_seconds / slices))
        cpu.pause()
        runs, spent = spawn_loop(ctx.true_path, config.limit_seconds / slices)
        limit_runs += runs
        limit_elapsed += spent
        if side is not None:
            side.run(
                lambda daemon: sequential_round_trips(
                    str(daemon.path), request, config.seq_seconds / slices, reference=True
                )
            )
    shares = cpu.shares()
    rate = ours.ok / ours.elapsed
    ctx.seq_rate = rate
    limit = limit_runs / limit_elapsed
    ours.latencies.sort()
    p50, p99 = quantile(ours.latencies, 0.5), quantile(ours.latencies, 0.99)
    ratio = rate / limit
    row = Row(
        "1",
        "sequential round trip of `true`",
        ours=f"{rate:.0f} runs/s (p50 {ms(p50)}, p99 {ms(p99)})",
        limit=f"{limit:.0f} runs/s (posix_spawn+waitpid loop)",
        ratio=f"{ratio:.2f}x",
        target=f">= {TARGETS['1']:.2f}x",
        result=verdict(ratio >= TARGETS["1"]),
        cpu=cpu_text(shares),
        data={
            "runs": ours.ok,
            "runs_per_s": rate,
            "p50_ms": p50 * 1000,
            "p99_ms": p99 * 1000,
            "limit_runs_per_s": limit,
            "ratio": ratio,
            **shares,
        },
    )
    if side is not None:
        ref_p50, ref_p99 = side.latency(0.5), side.latency(0.99)
        figure = f"{side.rate:.0f} runs/s (p50 {ms(ref_p50)}, p99 {ms(ref_p99)})"
        row.ref = side.cell(figure if side.sessions.ok else "no run completed")
        row.vs_ref = _versus(rate, side.rate, p50, ref_p50)
        if side.rate:
            row.vs_ref += f", p99 {ms(p99)} vs {ms(ref_p99)}"
        row.data |= side.data() | {"vs_ref": rate / side.rate if side.rate else None}
    return row


def concurrent(ctx: Context, broker: Daemon, ref: ReferenceDaemon | None) -> Row:
    """Row 2: ``conc_clients`` clients at once, in slices alternating with the C's."""
    config = ctx.config
    clients = config.conc_clients
    request = request_for(["true"])
    slices = max(1, round(config.conc_seconds))
    seconds = config.conc_seconds / slices
    many = ManyResult()
    cpu = CpuMeter(broker)
    side = ReferenceSide(ref) if ref is not None else None
    for _ in range(slices):
        cpu.resume()
        many.add(run_many(str(broker.path), request, concurrency=clients, duration=seconds))
        cpu.pause()
        if side is not None:
            side.run(
                lambda daemon: run_many(
                    str(daemon.path),
                    request,
                    concurrency=clients,
                    duration=seconds,
                    give_up_after=REFERENCE_TIMEOUT,
                    parser_factory=reference_parser,
                )
            )
    shares = cpu.shares()
    rate = many.ok / many.elapsed
    reference = ctx.seq_rate
    ratio = rate / reference if reference else None
    met = many.errors == 0 and ratio is not None and ratio >= TARGETS["2"]
    many.latencies.sort()
    p50 = quantile(many.latencies, 0.5)
    ours = f"{rate:.0f} runs/s, {many.errors} errors (p50 {ms(p50)}, {many.ok} runs)"
    if many.errors:
        ours += f"; errors: {many.errors_text()}"
    row = Row(
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
    if side is not None:
        ref_p50 = side.latency(0.5)
        figure = f"{side.rate:.0f} runs/s (p50 {ms(ref_p50)}, {side.sessions.ok} runs)"
        row.ref = side.cell(figure if side.sessions.ok else "no run completed")
        row.vs_ref = _versus(rate, side.rate, p50, ref_p50)
        row.data |= side.data() | {"vs_ref": rate / side.rate if side.rate else None}
    return row
