"""``python -m bench``: the command line (see ``--help``) of the benchmarks.

Measures (numbers as in issues 3 and 14):

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
7. the one-shot of (1) through the HTTP gateway, on one keep-alive connection —
   reference: the figure of (1);
8. a run-as rule (``user``, ``cwd``, ``umask``, two rlimits) on ``true`` — the extra
   time per run over a plain spawn on the same broker (needs root).

Rows 1-4 and 6 also run against the C sockexec 3.1.1 (:mod:`bench.reference`),
interleaved with ours, unless ``--no-reference`` (``--tiny``: only with
``--reference``). Limits are measured interleaved with our runs too (row 1: alternate
one-second slices; rows 3-4: one limit run after each of ours), so that a change in
the load of a shared machine hits both alike; the CPU column says how busy it was.
Clients connect the way nginx does, without blocking: a full listen backlog is an
immediate ``EAGAIN``, counted as an error (SPEC §5: the broker must keep accepting).

Correctness is checked on every session of ours (exit status 0, exact byte counts);
the exit status is 1 when a check failed, never because a target was missed nor
because the C sockexec failed (its failures are counted in its column). Profiles of
the broker per measure: ``--profile DIR`` (needs ``py-spy``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import IO

from . import reference
from .config import MEASURES, PRESETS, REFERENCE_MEASURES, RESULTS_MD, ROOT, Config, parse_size
from .report import machine_facts, render_text, write_results
from .runner import Bench


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark the sockexec_py broker against the machine's limits "
        "and the C sockexec.",
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
    ref = parser.add_mutually_exclusive_group()
    ref.add_argument(
        "--reference",
        action="store_true",
        default=None,
        help="run rows 1-4 and 6 against the C sockexec too (default, except with --tiny): "
        "$SOCKEXEC_REF, or one built once by ../shared/reference/build-sockexec.sh",
    )
    ref.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="do not run the C sockexec",
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


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench") -> int:
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
    err: IO[str] = sys.stderr

    def log(message: str) -> None:
        err.write(f"bench: {message}\n")
        err.flush()

    wanted = not args.tiny if args.reference is None else args.reference
    ref = None
    if wanted and only & set(REFERENCE_MEASURES):
        ref = reference.locate()
        log(f"C sockexec: {ref.binary or 'not available'} ({ref.origin})")
    facts = machine_facts(ref)
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
            reference=ref,
        )
        rows = bench.run()
    notes = bench.notes
    if ref is not None and ref.binary is None:
        notes.insert(0, f"C sockexec not measured: {ref.origin}")
    sys.stdout.write(f"\n{command}\n{facts['date']} | nproc {facts['nproc']} | ")
    sys.stdout.write(f"Python {facts['python']} | load {facts['load average']}\n\n")
    sys.stdout.write(render_text(rows, notes))
    sys.stdout.flush()
    if args.json is not None:
        payload = {
            "command": command,
            "facts": facts,
            "config": asdict(config),
            "rows": [asdict(r) for r in rows],
            "notes": notes,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.results is not None:
        write_results(args.results, command, facts, config, rows, notes)
        log(f"wrote {args.results}")
    failed = [r.key for r in rows if not r.ok]
    if failed:
        log(f"correctness checks failed in measure(s) {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
