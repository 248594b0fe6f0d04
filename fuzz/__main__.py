"""``python -m fuzz``: fuzz a broker of this checkout, then check it is back to where
it began. Exit status 1 when a session or the final check found a problem."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from sockexec_py.testing import BrokerProcess

from .broker import RunReport, Verdict, run

#: RSS the broker may keep after a run (allocator slack, pools), in KiB.
RSS_MARGIN_KIB = 16 << 10


def baseline(broker: BrokerProcess) -> tuple[int, int]:
    """(open fds, RSS in KiB) once the broker has finished with every connection."""
    broker.wait_idle()
    return broker.open_fds(), broker.rss_kib()


def back_to_baseline(broker: BrokerProcess, before: tuple[int, int]) -> list[str]:
    """What differs from ``before``: fds, children, RSS (empty when all is back)."""
    broker.check_alive()
    fds, rss = baseline(broker)
    problems = []
    if fds != before[0]:
        problems.append(f"open fds {before[0]} -> {fds}")
    if broker.children():
        problems.append(f"children left: {broker.children()}")
    if rss - before[1] > RSS_MARGIN_KIB:
        problems.append(f"RSS {before[1]} -> {rss} KiB")
    return problems


def fuzz(workdir: Path, sessions: int, seed: int, only: int | None = None) -> RunReport:
    """Start a broker, fuzz it, and add the final check's findings to the report."""
    # Mutated arguments may make the programs write files (`echo err >e2`): they land
    # in the work directory, not in the checkout.
    broker_args = ["-t", "2", "-k", "1", "-m", "64"]
    with BrokerProcess(workdir / "fuzz.sock", broker_args, cwd=workdir) as broker:
        before = baseline(broker)

        def progress(done: int) -> None:
            sys.stderr.write(f"fuzz: {done} sessions\n")

        report = run(broker, sessions, seed, only=only, progress=progress)
        for problem in back_to_baseline(broker, before):
            report.problems.append(_final(problem))
        log = broker.log()
        if "Traceback" in log or "internal error" in log:
            report.problems.append(_final(f"the broker logged an error: {log[-2000:]}"))
    return report


def _final(problem: str) -> Verdict:
    return Verdict(-1, "after the run", problem)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=None, help="(random; printed)")
    parser.add_argument("--only", type=int, default=None, help="replay one session")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as workdir:
        report = fuzz(Path(workdir), args.sessions, seed, args.only)
    print(
        f"fuzz: seed {seed}: {report.sessions} sessions, {report.replies} replies checked, "
        f"{len(report.problems)} problem(s) in {time.monotonic() - started:.0f} s"
    )
    for verdict in report.problems[:20]:
        print(f"  session {verdict.number} ({verdict.description}): {verdict.problem}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
