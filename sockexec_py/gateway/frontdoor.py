"""The gateway's listener: Hypercorn's trio worker loop with one door of our own.

Every connection goes to Hypercorn (HTTP/1.1, the ASGI app) except one whose first
bytes are a ``GET /v1/monitor`` request line: that one goes to the wire monitors
(:mod:`.monitor_wire`), which write monitor messages without the ASGI server's
per-message path. A request line that arrives in pieces too small to tell goes to
Hypercorn, whose ``/v1/monitor`` route serves the same messages, only slower.

This is :func:`hypercorn.trio.serve` (``worker_serve``) cut down to what the
gateway uses (plain TCP, no TLS, no QUIC, one worker) with the accept handler
replaced; it uses Hypercorn's ``TCPServer``, ``Lifespan`` and ``WorkerContext``,
which is why ``pyproject.toml`` bounds Hypercorn's version.
"""

from __future__ import annotations

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

__all__ = ["MONITOR_REQUEST", "MonitorDoor", "serve"]

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


async def _is_monitor(stream: trio.SocketStream, wait: float) -> bool | None:
    """Whether the connection's first bytes ask for the monitor (peeked, not read);
    None when nothing came within ``wait`` seconds."""
    want = len(MONITOR_REQUEST) + 1
    with trio.move_on_after(wait):
        first = await stream.socket.recv(want, socket.MSG_PEEK)
        return len(first) == want and first[:-1] == MONITOR_REQUEST and first[-1:] in b"? "
    return None


async def serve(
    app: Any,
    config: Config,
    door: MonitorDoor,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``config.bind`` until ``shutdown_trigger`` returns, the
    monitor connections through ``door``; ``task_status`` gets the bound
    addresses once listening."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)

    waiting: set[trio.CancelScope] = set()  # connections that have not spoken yet

    async def handle(stream: trio.SocketStream) -> None:
        """One connection: never raises (an error would end serve_listeners)."""
        try:
            with trio.CancelScope() as scope:
                waiting.add(scope)
                try:
                    monitor = await _is_monitor(stream, config.keep_alive_timeout)
                except OSError:  # reset before it sent anything
                    monitor = None
                finally:
                    waiting.discard(scope)
            if monitor is None or scope.cancelled_caught:  # silent, or the gateway stops
                await stream.aclose()
            elif monitor:
                await door.serve(stream)
            else:
                state = ConnectionState(lifespan_state.copy())
                await TCPServer(wrapped, config, context, state, stream)  # type: ignore[arg-type]
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
