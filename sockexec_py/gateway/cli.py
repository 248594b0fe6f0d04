"""``sockexec-gateway``: serve the HTTP/WebSocket gateway with Hypercorn's trio worker.

Exit statuses as the broker's: 100 for a usage or configuration error (including a
non-loopback address without tokens), 111 when the address cannot be bound or the
data dir cannot be used (locked by another gateway, unwritable, not ours).
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from collections.abc import Sequence

import trio

from sockexec_py._cli import EXIT_SYSTEM, EXIT_USAGE, UsageParser, number

from .settings import GatewaySettings, JobsSettings

PROG = "sockexec-gateway"


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"--listen takes HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` or plain seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 7d, 12h, 30m, got {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def _name_limit(text: str) -> tuple[str, int]:
    name, sep, limit = text.rpartition("=")
    if not sep or not name or not limit.isdigit() or int(limit) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=N with N >= 1, got {text!r}")
    return name, int(limit)


def _origin(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if scheme not in ("http", "https") or not sep or not rest or "/" in rest.rstrip("/"):
        raise argparse.ArgumentTypeError(
            f"--public-origin takes scheme://host[:port], got {text!r}"
        )
    return f"{scheme}://{rest.rstrip('/')}"


def _allow_rule(text: str) -> str:
    """A ``--callback-allow`` value, checked now (a usage error names it)."""
    from .callback_policy import AllowRule

    try:
        AllowRule.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        PROG, f"see {PROG} --help", description="HTTP/WebSocket gateway to a sockexec_py broker."
    )
    add = parser.add_argument
    add("--socket", required=True, help="the broker's Unix socket")
    add("--listen", type=_listen, default=("127.0.0.1", 8080), help="HOST:PORT (127.0.0.1:8080)")
    add("--token-file", help="bearer tokens, one per line (required off loopback)")
    add(
        "--max-body",
        type=number(int, 1, "max_body"),
        default=8 << 20,
        help="largest request body in bytes (8 MiB)",
    )
    add(
        "--max-output",
        type=number(int, 1, "max_output"),
        default=16 << 20,
        help="largest output (stdout+stderr) of a one-shot request in bytes, 413 past it "
        "(16 MiB; streams are not limited)",
    )
    add(
        "--max-timeout",
        type=number(float, 0, "max_timeout", above=True),
        default=3600.0,
        help="largest timeout a request may ask",
    )
    add(
        "--default-timeout",
        type=number(float, 0, "default_timeout", above=True),
        default=60.0,
        help="timeout of a request without one",
    )
    add("--policy", metavar="FILE", help="the broker's policy: the dashboard lists its commands")
    add(
        "--public-origin",
        type=_origin,
        metavar="URL",
        help="the dashboard's origin as browsers see it (https://jobs.example behind a TLS "
        "proxy); default: the request's scheme and Host",
    )
    add(
        "--no-exec-lane",
        action="store_true",
        help="serve POST /v1/exec through Hypercorn too, not the front door's faster "
        "lane (for comparison; the answers are the same)",
    )
    jobs = parser.add_argument_group("jobs (on with --data-dir)")
    add = jobs.add_argument
    add("--data-dir", help="where jobs are kept (SQLite and output files); jobs are off without")
    add(
        "--jobs-max-running",
        type=number(int, 1, "jobs_max_running"),
        default=8,
        help="jobs running at once in all (8)",
    )
    add(
        "--jobs-limit",
        type=_name_limit,
        action="append",
        default=[],
        metavar="NAME=N",
        help="jobs of NAME running at once (repeatable; default 1 per name)",
    )
    add(
        "--jobs-max-queue",
        type=number(int, 1, "jobs_max_queue"),
        default=1000,
        help="waiting jobs per name, 429 past it (1000)",
    )
    add(
        "--job-output-max",
        type=number(int, 1, "job_output_max"),
        default=64 << 20,
        help="output stored per job in bytes, then truncated with a marker (64 MiB)",
    )
    add(
        "--jobs-keep",
        type=_duration,
        default=7 * 86400.0,
        help="purge finished jobs this long after they ended (7d; s, m, h, d, w)",
    )
    add(
        "--jobs-keep-max",
        type=number(int, 1, "jobs_keep_max"),
        default=None,
        help="keep at most this many finished jobs (oldest purged first)",
    )
    add(
        "--monitor-queue",
        type=number(int, 1, "monitor_queue"),
        default=4096,
        help="events a monitor may have waiting before it is dropped (4096)",
    )
    add(
        "--monitor-pace",
        type=number(float, 0, "monitor_pace"),
        default=250e-6,
        metavar="SECONDS",
        help="a batch=1 monitor that reached the ASGI route (its upgrade came after "
        "another request on its connection) sends at most one message every (monitors x "
        "SECONDS), leaving the gateway time for its other work (0.00025; 0: no pause)",
    )
    hooks = parser.add_argument_group("callbacks (README: Callbacks)")
    add = hooks.add_argument
    add(
        "--callback-allow",
        type=_allow_rule,
        action="append",
        default=[],
        metavar="[CLASSES=]PREFIX",
        help="callback URLs must start with PREFIX (repeatable; none: callbacks refused); "
        "CLASSES (loopback,private,link-local) lets it reach such addresses",
    )
    add("--callback-secret-file", help="the HMAC key callbacks are signed with")
    add(
        "--callback-timeout",
        type=number(float, 0, "callback_timeout", above=True),
        default=10.0,
        help="seconds one attempt may take (10)",
    )
    add(
        "--callback-attempts",
        type=number(int, 1, "callback_attempts"),
        default=6,
        help="attempts per callback at most (6)",
    )
    add(
        "--callback-backoff",
        type=number(float, 0, "callback_backoff", above=True),
        default=1.0,
        help="seconds before the first retry, doubling after each (1, at most 300)",
    )
    add(
        "--callback-deadline",
        type=_duration,
        default=3600.0,
        help="no attempt later than this after the job ended (1h)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from hypercorn.config import Config

        from sockexec_py.jobs import JobError

        from .app import Gateway
        from .auth import TokenFileError
        from .frontdoor import serve
    except ModuleNotFoundError as exc:  # installed without the [gateway] extra
        sys.stderr.write(
            f"{PROG}: the gateway needs the package {exc.name}: "
            "pip install 'sockexec_py[gateway]'\n"
        )
        return EXIT_SYSTEM
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=f"{PROG}: %(message)s")
    host, port = args.listen
    settings = GatewaySettings(
        socket_path=args.socket,
        host=host,
        port=port,
        token_file=args.token_file,
        max_body=args.max_body,
        max_output=args.max_output,
        max_timeout=args.max_timeout,
        default_timeout=min(args.default_timeout, args.max_timeout),
        policy_file=args.policy,
        public_origin=args.public_origin,
        jobs=None
        if args.data_dir is None
        else JobsSettings(
            data_dir=args.data_dir,
            max_running=args.jobs_max_running,
            limits=dict(args.jobs_limit),
            max_queue=args.jobs_max_queue,
            output_max=args.job_output_max,
            keep_for=args.jobs_keep,
            keep_max=args.jobs_keep_max,
            callback_allow=tuple(args.callback_allow),
            callback_secret_file=args.callback_secret_file,
            callback_timeout=args.callback_timeout,
            callback_attempts=args.callback_attempts,
            callback_backoff=args.callback_backoff,
            callback_deadline=args.callback_deadline,
            monitor_queue=args.monitor_queue,
            monitor_pace=args.monitor_pace,
        ),
    )
    if args.callback_allow and not args.callback_secret_file:
        sys.stderr.write(f"{PROG}: usage error: --callback-allow needs --callback-secret-file\n")
        return EXIT_USAGE
    if args.callback_secret_file:
        from .callbacks import secret_file

        try:
            secret_file(args.callback_secret_file)
        except ValueError as exc:
            sys.stderr.write(f"{PROG}: {exc}\n")
            return EXIT_USAGE
    if not settings.loopback and settings.token_file is None:
        sys.stderr.write(
            f"{PROG}: refusing to listen on {host} without --token-file "
            "(anyone who can reach it could run programs)\n"
        )
        return EXIT_USAGE
    try:
        gateway = Gateway(settings)
    except TokenFileError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return EXIT_USAGE

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = "-"
    config.graceful_timeout = 5

    async def run() -> None:
        async with gateway.prepared(), trio.open_nursery() as nursery:
            stop = trio.Event()

            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        stop.set()
                        return

            nursery.start_soon(on_signals)
            binds = await nursery.start(
                lambda task_status: serve(
                    gateway.app,
                    config,
                    gateway.monitors,
                    lane=None if args.no_exec_lane else gateway.exec_lane,
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                )
            )
            for bind in binds:
                sys.stderr.write(f"{PROG}: listening on {bind}\n")
            sys.stderr.flush()
            await stop.wait()

    try:
        trio.run(run)
    except JobError as exc:  # the data dir: locked, unusable, or not ours
        sys.stderr.write(f"{PROG}: fatal: {exc}\n")
        return EXIT_SYSTEM
    except OSError as exc:
        sys.stderr.write(f"{PROG}: fatal: cannot listen on {host}:{port}: {exc.strerror}\n")
        return EXIT_SYSTEM
    except BaseException:
        if gateway.startup_error is None:
            raise
        # The lifespan failed (Hypercorn wraps it): the one line says why.
        sys.stderr.write(f"{PROG}: fatal: {gateway.startup_error}\n")
        return EXIT_SYSTEM
    return 0
