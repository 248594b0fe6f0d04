"""What every transport and flavour of the client shares: targets, frames, results,
the stdin netstrings and the wording of errors. No sockets here (sans-IO)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sockexec_py.errors import BrokerUnavailable, SockexecError, describe_connect_error
from sockexec_py.events import Exited, Output
from sockexec_py.netstring import encode
from sockexec_py.protocol import NEED_DATA, ClientSession, encode_request

#: A frame of a session: program output, or its exit (always the last frame).
Frame = Output | Exited
OutputCallback = Callable[[bytes], object]

#: How much to read from the broker at once (its pairs are at most 64 KiB each).
RECV_CHUNK = 256 * 1024
#: Stdin goes out in netstrings of at most this size: a broker started with a
#: --max-frame below it (default 64 MiB) refuses the client's stdin.
STDIN_CHUNK = 64 * 1024
#: The empty netstring: it closes the program's stdin.
CLOSE_STDIN = b"0:,"

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


def one_shot_request(argv: Sequence[str | bytes], stdin: bytes) -> Iterator[bytes]:
    """Everything a one-shot run sends, piece by piece: argv, stdin, the close."""
    yield encode_request(argv)
    yield from stdin_netstrings(stdin)
    yield CLOSE_STDIN


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


class SessionState:
    """Both directions of a session over the broker's socket, sans-IO; the flavours
    only move its bytes.

    Stdin: :meth:`stdin` yields the netstrings to send for a chunk and stops once
    stdin is closed, :meth:`close_stdin` gives the closing netstring once, and
    :meth:`stdin_gone` records that the broker closed (the program ended: its exit is
    on the way, further stdin is dropped). Output: :meth:`receive_data` takes the
    broker's bytes, :meth:`next_frame` gives the frames; :attr:`exited` is set with
    the last one, and ``on_stdout``/``on_stderr`` are called with each output frame
    as it is taken.
    """

    def __init__(
        self, on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None
    ) -> None:
        self._parser = ClientSession()
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self._stdin_closed = False
        #: How the program ended, once the last frame was taken.
        self.exited: Exited | None = None

    def stdin(self, data: bytes) -> Iterator[bytes]:
        """The netstrings that send ``data`` (see :func:`stdin_netstrings`); none
        after the close or once the broker is gone."""
        for netstring in stdin_netstrings(data):
            if self._stdin_closed:
                return
            yield netstring

    def close_stdin(self) -> bytes:
        """The netstring that closes stdin the first time; ``b""`` after that."""
        if self._stdin_closed:
            return b""
        self._stdin_closed = True
        return CLOSE_STDIN

    def stdin_gone(self) -> None:
        """The broker no longer takes stdin (it closed after the program's end)."""
        self._stdin_closed = True

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the broker; ``b""`` when it closed the connection."""
        self._parser.receive_data(data)

    def next_frame(self) -> Frame | None:
        """The next frame, or None until more bytes are received.

        Error handling: :class:`ProtocolError` when the broker broke the protocol or
        closed before the exit pair.
        """
        event = self._parser.next_event()
        if event is NEED_DATA:
            return None
        assert isinstance(event, Output | Exited)
        if isinstance(event, Exited):
            self.exited = event
        elif (callback := self._callbacks[event.kind]) is not None:
            callback(event.data)
        return event


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
