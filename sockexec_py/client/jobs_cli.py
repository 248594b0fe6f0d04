"""``sockexec-client jobs submit|list|show|logs|cancel|cancel-step|wait|monitor``:
jobs of a gateway from the shell. The gateway is ``-u URL`` or ``$SOCKEXEC_URL``;
the token ``$SOCKEXEC_TOKEN``.

Output for scripts: ``submit`` prints the id alone, ``list`` one line per job
(id, state, name, exit, created), ``show``, ``cancel`` and ``cancel-step`` the job
as JSON, ``logs`` the output itself (stdout to stdout, stderr to stderr),
``monitor`` one JSON line per event, for ever (it reconnects, resuming where it
was). ``wait`` exits with the job's status, as ``sockexec-client`` does for a run:
its exit code, 128+n after a signal.
Errors: one line and 111 (gateway unreachable, job unknown, refused), 100 for usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from sockexec_py._cli import EXIT_SYSTEM, EXIT_USAGE, UsageParser, number
from sockexec_py.errors import SockexecError
from sockexec_py.events import Output

from ._common import signal_name, signal_number
from .jobs import Job, JobStatus, list_jobs, monitor, submit

PROG = "sockexec-client jobs"


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


class _CommandParser(UsageParser):
    """A subcommand's parser: its errors are one line too."""

    def __init__(self, prog: str, **kwargs: object) -> None:
        super().__init__(prog, f"see {PROG} --help", **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(PROG, f"see {PROG} --help", description="Jobs of a sockexec gateway.")
    parser.add_argument("-u", "--url", help="the gateway (default: $SOCKEXEC_URL)")
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=_CommandParser,
    )

    submit = commands.add_parser("submit", help="submit a job; prints its id")
    submit.add_argument("--name", help="its queue (default: the program's name)")
    submit.add_argument("--start-at", help="RFC 3339 date-time or Unix time")
    submit.add_argument("--timeout", type=number(float, 0, "timeout", above=True))
    submit.add_argument("--label", type=_label, action="append", default=[], metavar="K=V")
    submit.add_argument("--stdin", action="store_true", help="send our stdin (at most 1 MiB)")
    submit.add_argument("--no-keep", action="store_true", help="delete it once it succeeded")
    submit.add_argument("--callback", metavar="URL", help="POST its status there when it ends")
    submit.add_argument(
        "--steps",
        metavar="FILE",
        help='a task: a JSON file {"mode": ..., "steps": [{"name", "argv", "depends_on"}...]} '
        "(- for stdin), instead of PROGRAM",
    )
    submit.add_argument("argv", nargs=argparse.REMAINDER, metavar="PROGRAM [ARGS...]")

    listing = commands.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--state", action="append", default=[])
    listing.add_argument("--name")
    listing.add_argument("--label", type=_label, action="append", default=[], metavar="K=V")
    listing.add_argument("--limit", type=number(int, 1, "limit"), default=50)

    for command, text in (("show", "the job as JSON"), ("cancel", "cancel the job")):
        commands.add_parser(command, help=text).add_argument("id")
    cancel_step = commands.add_parser("cancel-step", help="cancel one step of a task")
    cancel_step.add_argument("id")
    cancel_step.add_argument("step")
    watch = commands.add_parser("monitor", help="job events as JSON lines, for ever")
    watch.add_argument("name", nargs="?", help="only this job name's events")
    watch.add_argument("--since", type=number(int, 0, "since"), help="replay after this id")
    watch.add_argument("--types", help="only these event types, e.g. finished or started,finished")
    logs = commands.add_parser("logs", help="the job's output")
    logs.add_argument("-f", "--follow", action="store_true", help="until the job ends")
    logs.add_argument("--stream", choices=("stdout", "stderr", "both"), default="both")
    logs.add_argument("--step", help="a task's step")
    logs.add_argument("id")
    wait = commands.add_parser("wait", help="wait for the job; exit with its status")
    wait.add_argument("--timeout", type=number(float, 0, "timeout", above=True))
    wait.add_argument("id")
    return parser


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _exit_status(status: JobStatus) -> int:
    """A finished job's status as a command's: its exit code, 128+n after a signal;
    111 with a note when it has neither (cancelled before it ran, lost)."""
    where = f"{PROG}: job {status.id} {status.state}"
    if status.termsig is not None:
        signum = signal_number(status.termsig)
        sys.stderr.write(f"{where}: killed by signal {signal_name(status.termsig)}\n")
        return 128 + signum if signum is not None else EXIT_SYSTEM
    if status.exitcode is None:
        sys.stderr.write(f"{where}: {status.reason or 'no exit status'}\n")
        return EXIT_SYSTEM
    return status.exitcode


