"""The gateway's listener: Hypercorn's trio worker loop with two doors of our own.

Every connection goes to Hypercorn (HTTP/1.1, the ASGI app) except those whose
first bytes are

- a ``GET /v1/monitor`` request line: they go to the wire monitors
  (:mod:`.monitor_wire`), which write monitor messages without the ASGI server's
  per-message path;
- a ``POST /v1/exec`` request line: they go to the exec lane (:mod:`.exec_lane`),
  which calls the same app without Hypercorn's per-request path, and hands the
  connection to Hypercorn at the first request it does not take.

A request line that arrives in pieces too small to tell goes to Hypercorn, whose
routes serve the same answers, only slower.

This is :func:`hypercorn.trio.serve` (``worker_serve``) cut down to what the
gateway uses (plain TCP, no TLS, no QUIC, one worker) with the accept handler
replaced; it uses Hypercorn's ``TCPServer``, ``Lifespan`` and ``WorkerContext``,
which is why ``pyproject.toml`` bounds Hypercorn's version.
"""

from __future__ import annotations

import copy
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import repr_socket_addr, wrap_app

from .exec_lane import EXEC_REQUEST, ExecLane, Replayed

__all__ = ["MONITOR_REQUEST", "MonitorDoor", "serve"]

#: Which door a connection's first bytes pick.
MONITOR, EXEC, HYPERCORN = "monitor", "exec", "hypercorn"

log = logging.getLogger("sockexec_py.gateway")

#: The request line's start that picks the wire monitors (then ``?`` or a space).
MONITOR_REQUEST = b"GET /v1/monitor"


class MonitorDoor(Protocol):
    """What serves the monitor connections (:class:`~.monitor_wire.WireMonitors`)."""

    async def run(self) -> None:
        """Until :meth:`close`: what the door needs running (the fan-out)."""

    async def serve(self, stream: trio.SocketStream) -> None:
        """One monitor connection, its request unread; never raises."""

    def close(self) -> None:
        """The gateway stops: end every monitor (1001, going away) and :meth:`run`."""


async def _door(stream: trio.SocketStream, wait: float) -> str | None:
    """Which door the connection's first bytes pick (peeked, not read); None when
    nothing came within ``wait`` seconds."""
    want = len(MONITOR_REQUEST) + 1
    with trio.move_on_after(wait):
        first = await stream.socket.recv(want, socket.MSG_PEEK)
        if len(first) == want and first[:-1] == MONITOR_REQUEST and first[-1:] in b"? ":
            return MONITOR
        cut = len(EXEC_REQUEST)
        if first[:cut] == EXEC_REQUEST and first[cut : cut + 1] in (b"?", b" "):
            return EXEC
        return HYPERCORN
    return None


async def serve(
    app: Any,
    config: Config,
    door: MonitorDoor,
    *,
    lane: ExecLane | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``config.bind`` until ``shutdown_trigger`` returns, the
    monitor connections through ``door`` and those that start with a one-shot
    exec through ``lane`` (without one: Hypercorn); ``task_status`` gets the bound
    addresses once listening."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)

    waiting: set[trio.CancelScope] = set()  # connections that have not spoken yet
    if lane is not None:
        lane.attach(config, waiting, context.terminated.is_set)

    async def hypercorn(stream: trio.SocketStream | Replayed, answered: int = 0) -> None:
        """Hypercorn's for good (``answered``: requests the lane served on it, which
        count towards its keep-alive limit)."""
        state = ConnectionState(lifespan_state.copy())
        own = config
        if answered:
            own = copy.copy(config)
            own.keep_alive_max_requests = config.keep_alive_max_requests - answered
        await TCPServer(wrapped, own, context, state, stream)  # type: ignore[arg-type]

    async def handle(stream: trio.SocketStream) -> None:
        """One connection: never raises (an error would end serve_listeners)."""
        try:
            with trio.CancelScope() as scope:
                waiting.add(scope)
                try:
                    picked = await _door(stream, config.keep_alive_timeout)
                except OSError:  # reset before it sent anything
                    picked = None
                finally:
                    waiting.discard(scope)
            if picked is None or scope.cancelled_caught:  # silent, or the gateway stops
                await stream.aclose()
            elif picked == MONITOR:
                await door.serve(stream)
            elif picked == EXEC and lane is not None:
                await lane.serve(stream, lifespan_state, hypercorn)
            else:
                await hypercorn(stream)
        except Exception:  # a bug: this connection ends, the gateway goes on
            log.exception("connection failed")
            await stream.aclose()

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            sockets = config.create_sockets()
            listeners = []
            binds = []
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            server_nursery.start_soon(door.run)
            task_status.started(binds)
            try:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(
                        partial(
                            trio.serve_listeners, handle, listeners, handler_nursery=server_nursery
                        )
                    )
                    await shutdown_trigger()
                    accepting.cancel_scope.cancel()
            finally:
                # What is running gets graceful_timeout seconds to end (Hypercorn's
                # rule); idle connections and monitors are told at once.
                for scope in waiting:
                    scope.cancel()
                door.close()
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
