"""Python client of the broker: one-shot and duplex, blocking and trio.

A target is a socket path, ``unix:/path``, or — through the HTTP gateway —
``http(s)://`` / ``ws(s)://`` (needs the ``[gateway]`` extra); :func:`is_gateway`
tells them apart. Each transport has one sans-IO session state (:mod:`._state`: the
broker's netstrings; :mod:`._websocket`: the gateway's WebSocket), and both flavours
drive either: :mod:`._blocking` (plain sockets: :func:`run`, :func:`open_session`)
and :mod:`._trio` (trio streams: :func:`arun`, :func:`open_async_session`). A one-shot
run through the gateway is one HTTP request (:mod:`._http`); :mod:`.wire` is the
gateway's JSON format, shared with the gateway itself.

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
from ._common import (
    STDIN_CHUNK,
    Collector,
    Frame,
    OutputCallback,
    ProgramFailed,
    Result,
    is_gateway,
    parse_target,
)
from ._trio import AsyncSession, arun, check_broker, open_async_session, open_unix_session

__all__ = [
    "STDIN_CHUNK",
    "AsyncSession",
    "BrokerUnavailable",
    "Collector",
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
