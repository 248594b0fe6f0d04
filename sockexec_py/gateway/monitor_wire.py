"""Monitors served by the gateway's own socket code: the messages of the ASGI route
(:mod:`.monitor`), written for every monitor by one fan-out loop.

Why: through the ASGI server a WebSocket message costs the gateway ~130 us of CPU
whatever it carries (Starlette, Hypercorn's send lock and shielded send, wsproto,
a task switch per monitor), so a thousand monitors got a few messages a second
each and crowded out the rest. Here :class:`FanOut` frames a message once for the
monitors that get the same events and writes it with one non-blocking send per
monitor, from one loop; only a monitor whose socket is full gets its task woken
to wait for it, and its events wait in its bounded queue meanwhile (past
``--monitor-queue`` it overflows, as on the ASGI route).

The front door (:mod:`.frontdoor`) hands over the connections whose first bytes
are ``GET /v1/monitor``. The checks, the replay with ``since``, the control
messages and the metrics are :class:`~.monitor.MonitorEndpoint`'s. What differs:
no permessage-deflate (the frames are shared), and a monitor that stops reading
after it overflowed is cut off after :data:`CLOSE_WAIT` seconds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import trio
from starlette.datastructures import Headers, QueryParams
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Ping
from wsproto.frame_protocol import CloseReason

from sockexec_py.jobs.events import Event, EventHub, Subscription

from .auth import Principal
from .monitor import (
    OVERFLOW_CLOSE,
    MonitorEndpoint,
    batches,
    cancel_when,
    error_message,
    overflow_message,
)
from .monitor_query import MonitorQuery
from .request import HTTPError
from .ws_handshake import accepted, read_head, refuse, upgrade_key

#: Seconds a closing monitor gets to read what is left (then it is cut off).
CLOSE_WAIT = 30.0
#: Seconds a replay's page may wait for the client to read it: past that the
#: monitor is ended as an overflowed one (it reconnects with ``since``).
REPLAY_STALL = 30.0
#: An event's id, or the replay's last one in its ``ready`` message.
_REPLAYED_ID = re.compile(r'\{"id":(\d+),|\{"type": "ready", "last_id": (\d+)\}')
#: Bytes waiting to go out past which the client's frames are not read.
READ_PAUSE = 65536

__all__ = ["FanOut", "WireMonitor", "WireMonitors", "text_frame"]


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented WebSocket text frame (a server's)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


def _frames(texts: Sequence[str], batch: bool) -> bytes:
    return b"".join(text_frame(text.encode()) for text in (batches(texts) if batch else texts))


class WireMonitor:
    """One monitor connection after its upgrade: writes that never wait (what the
    socket does not take waits in ``pending`` for :meth:`flushing`), and the
    client's frames read by :meth:`reading` (pings answered, a close ends it).
    Nothing is written after a close frame; the client's reading is paused while
    more than :data:`READ_PAUSE` bytes wait to go out (a client that pings and never
    reads cannot grow ``pending``)."""

    def __init__(self, stream: trio.SocketStream, batch: bool, unread: bytes) -> None:
        self.stream = stream
        self.batch = batch
        self.pending = bytearray()
        self.sent = 0  # the id of the last event written
        self.subscription: Subscription | None = None
        #: True when the client closed or went away first (not the gateway).
        self.left = False
        #: Set when the monitor is over: the client closed or left, or we closed.
        self.over = trio.Event()
        self._fd = stream.socket.fileno()
        self._ws = Connection(ConnectionType.SERVER)
        self._ws.receive_data(unread)
        self._writable = trio.Event()
        self._drained = trio.Event()
        self._drained.set()
        #: Set when the client's side ended (its close frame, EOF or an error).
        self._peer_done = trio.Event()
        self._fanout: FanOut | None = None
        self._broken = False
        self._shut = False  # a close frame was written: nothing more goes out

    # -- writing ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send ``data`` now as far as the socket takes it; the rest in order later."""
        if self._broken or self._shut:
            return
        if not self.pending:
            try:
                done = os.write(self._fd, data)
            except BlockingIOError:
                done = 0
            except OSError:  # the peer is gone
                self._gone()
                return
            if done == len(data):
                return
            data = data[done:]
            self._drained = trio.Event()
        self.pending += data
        self._writable.set()

    async def send(self, texts: Sequence[str]) -> None:
        """The replay's :class:`~.monitor.Sink`: write, then wait until it is sent;
        a client that does not read it within :data:`REPLAY_STALL` is ended as an
        overflowed one (its replay is cancelled when ``over`` is set)."""
        if not texts:
            return
        for text in texts:  # the last id it was sent (for an overflow's message)
            if matched := _REPLAYED_ID.match(text):
                self.sent = max(self.sent, int(matched[1] or matched[2]))
        self.write(_frames(texts, self.batch))
        with trio.move_on_after(REPLAY_STALL):
            await self._drained.wait()
            return
        self.close(OVERFLOW_CLOSE, [overflow_message(self.sent)])

    async def flushing(self) -> None:
        """Write ``pending`` whenever the socket takes more (the only task that waits
        for the socket to be writable)."""
        while True:
            await self._writable.wait()
            self._writable = trio.Event()
            while self.pending:
                await trio.lowlevel.wait_writable(self.stream.socket)
                try:
                    done = os.write(self._fd, self.pending)
                except BlockingIOError:
                    continue
                except OSError:
                    self._gone()
                    return
                del self.pending[:done]
            self._drained.set()
            if self._fanout is not None:
                self._fanout.wake()  # its queue may have filled meanwhile

    def _gone(self) -> None:
        self.left = self.left or not self._shut
        self._broken = True
        self.pending.clear()
        self._drained.set()
        self._peer_done.set()
        self.over.set()

    def close(self, code: int, texts: Sequence[str] = ()) -> None:
        """Write ``texts`` and a close frame (unless one went already); over."""
        if self._ws.state is ConnectionState.OPEN:
            self.write(_frames(texts, self.batch) + self._ws.send(CloseConnection(code)))
            self._shut = True
        self.over.set()

    async def closed(self) -> None:
        """Once over: let the client read what is left and answer our close (at
        most :data:`CLOSE_WAIT` seconds), so that the socket's close cannot reset
        the connection under data it has not read yet."""
        with trio.move_on_after(CLOSE_WAIT):
            await self._drained.wait()
            await self._peer_done.wait()

    # -- reading ---------------------------------------------------------------------

    async def reading(self) -> None:
        """Read the client's frames until it closes or goes away (then ``over``)."""
        try:
            await self._read()
        finally:
            self._peer_done.set()

    async def _read(self) -> None:
        while True:
            for event in self._ws.events():
                if isinstance(event, Ping) and self._ws.state is ConnectionState.OPEN:
                    self.write(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    state = self._ws.state
                    # Its close (answered), or a bad frame (ours says why) — unless
                    # our close went first: then nothing more is sent.
                    if state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                        self.left = self.left or not self._shut
                        reply = (
                            event.response() if state is ConnectionState.REMOTE_CLOSING else event
                        )
                        self.write(self._ws.send(reply))
                        self._shut = True
                    self.over.set()
                    return
            if len(self.pending) > READ_PAUSE:
                await self._drained.wait()
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._gone()
                return
            self._ws.receive_data(data)


class FanOut:
    """Writes the live events of every wire monitor, in rounds: a round takes each
    monitor's queued events (unless its socket is still full), frames them once per
    distinct list and writes them. After a round it pauses as long as the round
    took, so monitors get at most half the gateway's time (submits and the rest get
    the other half), and events that come meanwhile go out together."""

    def __init__(self) -> None:
        self.monitors: set[WireMonitor] = set()
        self._wake = trio.Event()
        self._closed = False

    def wake(self, _event: Event | None = None) -> None:
        """Something was published, or a monitor's socket drained: a round is due."""
        self._wake.set()

    def add(self, monitor: WireMonitor, subscription: Subscription, last: int) -> None:
        """``monitor`` goes live: the events of ``subscription`` after ``last``."""
        monitor.subscription, monitor.sent, monitor._fanout = subscription, last, self
        if self._closed:  # the gateway stops
            monitor.close(CloseReason.GOING_AWAY)
            return
        self.monitors.add(monitor)
        self.wake()

    def discard(self, monitor: WireMonitor) -> None:
        self.monitors.discard(monitor)

    async def run(self) -> None:
        """Rounds until :meth:`close`."""
        while not self._closed:
            await self._wake.wait()
            self._wake = trio.Event()
            began = trio.current_time()
            self.round()
            await trio.sleep(trio.current_time() - began)

    def round(self) -> None:
        """Write each monitor's queued events (the loop the fan-out's speed is in:
        a thousand monitors a round, so it does as little per monitor as it can)."""
        framed: dict[tuple[object, ...], bytes] = {}
        overflowed = []
        for monitor in self.monitors:
            subscription = monitor.subscription
            assert subscription is not None
            queue = subscription.queue
            if not queue or monitor.pending:
                if subscription.overflowed:  # the hub emptied its queue
                    overflowed.append(monitor)
                continue
            sent = monitor.sent
            events = list(queue) if queue[0].id > sent else [e for e in queue if e.id > sent]
            queue.clear()
            if not events:
                continue
            key = (monitor.batch, *[event.id for event in events])
            data = framed.get(key)
            if data is None:
                data = framed[key] = _frames([event.text for event in events], monitor.batch)
            monitor.write(data)
            monitor.sent = events[-1].id
        for monitor in overflowed:  # what it missed, it reads again with since
            self.monitors.discard(monitor)
            monitor.close(OVERFLOW_CLOSE, [overflow_message(monitor.sent)])

    def close(self) -> None:
        """The gateway stops: every monitor gets a 1001 close, :meth:`run` ends."""
        self._closed = True
        for monitor in self.monitors:
            monitor.close(CloseReason.GOING_AWAY)
        self.monitors.clear()
        self.wake()


class WireMonitors:
    """The front door's monitor side (:class:`~.frontdoor.MonitorDoor`): the
    request head, the endpoint's checks, the upgrade, the replay, then the fan-out."""

    def __init__(self, endpoint: MonitorEndpoint) -> None:
        self.endpoint = endpoint
        self.fanout = FanOut()
        self._monitors: set[WireMonitor] = set()
        self._heads: set[trio.CancelScope] = set()  # requests still being read
        self._hub: EventHub | None = None
        self._closing = False

    async def run(self) -> None:
        await self.fanout.run()

    def close(self) -> None:
        self._closing = True
        self.endpoint.close()  # the ASGI route's monitors too
        for scope in self._heads:
            scope.cancel()
        for monitor in self._monitors:
            monitor.close(CloseReason.GOING_AWAY)
        self.fanout.close()

    async def serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            with trio.CancelScope() as reading:  # the gateway's stop cancels it
                self._heads.add(reading)
                try:
                    request, unread = await read_head(stream)
                except HTTPError as exc:
                    await refuse(stream, exc)
                    return
                except (trio.TooSlowError, trio.BrokenResourceError, OSError):
                    return  # gone, or too slow to say what it wants
                finally:
                    self._heads.discard(reading)
            if reading.cancelled_caught or self._closing:
                return  # the gateway stops: the connection ends, as Hypercorn's idle ones
            try:
                key = upgrade_key(request)
                query_string = request.target.partition(b"?")[2].decode("latin-1")
                principal, query = self.endpoint.admit(
                    Headers(raw=list(request.headers)), QueryParams(query_string)
                )
            except HTTPError as exc:
                self.endpoint.count(exc.status)
                await refuse(stream, exc)
                return
            if self._hub is not self.endpoint.hub:  # once per hub: rounds follow events
                self._hub = self.endpoint.hub
                self._hub.add_listener(self.fanout.wake)
            monitor = WireMonitor(stream, query.batch, unread)
            monitor.write(accepted(key))
            self._monitors.add(monitor)
            try:
                status = await self._run(monitor, principal, query)
            finally:
                self._monitors.discard(monitor)
            self.endpoint.count(status)

    async def _run(self, monitor: WireMonitor, principal: Principal, query: MonitorQuery) -> str:
        """The monitor from its upgrade to its end; the status for the metrics."""
        status = "200"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor.flushing)
            nursery.start_soon(monitor.reading)
            try:
                with trio.CancelScope() as feeding:
                    nursery.start_soon(cancel_when, monitor.over, feeding)
                    subscription, last = await self.endpoint.open_feed(monitor, principal, query)
                    self.fanout.add(monitor, subscription, last)
            except HTTPError as exc:
                status = str(exc.status)
                monitor.close(1011, [error_message(exc)])
            else:
                if not feeding.cancelled_caught:
                    with subscription:
                        try:
                            await monitor.over.wait()
                        finally:
                            self.fanout.discard(monitor)
            await monitor.closed()
            if monitor.left:
                status = "499"
            nursery.cancel_scope.cancel()
        return status
