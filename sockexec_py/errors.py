"""Exceptions, split by whose fault a failure is.

A *remote* protocol error means the peer sent bytes that break the protocol: the
server answers in-band (``stderr`` line + ``exitcode 125``) and closes; a client
raises it to its caller. A *local* protocol error means our own code misused a state
machine: that is a bug, never the peer's doing, and it propagates.
"""

from __future__ import annotations

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
