"""What a callback-driven one-shot session (:mod:`.oneshot`) uses of its server,
besides what every connection does (:mod:`.services`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from sockexec_py.protocol import ServerSession

from ._reactor import Reactor, TimerQueue
from .config import ServerConfig
from .connection import Connection

__all__ = ["OneShotServices"]

StartSoon = Callable[..., None]


@dataclass(frozen=True, slots=True)
class OneShotServices:
    """What a one-shot session uses of its server.

    ``serve`` hands a connection over to the task-driven path (a task running
    :meth:`Connection.serve` from the given session and argv, closing the connection
    at its end); ``closed`` is the server's side of closing a connection.
    """

    reactor: Reactor
    deadlines: TimerQueue | None  # the -t deadline; None with -t 0
    hard: TimerQueue | None  # the last-resort cut, -t + ServerConfig.grace; None with -t 0
    drains: TimerQueue  # --drain-timeout after the program's exit
    start_soon: StartSoon
    serve: Callable[[Connection, ServerSession, tuple[bytes, ...] | None], None]
    closed: Callable[[Connection], None]

    @classmethod
    def of(
        cls,
        reactor: Reactor,
        config: ServerConfig,
        nursery: trio.Nursery,
        serve: Callable[[Connection, ServerSession, tuple[bytes, ...] | None], Awaitable[None]],
        closed: Callable[[Connection], None],
    ) -> OneShotServices:
        """The server's: ``serve`` (the task-driven path) runs as a task of ``nursery``."""
        return cls(
            reactor=reactor,
            deadlines=reactor.timer_queue(config.timeout) if config.timeout > 0 else None,
            hard=reactor.timer_queue(config.timeout + config.grace) if config.timeout > 0 else None,
            drains=reactor.timer_queue(config.drain_timeout),
            start_soon=nursery.start_soon,
            serve=lambda conn, session, argv: nursery.start_soon(serve, conn, session, argv),
            closed=closed,
        )
