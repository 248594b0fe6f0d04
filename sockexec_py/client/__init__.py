"""Python client of the broker: one-shot and duplex, blocking and trio.

Both flavours drive the same sans-IO :class:`~sockexec_py.protocol.ClientSession`;
only the byte moving differs (:mod:`._blocking`: plain sockets, :func:`run` and
:func:`open_session`; :mod:`._trio`: trio sockets, :func:`arun` and
:func:`open_async_session`; :mod:`._common`: what they share, sans-IO). A target is
a socket path, ``unix:/path``, or — through the HTTP gateway — ``http(s)://`` /
``ws(s)://`` (:mod:`sockexec_py.gateway_client`, which needs the ``[gateway]``
extra); :func:`is_gateway` tells them apart.

Resource handling: a session owns its connection; leaving its context (or calling
``close``) closes it, and the broker then terminates the program if it still runs.
The broker holds only bounded buffers, so a client must read while it writes:
:func:`run` and :func:`arun` send stdin and read output concurrently.

Error handling: :class:`BrokerUnavailable` (the message says whether the socket is
missing, refused, forbidden or not a socket), :class:`ProtocolError` (the peer broke
the protocol), :class:`Timeout` (the connection is closed, so the program is
terminated) and :class:`ProgramFailed` from :meth:`Result.check`.
"""

from __future__ import annotations

from sockexec_py.errors import BrokerUnavailable, ProtocolError, SockexecError, Timeout

from ._blocking import Session, open_session, run
from ._blocking import _BlockingSession as _BlockingSession  # the gateway transport's base
from ._common import (
    Collector,
    Frame,
    OutputCallback,
    ProgramFailed,
    Result,
    is_gateway,
    parse_target,
)
from ._trio import AsyncSession, arun, check_broker, open_async_session, open_unix_session

#: The name the gateway and its transport (sockexec_py.gateway_client) import it by.
_Collector = Collector

__all__ = [
    "AsyncSession",
    "BrokerUnavailable",
    "Frame",
    "OutputCallback",
    "ProgramFailed",
    "ProtocolError",
    "Result",
    "Session",
    "SockexecError",
    "Timeout",
    "arun",
    "check_broker",
    "is_gateway",
    "open_async_session",
    "open_session",
    "open_unix_session",
    "parse_target",
    "run",
]
