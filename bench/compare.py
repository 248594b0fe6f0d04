"""A/B comparison of two brokers: ``python -m bench.compare BASE_DIR [NEW_DIR]``.

Runs the chosen measures of ``python -m bench`` alternately against the
``sockexec_py`` found in each directory (a ``git worktree`` of the base commit, say),
several rounds (base first, then new first, and so on: use an even number), and prints
the median of each measure's figure per broker. Alternating runs share the machine's
state, so a change is told from the noise of a shared VM better than by two separate
tables. The benchmark's own clients and limits come from
this checkout for both, so the base checkout's own ``bench/`` (old or new) is never
run; only its ``python -m sockexec_py`` (and gateway) are. The C sockexec's column is
left out (``--no-reference``) unless the flags after ``--`` say ``--reference``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The figure compared for each measure, and its unit.
FIGURES = {
    "1": ("runs_per_s", "runs/s"),
    "2": ("runs_per_s", "runs/s"),
    "3": ("mib_per_s", "MiB/s"),
    "4": ("mib_per_s", "MiB/s"),
    "5": ("growth_mib", "MiB RSS growth"),
    "6": ("peak_rss_mib", "MiB peak RSS"),
    "7": ("rate", "requests/s"),
    "8": ("extra_p50_ms", "ms extra per run-as run (p50)"),
}
CPU_FIELD = "cpu_broker"
#: The units of a rate of sessions: the broker's CPU per session is its CPU over it.
RATES = ("runs/s", "requests/s")


def run_once(pythonpath: Path, only: str, extra: Sequence[str]) -> dict[str, dict[str, float]]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "bench", "--only", only, "--json", out.name]
        cmd += ["--broker-pythonpath", str(pythonpath), *extra]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        rows = json.loads(Path(out.name).read_text())["rows"]
    return {row["key"]: row["data"] for row in rows if row["data"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("base", type=Path, help="directory holding the base sockexec_py")
    parser.add_argument("new", type=Path, nargs="?", default=ROOT, help="(default: this one)")
    parser.add_argument("--only", default="1,3,4", help="measures to compare (1,3,4)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each broker (5)")
    parser.usage = f"{parser.prog} [-h] [--only ONLY] [--rounds N] BASE [NEW] [-- BENCH_FLAGS...]"
    parser.epilog = "Flags after -- go to python -m bench (default: --quick)."
    # Split at "--" here: argparse gives an optional positional before a "*" one nothing
    # and then refuses what follows "--".
    args_list = list(sys.argv[1:] if argv is None else argv)
    cut = args_list.index("--") if "--" in args_list else len(args_list)
    args = parser.parse_args(args_list[:cut])
    extra = args_list[cut + 1 :] or ["--quick"]
    if "--reference" not in extra:
        extra = [*extra, "--no-reference"]
    samples: dict[str, dict[str, list[dict[str, float]]]] = {"base": {}, "new": {}}
    for round_number in range(args.rounds):
        # Base first in even rounds, new first in odd ones, so that whatever the order
        # does (the previous run's page cache, the VM's CPU credit) favours neither.
        order = [("base", args.base), ("new", args.new)]
        for label, path in order if round_number % 2 == 0 else order[::-1]:
            for key, data in run_once(path.resolve(), args.only, extra).items():
                samples[label].setdefault(key, []).append(data)
        sys.stderr.write(f"compare: round {round_number + 1}/{args.rounds} done\n")
    print(
        f"medians of {args.rounds} alternating runs, order swapped each round "
        f"({' '.join(extra)}); base={args.base}"
    )
    print(
        "| # | figure | base | new | new/base | broker CPU % base -> new "
        "| broker CPU ms/session base -> new | p50/p99 ms base -> new |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for key in sorted(samples["new"]):
        field, unit = FIGURES[key]
        medians = {}
        cpus = {}
        per_session = {}  # broker CPU per run or request (rows of a rate of those)
        latency = {}
        for label in ("base", "new"):
            runs = samples[label].get(key, [])
            medians[label] = statistics.median(r[field] for r in runs)
            cpu = [r[CPU_FIELD] for r in runs if CPU_FIELD in r]
            cpus[label] = f"{statistics.median(cpu) * 100:.0f}" if cpu else "-"
            per = [
                r[CPU_FIELD] / r[field] * 1000
                for r in runs
                if unit in RATES and CPU_FIELD in r and r[field]
            ]
            per_session[label] = f"{statistics.median(per):.3f}" if per else "-"
            p50 = [r["p50_ms"] for r in runs if "p50_ms" in r]
            p99 = [r["p99_ms"] for r in runs if "p99_ms" in r]
            latency[label] = (
                f"{statistics.median(p50):.2f}/{statistics.median(p99):.2f}" if p50 and p99 else "-"
            )
        ratio = medians["new"] / medians["base"] if medians["base"] else float("nan")
        print(
            f"| {key} | {unit} | {medians['base']:.1f} | {medians['new']:.1f} | "
            f"{ratio:.2f}x | {cpus['base']} -> {cpus['new']} | "
            f"{per_session['base']} -> {per_session['new']} | "
            f"{latency['base']} -> {latency['new']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
