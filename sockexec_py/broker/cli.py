"""``sockexec-py``: the command line, a drop-in for the C ``sockexec``.

Exit statuses follow skalibs: 0 after a clean shutdown, 100 for a usage error, 111
for a system error (socket busy or unusable).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import sys
from collections.abc import Sequence

import trio

from sockexec_py._cli import EXIT_SYSTEM, EXIT_USAGE, UsageParser, number
from sockexec_py._version import __version__
from sockexec_py.policy import ALLOW_ALL, AllowAll, Policy, PolicyError, describe, load_policy

from .config import ServerConfig
from .listener import ListenerError, notify_ready, open_listener, systemd_listen_fd
from .server import Server

PROG = "sockexec-py"
USAGE = (
    f"{PROG} [-v] [-d] [-q backlog] [-M mode] [-m max_connections] [-t timeout] "
    "[-k kill_timeout] [--policy FILE] /path/to/socket | --check-policy FILE"
)


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"mode must be octal, got {text!r}") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"mode must be within 0000..0777, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        PROG, f"usage: {USAGE}", usage=USAGE, description="A sockexec-compatible exec broker."
    )
    add = parser.add_argument
    add("-v", "--version", action="version", version=f"{PROG} {__version__}")
    add("-d", "--debug", action="store_true", help="log one line per event to stderr")
    add("-q", "--backlog", type=number(int, 1, "backlog"), default=100, help="listen backlog")
    add("-M", "--mode", type=_mode, default=0o660, help="socket permissions, octal (0660)")
    add(
        "-m",
        "--max-connections",
        type=number(int, 1, "max_connections"),
        default=100,
        help="programs running at once (100)",
    )
    add(
        "-t",
        "--timeout",
        type=number(float, 0, "timeout"),
        default=60.0,
        help="seconds a connection may last from accept, 0 = unlimited (60)",
    )
    add(
        "-k",
        "--kill-timeout",
        type=number(float, 1, "kill_timeout"),
        default=10.0,
        help="seconds between TERM and KILL (10)",
    )
    add(
        "--max-queued",
        type=number(int, 0, "max_queued"),
        default=1000,
        help="connections accepted and waiting for a slot (1000)",
    )
    add(
        "--max-frame",
        type=number(int, 1, "max_frame"),
        default=64 << 20,
        help="longest netstring accepted, in bytes (64 MiB)",
    )
    add(
        "--max-args",
        type=number(int, 1, "max_args"),
        default=10_000,
        help="largest argc accepted (10000)",
    )
    add(
        "--max-argv-bytes",
        type=number(int, 1, "max_argv_bytes"),
        default=2 << 20,
        help="total size of the argv, in bytes (2 MiB)",
    )
    add(
        "--drain-timeout",
        type=number(float, 0, "drain_timeout"),
        default=2.0,
        help="seconds to wait for output EOF after the program exits (2)",
    )
    add(
        "--termsig-format",
        choices=("name", "number"),
        default="name",
        help="send termsig as a name (TERM) or a number (15)",
    )
    add(
        "--spool-dir",
        metavar="DIR",
        default=None,
        help="where output a client does not read yet is spilled (the temp dir)",
    )
    add(
        "--max-spool",
        type=number(int, 0, "max_spool"),
        default=64 << 20,
        help="bytes spilled per connection, 0 = never spill (64 MiB)",
    )
    add(
        "--max-spool-total",
        type=number(int, 0, "max_spool_total"),
        default=1 << 30,
        help="bytes spilled across all connections (1 GiB)",
    )
    add(
        "--notify-fd",
        type=number(int, 0, "notify_fd"),
        default=None,
        help="write a newline to this fd once listening (s6 readiness)",
    )
    add(
        "--policy",
        metavar="FILE",
        default=None,
        help="enforce this execution policy (TOML); SIGHUP reloads it",
    )
    add(
        "--check-policy",
        metavar="FILE",
        default=None,
        help="validate a policy file, print what it allows, and exit (0 valid, 1 not)",
    )
    add("socket", nargs="?", help="path of the Unix socket to listen on")
    return parser


def _prepare_process() -> None:
    """Make the process fit for spawning: stdio open, fds not leaked, room for fds."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            # A closed 0/1/2 would let a pipe take its number and confuse dup2.
            os.open(os.devnull, os.O_RDWR)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def close_on_exec_inherited(keep: set[int]) -> None:
    """Mark every inherited fd above 2 close-on-exec so no program inherits it."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


def _check_policy(path: str) -> int:
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        sys.stderr.write(f"{PROG}: invalid policy: {exc}\n")
        return 1
    sys.stdout.write("".join(f"{line}\n" for line in describe(policy)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # before anything opens an fd: fd 3 must be systemd's, if it says so
        inherited = systemd_listen_fd()
    except ListenerError as exc:
        sys.stderr.write(f"{PROG}: fatal: {exc}\n")
        return EXIT_SYSTEM
    if args.check_policy is not None:
        return _check_policy(args.check_policy)
    if args.socket is None:
        parser.error("the socket path is required")
    policy: Policy | AllowAll = ALLOW_ALL
    if args.policy is not None:
        try:
            policy = load_policy(args.policy)
        except PolicyError as exc:
            sys.stderr.write(f"{PROG}: fatal: invalid policy: {exc}\n")
            return EXIT_USAGE
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.debug else logging.INFO,
        format=f"{PROG}: %(message)s",
    )
    config = ServerConfig(
        socket_path=args.socket,
        backlog=args.backlog,
        mode=args.mode,
        max_connections=args.max_connections,
        timeout=args.timeout,
        kill_timeout=args.kill_timeout,
        debug=args.debug,
        max_queued=args.max_queued,
        max_frame=args.max_frame,
        max_args=args.max_args,
        max_argv_bytes=args.max_argv_bytes,
        drain_timeout=args.drain_timeout,
        termsig_format=args.termsig_format,
        policy_path=args.policy,
        spool_dir=args.spool_dir,
        max_spool=args.max_spool,
        max_spool_total=args.max_spool_total,
    )
    _prepare_process()
    close_on_exec_inherited(keep=set())
    try:
        listener, unlink_path = open_listener(
            config.socket_path, mode=config.mode, backlog=config.backlog, inherited=inherited
        )
    except ListenerError as exc:
        sys.stderr.write(f"{PROG}: fatal: {exc}\n")
        return EXIT_SYSTEM
    server = Server(config, listener, unlink_path=unlink_path, reap_orphans=True, policy=policy)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: server.serve(handle_signals=True, task_status=task_status)
            )
            notify_ready(args.notify_fd)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
