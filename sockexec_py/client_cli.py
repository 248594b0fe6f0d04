"""``sockexec-client TARGET prog args…``: run a program through the broker.

Its stdin goes to the program (unless it is a terminal), the program's stdout and
stderr come out on its own as they arrive, and it exits with the program's status:
128+n after a signal (with a note on stderr), 111 when the broker cannot be reached.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .client import Session, open_session
from .errors import BrokerUnavailable, ProtocolError, Timeout
from .events import Exited, Output
from .gateway_client import GatewaySession

if TYPE_CHECKING:  # the gateway transport needs the [gateway] extra: import it lazily
    from .gateway_client import GatewaySession

PROG = "sockexec-client"
EXIT_USAGE = 100
EXIT_SYSTEM = 111


def _signal_number(termsig: str) -> int | None:
    if termsig.isdigit():
        return int(termsig)
    try:
        return int(signal.Signals[f"SIG{termsig}"])
    except KeyError:
        return None


def _feed_stdin(session: Session | GatewaySession) -> None:
    """Copy our stdin to the program's, then close it (runs in a thread)."""
    try:
        while data := os.read(0, 64 * 1024):
            session.send(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError, Timeout):
            session.close_stdin()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] in ("-h", "--help"):
        sys.stderr.write(f"{PROG}: usage: {PROG} SOCKET_OR_URL PROGRAM [ARGS...]\n")
        return 0 if args[:1] in (["-h"], ["--help"]) else EXIT_USAGE
    target, program = args[0], args[1:]
    try:
        with open_session(target, program) as session:
            if os.isatty(0):
                session.close_stdin()
            else:
                threading.Thread(target=_feed_stdin, args=(session,), daemon=True).start()
            exited: Exited | None = None
            for frame in session:
                if isinstance(frame, Output):
                    fd = 1 if frame.kind == "stdout" else 2
                    view = memoryview(frame.data)
                    while view:
                        view = view[os.write(fd, view) :]
                else:
                    exited = frame
    except BrokerUnavailable as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return EXIT_SYSTEM
    except (ProtocolError, Timeout) as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return EXIT_SYSTEM
    assert exited is not None
    if exited.termsig is not None:
        sys.stderr.write(f"{PROG}: killed by signal {exited.termsig}\n")
        number = _signal_number(exited.termsig)
        return 128 + number if number is not None else EXIT_SYSTEM
    assert exited.exitcode is not None
    return exited.exitcode


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
