"""Row 6: many concurrent ``sleep`` sessions on a fresh broker with ``-m 1000``.

Every session must succeed on ours, and the broker's peak RSS is the figure. The C
sockexec runs the same sessions after ours, on a fresh daemon with the same flags: it
accepts and drops clients past what it can serve, and its backlog fills, so the row
says how many of its sessions succeeded instead of failing the run.
"""

from __future__ import annotations

from collections.abc import Callable

from .client import ReplyParser, SessionParser, reference_parser, request_for
from .config import TARGETS, MiB
from .many import CpuMeter, ManyResult, cpu_text, raise_fd_limit, run_many
from .measure import Context, Daemon, Row, verdict
from .reference import REFERENCE_TIMEOUT, ReferenceDaemon, ReferenceSide

_DROPPED = "Unable to accept client"  # the C sockexec's warning when it drops one


def _sessions_peak_rss(
    daemon: Daemon,
    request: bytes,
    count: int,
    give_up_after: float = 120.0,
    parser_factory: Callable[[], ReplyParser] = SessionParser,
) -> tuple[ManyResult, int, int]:
    """``count`` sessions at once; (result, idle RSS, peak RSS) in bytes."""
    idle_rss = daemon.rss_kib() * 1024
    peak = idle_rss

    def sample() -> None:
        nonlocal peak
        peak = max(peak, daemon.rss_kib() * 1024)

    many = run_many(
        str(daemon.path),
        request,
        concurrency=count,
        total=count,
        on_tick=sample,
        give_up_after=give_up_after,
        parser_factory=parser_factory,
    )
    return many, idle_rss, max(peak, daemon.rss_kib("VmHWM") * 1024)


def sessions(ctx: Context, broker: Daemon, ref: ReferenceDaemon | None) -> Row:
    """Row 6: ``sessions`` at once on ours, then (when it runs) on the C sockexec."""
    config = ctx.config
    count = config.sessions
    raise_fd_limit(count + 64)
    request = request_for(["sleep", f"{config.session_sleep:g}"])
    cpu = CpuMeter(broker).resume()
    many, idle_rss, peak = _sessions_peak_rss(broker, request, count)
    shares = cpu.shares()
    peak_mib = peak / MiB
    all_ok = many.ok == count and many.errors == 0
    met = all_ok and peak_mib <= TARGETS["6"]
    ours = (
        f"{many.ok}/{count} ok in {many.elapsed:.2f} s, peak RSS {peak_mib:.1f} MiB "
        f"(idle {idle_rss / MiB:.1f})"
    )
    if many.errors:
        ours += f"; errors: {many.errors_text()}"
    row = Row(
        "6",
        f"{count} concurrent `sleep {config.session_sleep:g}` with -m 1000",
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
    if ref is not None:
        _add_reference(row, ref, request, count, many.ok, config.session_sleep)
    return row


def _add_reference(
    row: Row, daemon: ReferenceDaemon, request: bytes, count: int, ours_ok: int, sleep: float
) -> None:
    """The same sessions on the C sockexec: successes counted, its peak RSS."""
    side = ReferenceSide(daemon)
    dropped_before = daemon.log_count(_DROPPED)
    figures: dict[str, float] = {}

    def step(daemon: ReferenceDaemon) -> ManyResult:
        many, idle, peak = _sessions_peak_rss(
            daemon,
            request,
            count,
            give_up_after=sleep + REFERENCE_TIMEOUT,
            parser_factory=reference_parser,
        )
        figures.update(idle=idle, peak=peak)
        return many

    side.run(step)
    dropped = daemon.log_count(_DROPPED) - dropped_before
    ok = side.sessions.ok
    text = f"{ok}/{count} ok"
    if "peak" in figures:
        text += f", peak RSS {figures['peak'] / MiB:.1f} MiB (idle {figures['idle'] / MiB:.1f})"
    if dropped:
        text += f"; {dropped} dropped at accept (its log)"
    row.ref = side.cell(text)
    row.vs_ref = f"{ours_ok} vs {ok} ok"
    row.data |= side.data() | {
        "ref_succeeded": ok,
        "ref_dropped_at_accept": dropped,
        "ref_peak_rss_mib": figures.get("peak", 0.0) / MiB,
        "ref_idle_rss_mib": figures.get("idle", 0.0) / MiB,
    }
