"""What every transport and flavour of the client shares: targets, frames, results,
the stdin netstrings and the wording of errors. No sockets here (sans-IO)."""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sockexec_py.errors import BrokerUnavailable, SockexecError, describe_connect_error
from sockexec_py.events import Exited, Output
from sockexec_py.netstring import encode

#: A frame of a session: program output, or its exit (always the last frame).
Frame = Output | Exited
OutputCallback = Callable[[bytes], object]

#: How much to read from the broker at once (its pairs are at most 64 KiB each).
RECV_CHUNK = 256 * 1024
#: Stdin goes out in netstrings of at most this size: a broker started with a
#: --max-frame below it (default 64 MiB) refuses the client's stdin.
STDIN_CHUNK = 64 * 1024

_GATEWAY_SCHEMES = ("http://", "https://", "ws://", "wss://")


class ProgramFailed(SockexecError):
    """Raised by :meth:`Result.check` when the program did not exit with status 0."""

    def __init__(self, result: Result) -> None:
        how = (
            f"exit status {result.exitcode}"
            if result.termsig is None
            else f"signal {result.termsig}"
        )
        super().__init__(f"program failed with {how}")
        self.result = result


@dataclass(frozen=True, slots=True)
class Result:
    """What a one-shot run returned: exactly one of ``exitcode``/``termsig`` is set."""

    stdout: bytes
    stderr: bytes
    exitcode: int | None
    termsig: str | None

    @property
    def ok(self) -> bool:
        """True when the program exited with status 0."""
        return self.exitcode == 0

    def check(self) -> Result:
        """Return self if :attr:`ok`, else raise :class:`ProgramFailed`."""
        if not self.ok:
            raise ProgramFailed(self)
        return self


def is_gateway(target: str) -> bool:
    """The transport seam: true for targets served by the HTTP gateway transport
    (``http(s)://``, ``ws(s)://``); every other target is a Unix socket."""
    return target.startswith(_GATEWAY_SCHEMES)


def parse_target(target: str) -> str:
    """The socket path of a Unix target: a path, ``unix:/path`` or ``unix:///path``.

    Error handling: any other ``scheme://`` raises ``ValueError`` (gateway targets go
    to the gateway transport before this is called).
    """
    if target.startswith("unix://"):
        return target[len("unix://") :]
    if target.startswith("unix:"):
        return target[len("unix:") :]
    if "://" in target:
        raise ValueError(f"not a Unix socket target: {target!r}")
    return target


def unavailable(path: str, exc: OSError) -> BrokerUnavailable:
    """The error for a failed connect to the broker's socket, in one plain line."""
    # connect() says ECONNREFUSED both for a stale socket and for a path that is not
    # a socket at all (a regular file, a directory): tell the two apart.
    if isinstance(exc, ConnectionRefusedError):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFSOCK
        if not stat.S_ISSOCK(mode):
            return BrokerUnavailable(f"{path} is not a socket (is it the broker's socket path?)")
    return BrokerUnavailable(describe_connect_error(path, exc))


def stdin_netstrings(data: bytes) -> Iterator[bytes]:
    """``data`` as stdin netstrings of at most :data:`STDIN_CHUNK` bytes each, encoded
    one at a time as the caller sends them; none for ``b""`` (an empty netstring would
    close the program's stdin).

    Every way the client sends stdin goes through here, so whatever a caller hands
    over in one piece, no netstring exceeds a broker's ``--max-frame`` (the broker
    refuses a longer one and terminates the program).
    """
    for start in range(0, len(data), STDIN_CHUNK):
        yield encode(data[start : start + STDIN_CHUNK])


class Collector:
    """Gathers frames into a :class:`Result` (chunks joined once, at the end)."""

    def __init__(self) -> None:
        self.stdout: list[bytes] = []
        self.stderr: list[bytes] = []
        self.exited: Exited | None = None

    def add(self, frame: Frame) -> None:
        if isinstance(frame, Output):
            (self.stdout if frame.kind == "stdout" else self.stderr).append(frame.data)
        else:
            self.exited = frame

    def result(self) -> Result:
        assert self.exited is not None
        return Result(
            b"".join(self.stdout), b"".join(self.stderr), self.exited.exitcode, self.exited.termsig
        )


@contextmanager
def gateway_extra() -> Iterator[None]:
    """Say what to install when the gateway transport's dependencies are missing."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise ImportError(
            f"the gateway transport needs {exc.name}: pip install 'sockexec_py[gateway]'"
        ) from exc


def timeout_error(timeout: float | None, what: str = "the program") -> str:
    """The message of a :class:`~sockexec_py.errors.Timeout`."""
    return f"{what} did not finish within {timeout:g} s" if timeout else f"{what} timed out"


def signal_number(termsig: str) -> int | None:
    """The number of a signal as the broker names it: ``TERM`` (the default) or ``15``
    (``--termsig-format number``); None for a name this system does not know."""
    if termsig.isdigit():
        return int(termsig)
    try:
        return int(signal.Signals[f"SIG{termsig}"])
    except KeyError:
        return None


def signal_name(termsig: str) -> str:
    """``TERM`` for ``TERM`` or ``15``: the name without ``SIG`` when it is known."""
    number = signal_number(termsig)
    try:
        return termsig if number is None else signal.Signals(number).name.removeprefix("SIG")
    except ValueError:
        return termsig
