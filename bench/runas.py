"""Row 8: what a run-as rule costs per run over a plain spawn (issue 14).

One broker, one policy, two names for ``true``: the plain ``[[allow]] program =
"true"`` and a ``[[command]]`` ``true_runas`` running ``/bin/true`` as ``nobody`` with
a ``cwd``, a ``umask`` and two rlimits (``nofile``, ``cpu``). Sequential round trips
as in row 1, in slices of about a second, plain and run-as alternately; the figure is
the extra time per run of run-as (p50, and mean), target at most 2 ms. Before
measuring, a ``runas_check`` command with the same settings prints what the program
got (uid, umask, cwd, limits): a rule that silently did less would measure nothing.

Needs root (the broker changes uid only as root); the row says so otherwise.
"""

from __future__ import annotations

import contextlib
import pwd
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .client import BenchError, one_shot, request_for
from .config import TARGETS
from .many import CpuMeter, ManyResult, cpu_text
from .measure import Context, Daemon, Row, ms, quantile, verdict
from .roundtrips import sequential_round_trips

NAME = "run-as rule (`user`, `cwd`, `umask`, 2 rlimits) on `true`, over a plain spawn"
USER = "nobody"
UMASK = "027"
RLIMITS = {"nofile": 64, "cpu": 10}
_CHECK = "/usr/bin/id -u; umask; pwd; ulimit -n; ulimit -t"


def _settings(cwd: Path) -> str:
    limits = ", ".join(f"{name} = {value}" for name, value in RLIMITS.items())
    return f'user = "{USER}"\ncwd = "{cwd}"\numask = "{UMASK}"\nrlimits = {{ {limits} }}\n'


@contextlib.contextmanager
def run_as_policy(workdir: Path) -> Iterator[tuple[Path, Path]]:
    """(policy file in ``workdir``, its rules' ``cwd``): the cwd is a directory of its
    own under the system's temporary directory that ``nobody`` can enter (``workdir``
    is private to us). Removed on exit."""
    cwd = Path(tempfile.mkdtemp(prefix="sockexec-bench-runas-"))
    try:
        cwd.chmod(0o755)
        policy = workdir / "runas-policy.toml"
        policy.write_text(
            '[[allow]]\nprogram = "true"\n\n'
            '[[command]]\nname = "true_runas"\nargv = ["/bin/true"]\n'
            + _settings(cwd)
            + '\n[[command]]\nname = "runas_check"\n'
            + f'argv = ["/bin/sh", "-c", "{_CHECK}"]\n'
            + _settings(cwd)
        )
        yield policy, cwd
    finally:
        shutil.rmtree(cwd, ignore_errors=True)


def _check_settings(path: str, cwd: Path) -> None:
    """The run-as command really runs as ``nobody`` with the cwd, umask and limits."""
    reply = one_shot(path, request_for(["runas_check"]))
    reply.check(expected_stdout=None)
    got = reply.stdout_head.decode(errors="replace").split("\n")[:-1]
    expected = [
        str(pwd.getpwnam(USER).pw_uid),
        f"0{UMASK}",
        str(cwd),
        str(RLIMITS["nofile"]),
        str(RLIMITS["cpu"]),
    ]
    if got != expected:
        raise BenchError(f"the run-as rule's program got {got}, expected {expected}")


def not_root_row() -> Row:
    return Row("8", NAME, ours="needs root", result="skipped")


def run_as_cost(ctx: Context, broker: Daemon, cwd: Path) -> Row:
    """Row 8 against a broker started with :func:`run_as_policy`'s file."""
    config = ctx.config
    path = str(broker.path)
    plain_request = request_for(["true"])
    runas_request = request_for(["true_runas"])
    _check_settings(path, cwd)
    for _ in range(5):  # warm up both
        one_shot(path, plain_request).check()
        one_shot(path, runas_request).check()
    slices = max(1, round(config.seq_seconds))
    seconds = config.seq_seconds / slices
    plain, runas = ManyResult(), ManyResult()
    cpu = CpuMeter(broker)
    for _ in range(slices):
        plain.add(sequential_round_trips(path, plain_request, seconds))
        cpu.resume()
        runas.add(sequential_round_trips(path, runas_request, seconds))
        cpu.pause()
    shares = cpu.shares()
    plain.latencies.sort()
    runas.latencies.sort()
    plain_p50, runas_p50 = quantile(plain.latencies, 0.5), quantile(runas.latencies, 0.5)
    extra_p50 = (runas_p50 - plain_p50) * 1000
    extra_mean = (statistics.fmean(runas.latencies) - statistics.fmean(plain.latencies)) * 1000
    plain_rate, runas_rate = plain.ok / plain.elapsed, runas.ok / runas.elapsed
    return Row(
        "8",
        NAME,
        ours=f"+{extra_p50:.2f} ms p50 (+{extra_mean:.2f} ms mean) per run; "
        f"run-as p50 {ms(runas_p50)}, {runas_rate:.0f} runs/s",
        limit=f"plain rule: p50 {ms(plain_p50)}, {plain_rate:.0f} runs/s",
        ratio=f"{runas_rate / plain_rate:.2f}x runs/s",
        target=f"<= {TARGETS['8']:g} ms extra (p50)",
        result=verdict(extra_p50 <= TARGETS["8"]),
        cpu=cpu_text(shares),
        data={
            "runs": runas.ok,
            "plain_runs": plain.ok,
            "extra_p50_ms": extra_p50,
            "extra_mean_ms": extra_mean,
            "runas_p50_ms": runas_p50 * 1000,
            "plain_p50_ms": plain_p50 * 1000,
            "runas_runs_per_s": runas_rate,
            "plain_runs_per_s": plain_rate,
            **shares,
        },
    )