def _run(args: argparse.Namespace, url: str) -> int:
    if args.command == "submit":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        task = _read_steps(args.steps) if args.steps else None
        if bool(argv) == bool(task):
            sys.stderr.write(f"{PROG}: usage error: submit needs a PROGRAM or --steps FILE\n")
            return EXIT_USAGE
        job = submit(
            url,
            argv or None,
            steps=task["steps"] if task else None,
            mode=task.get("mode") if task else None,
            callback=args.callback,
            stdin=sys.stdin.buffer.read() if args.stdin else None,
            name=args.name,
            start_at=float(args.start_at) if _is_number(args.start_at) else args.start_at,
            timeout=args.timeout,
            labels=dict(args.label),
            keep=not args.no_keep,
        )
        print(job.id)
        return 0
    if args.command == "list":
        page = list_jobs(
            url, state=args.state, name=args.name, labels=dict(args.label), limit=args.limit
        )
        for status in page.jobs:
            ended = (
                f"exit {status.exitcode}"
                if status.exitcode is not None
                else f"signal {status.termsig}"
                if status.termsig
                else "-"
            )
            print(f"{status.id}  {status.state:<9}  {status.name}  {ended}  {status.created_at}")
        return 0
    if args.command == "monitor":
        for event in monitor(url, args.name, since=args.since, types=args.types):
            print(json.dumps(dict(event.data)), flush=True)
        return 0
    job = Job(url, args.id)
    if args.command == "cancel-step":
        print(json.dumps(dataclasses.asdict(job.cancel_step(args.step)), indent=2))
        return 0
    if args.command in ("show", "cancel"):
        status = job.status() if args.command == "show" else job.cancel()
        print(json.dumps(dataclasses.asdict(status), indent=2))
        return 0
    if args.command == "logs":
        for frame in job.output(follow=args.follow, stream=args.stream, step=args.step):
            if isinstance(frame, Output):
                _write(1 if frame.kind == "stdout" else 2, frame.data)
        return 0
    return _exit_status(job.wait(args.timeout))


def _read_steps(path: str) -> dict[str, Any]:
    """A task file: ``{"mode"?, "steps": [...]}`` or just the list of steps."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path) as f:
                text = f.read()
        task = json.loads(text)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--steps {path}: {exc}") from None
    if isinstance(task, list):
        task = {"steps": task}
    if not isinstance(task, dict) or not isinstance(task.get("steps"), list):
        raise ValueError(f'--steps {path}: expected {{"steps": [...]}} or a list of steps')
    return task


def _is_number(text: str | None) -> bool:
    try:
        float(text or "x")
    except ValueError:
        return False
    return True


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    url = args.url or os.environ.get("SOCKEXEC_URL")
    if not url:
        sys.stderr.write(f"{PROG}: usage error: give the gateway with -u URL or $SOCKEXEC_URL\n")
        return EXIT_USAGE
    try:
        return _run(args, url)
    except (SockexecError, ValueError, ImportError) as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return EXIT_SYSTEM
    except BrokenPipeError:
        return 128 + 13
    except KeyboardInterrupt:
        return 128 + 2
