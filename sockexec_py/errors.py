"""Exceptions, split by whose fault a failure is.

A *remote* protocol error means the peer sent bytes that break the protocol: the
server answers in-band (``stderr`` line + ``exitcode 125``) and closes; a client
raises it to its caller. A *local* protocol error means our own code misused a state
machine: that is a bug, never the peer's doing, and it propagates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

#: Exit code for a request the broker refused (protocol error, limit, policy).
EXIT_REFUSED = 125
#: Exit code for a program that was found but could not be executed.
EXIT_CANNOT_EXECUTE = 126
#: Exit code for a program that was not found.
EXIT_NOT_FOUND = 127


class SockexecError(Exception):
    """Base class of every error raised by sockexec_py."""


class ProtocolError(SockexecError):
    """The netstring protocol was violated (see the two subclasses for whose fault)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent malformed or out-of-limit data.

    ``str(error)`` is a one-line reason fit to send back to the peer.
    """


class LocalProtocolError(ProtocolError):
    """Our own code drove a state machine wrongly (a bug, not the peer's doing)."""


class BrokerUnavailable(SockexecError):
    """The broker cannot be reached; the message says why (missing, refused, denied)."""


class Timeout(SockexecError):
    """The session did not finish within the caller's timeout (the program was left to
    the broker, which terminates it when the connection closes)."""


def describe_connect_error(path: str, exc: OSError) -> str:
    """One plain line for a failed connect to the broker's socket."""
    if isinstance(exc, FileNotFoundError):
        return f"broker socket {path} does not exist (is sockexec-py running?)"
    if isinstance(exc, ConnectionRefusedError):
        return f"nobody is listening on {path} (stale socket: is sockexec-py running?)"
    if isinstance(exc, PermissionError):
        return f"permission denied on {path} (check the socket's mode and group, -M)"
    if isinstance(exc, BlockingIOError):
        return f"the broker's backlog on {path} is full"
    return f"cannot connect to {path}: {exc.strerror or exc}"


@contextlib.contextmanager
def single_errors() -> Iterator[None]:
    """Re-raise a nursery's lone exception as itself, not in an ExceptionGroup.

    trio wraps every error that leaves a nursery in a group; callers of our APIs
    expect ``except ProtocolError`` (or HTTPError, Timeout…) to work. A group of
    several errors is left as it is.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group
        raise
