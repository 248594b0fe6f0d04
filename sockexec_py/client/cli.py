"""``sockexec-client TARGET prog args…``: run a program through the broker.

Its stdin goes to the program (unless it is a terminal), the program's stdout and
stderr come out on its own as they arrive, and it exits with the program's status:
128+n after a signal (with a note on stderr), 111 when the broker cannot be reached
or breaks the protocol, 100 on a usage error. ``sockexec-client jobs ...`` is the
jobs command line (:mod:`.jobs_cli`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Protocol

from sockexec_py._cli import EXIT_SYSTEM, EXIT_USAGE
from sockexec_py.events import Exited, Output

from . import BrokerUnavailable, ProtocolError, Timeout, open_session
from ._common import signal_name, signal_number

PROG = "sockexec-client"
USAGE = (
    f"usage: {PROG} SOCKET_OR_URL PROGRAM [ARGS...]\n"
    f"       {PROG} jobs [-u URL] submit|list|show|logs|cancel|wait|monitor ... (jobs --help)"
)


class _StdinSink(Protocol):
    """What :func:`_feed_stdin` needs of a session (Unix socket or gateway)."""

    def send(self, data: bytes) -> None: ...
    def close_stdin(self) -> None: ...


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _feed_stdin(session: _StdinSink) -> None:
    """Copy our stdin to the program's, then close it (runs in a daemon thread)."""
    try:
        while data := os.read(0, 64 * 1024):
            session.send(data)
    except (OSError, Timeout):
        pass  # our stdin is unreadable, or the session ended meanwhile
    finally:
        with contextlib.suppress(OSError, Timeout):
            session.close_stdin()


def _run(target: str, argv: list[bytes]) -> Exited:
    with open_session(target, argv) as session:
        if os.isatty(0):
            session.close_stdin()
        else:
            threading.Thread(target=_feed_stdin, args=(session,), daemon=True).start()
        exited: Exited | None = None
        for frame in session:
            if isinstance(frame, Output):
                _write_all(1 if frame.kind == "stdout" else 2, frame.data)
            else:
                exited = frame
    assert exited is not None
    return exited


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if args[:1] == ["jobs"]:  # a socket named "jobs" is ./jobs or unix:jobs
        from .jobs_cli import main as jobs_main

        return jobs_main(args[1:])
    if len(args) < 2:
        sys.stderr.write(f"{PROG}: {USAGE}\n")
        return EXIT_USAGE
    # Arguments go out as the bytes we were given (os.fsencode undoes the
    # surrogateescape of non-UTF-8 bytes in sys.argv).
    target, program = args[0], [os.fsencode(arg) for arg in args[1:]]
    try:
        exited = _run(target, program)
    except (BrokerUnavailable, ProtocolError, Timeout, ImportError) as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return EXIT_SYSTEM
    except BrokenPipeError:
        # Whoever reads our output went away: leaving the session stopped the
        # program; end as a program killed by SIGPIPE would.
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    if exited.termsig is not None:
        number = signal_number(exited.termsig)
        sys.stderr.write(f"{PROG}: killed by signal {signal_name(exited.termsig)}\n")
        return 128 + number if number is not None else EXIT_SYSTEM
    assert exited.exitcode is not None
    return exited.exitcode


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
