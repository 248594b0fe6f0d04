"""The monitor WebSocket ``/v1/monitor?name=NAME&since=ID``: job events as they
happen, one JSON message each, after those missed since an event id.

What a monitor receives, in order:

1. with ``since``, every kept event after that id (read from the store in pages),
   preceded by ``{"type": "gap", "since", "first_id"}`` when some of them were
   already purged (older than the retention period);
2. ``{"type": "ready", "last_id"}``: from here on events come live; ``last_id``
   is the ``since`` to reconnect with if no event comes before a reconnect;
3. events ``{"id", "type": "queued"|"scheduled"|"started"|"progress"|"finished",
   "job", "name", "time", ...}`` (with ``"step"`` for a task's step), in id order;
4. when it falls more than the queue (``--monitor-queue``) behind,
   ``{"type": "overflow", "last_id"}`` and a close (1013): it reconnects with
   ``since=last_id`` and loses nothing.

Two options for monitors that must keep up with many jobs: ``types=finished,...``
sends only those event types (the control messages always come), and ``batch=1``
makes every message a JSON array of one or more of the messages above, in order:
what queued up while the previous message was being sent goes out as one message.

Who sends them: a monitor whose upgrade is the first request of its connection
(nearly every client) is taken aside by the front door (:mod:`.frontdoor`) and
served by :mod:`.monitor_wire`, which writes all monitors' messages from one loop;
any other reaches this module's ASGI route, where each message costs the gateway
~130 us, so a ``batch=1`` monitor here is also paced: at most one array every
(monitors connected x ``--monitor-pace``, 250 us). Both share the checks, the
replay and the messages (:meth:`MonitorEndpoint.admit`, :meth:`~MonitorEndpoint.open_feed`).

The live side never waits for a monitor (see :class:`~sockexec_py.jobs.events.EventHub`).
A monitor that stops reading altogether is dropped from the live feed when its
queue is full; its connection ends when it reads again (the overflow message, the
close) or goes away. A token sees the events of the names it has ``status`` on,
and needs ``monitor``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import trio
from starlette.datastructures import Headers
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from sockexec_py.client.wire import error_frame
from sockexec_py.errors import single_errors
from sockexec_py.jobs import JobError
from sockexec_py.jobs.events import Event, EventHub, Subscription

from .auth import Principal, require
from .jobs_api import JobsService
from .metrics import GatewayMetrics
from .monitor_query import MonitorQuery, parse_query
from .request import HTTPError, error_response

__all__ = [
    "MonitorEndpoint",
    "Sink",
    "batches",
    "cancel_when",
    "error_message",
    "overflow_message",
]


#: Events read from the store per page while catching up.
REPLAY_PAGE = 1000
#: The close code after an overflow: "try again later".
OVERFLOW_CLOSE = 1013
#: The most messages in one ``batch=1`` array.
BATCH_MAX = REPLAY_PAGE


class Sink(Protocol):
    """Where a monitor's messages go, in order: one WebSocket message each, or with
    ``batch`` as arrays (:func:`batches`)."""

    async def send(self, texts: Sequence[str]) -> None: ...


def batches(texts: Sequence[str]) -> list[str]:
    """``batch=1``'s messages: JSON arrays of at most :data:`BATCH_MAX` texts."""
    return [
        "[" + ",".join(texts[at : at + BATCH_MAX]) + "]" for at in range(0, len(texts), BATCH_MAX)
    ]


class _Messages:
    """The ASGI route's :class:`Sink`."""

    def __init__(self, websocket: WebSocket, batch: bool) -> None:
        self.websocket = websocket
        self.batch = batch

    async def send(self, texts: Sequence[str]) -> None:
        if not self.batch:
            for text in texts:
                await self.websocket.send_text(text)
            return
        for text in batches(texts):
            await self.websocket.send_text(text)


class MonitorEndpoint:
    """The WebSocket endpoint (:meth:`serve`); ``screen`` is the gateway's request check."""

    def __init__(
        self,
        jobs: JobsService | None,
        screen: Callable[[Headers, bool], Principal],
        metrics: GatewayMetrics,
    ) -> None:
        self.jobs = jobs
        self.screen = screen
        self.metrics = metrics
        #: Set when the gateway stops: this route's monitors end with a 1001 close
        #: (Hypercorn's graceful stop would leave them open, then cut them).
        self.closing = trio.Event()

    def close(self) -> None:
        self.closing.set()

    async def serve(self, websocket: WebSocket) -> None:
        """The ASGI route: an upgrade that is not its connection's first request
        (a proxy's kept-alive connection), one whose request line came in pieces too
        small to tell (see :mod:`.frontdoor`), or the app under another server."""
        status = "200"
        try:
            principal, query = self.admit(websocket.headers, websocket.query_params)
        except HTTPError as exc:
            if "websocket.http.response" in websocket.scope.get("extensions", {}):
                await websocket.send_denial_response(error_response(exc))
            else:
                await websocket.close(code=4000 + exc.status, reason=exc.detail)
            self.count(exc.status)
            return
        await websocket.accept()
        left = trio.Event()
        messages = _Messages(websocket, query.batch)
        try:
            with single_errors():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_client, websocket, nursery.cancel_scope, left)
                    nursery.start_soon(cancel_when, self.closing, nursery.cancel_scope)
                    subscription, last = await self.open_feed(messages, principal, query)
                    with subscription:
                        await self._live(messages, subscription, last, nursery.cancel_scope)
                    nursery.cancel_scope.cancel()
            if left.is_set():
                status = "499"
            elif self.closing.is_set() and websocket.application_state is WebSocketState.CONNECTED:
                await websocket.close(code=1001)  # going away (unless _live closed it)
        except WebSocketDisconnect:
            status = "499"
        except HTTPError as exc:
            status = str(exc.status)
            await messages.send([error_message(exc)])
            await websocket.close(code=1011)
        finally:
            self.count(status)

    def count(self, status: int | str) -> None:
        """One monitor request in the metrics, by how it ended."""
        self.metrics.requests.labels("monitor", str(status)).inc()

    def _pace(self) -> float:
        """The least time between two arrays of one ``batch=1`` monitor of this
        route: each connected monitor's share of ``--monitor-pace``."""
        jobs = self.jobs
        if jobs is None or jobs.runner is None:
            return 0.0
        return jobs.runner.hub.subscribers * jobs.settings.monitor_pace

    def admit(self, headers: Headers, params: Mapping[str, str]) -> tuple[Principal, MonitorQuery]:
        """The checks before the upgrade: who, which name, since which event."""
        principal = self.screen(headers, True)
        if self.jobs is None or self.jobs.runner is None:
            raise HTTPError(
                404, "jobs_disabled", "jobs are off: start sockexec-gateway with --data-dir DIR"
            )
        query = parse_query(params)
        require(principal, "monitor", query.name)
        require(principal, "status", query.name)
        return principal, query

    @property
    def hub(self) -> EventHub:
        """The jobs' event hub (there is one once :meth:`admit` let a monitor in)."""
        assert self.jobs is not None and self.jobs.runner is not None
        return self.jobs.runner.hub

    @staticmethod
    async def _watch_client(
        websocket: WebSocket, scope: trio.CancelScope, left: trio.Event
    ) -> None:
        """Read (and ignore) what the client sends; its close ends the monitor."""
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                left.set()
                scope.cancel()
                return

    async def open_feed(
        self, sink: Sink, principal: Principal, query: MonitorQuery
    ) -> tuple[Subscription, int]:
        """Send what the monitor missed (with ``since``) and ``ready``; returns its
        live subscription (events may be queued already) and the last id sent.

        Error handling: :class:`HTTPError` 503 when the store cannot be read."""
        assert self.jobs is not None and self.jobs.runner is not None
        runner, store = self.jobs.runner, self.jobs.runner.store
        name, since, types = query.name, query.since, query.types
        names = principal.names_for("status")
        allowed = None if names is None or names.everything else names.covers

        def visible(event: Event) -> bool:
            return (types is None or event.type in types) and (
                allowed is None or allowed(event.name)
            )

        async def page(after: int) -> tuple[list[Event], int, int | None]:
            try:
                return await store.events_after(after, REPLAY_PAGE, name)
            except JobError as exc:
                raise HTTPError(503, "store_unavailable", str(exc)) from None

        last = since if since is not None else 0
        subscription: Subscription | None = None
        try:
            if since is not None:
                events, newest, first = await page(last)
                # Ahead of every id here: another history (a new or restored data
                # dir), all of which follows the gap, from its start.
                ahead = since > newest
                if ahead or (newest > since and (first is None or first > since + 1)):
                    gap = {"type": "gap", "since": since, "first_id": first}
                    await sink.send([json.dumps(gap)])
                if ahead:
                    last = 0
                    events, newest, first = await page(last)
                # Catch up page by page, then subscribe and read once more: what was
                # committed meanwhile is in the table or in the queue (or both: the
                # ids tell).
                while True:
                    await sink.send([event.text for event in events if visible(event)])
                    if events:
                        last = events[-1].id
                    if len(events) < REPLAY_PAGE:
                        if subscription is not None:
                            break
                        subscription = runner.hub.subscribe(name, allowed, types)
                    events, newest, _ = await page(last)
                last = max(last, newest)
            else:
                subscription = runner.hub.subscribe(name, allowed, types)
                _, last, _ = await page(2**62)
            await sink.send([json.dumps({"type": "ready", "last_id": last})])
        except BaseException:
            if subscription is not None:
                subscription.close()
            raise
        return subscription, last

    async def _live(
        self, messages: _Messages, subscription: Subscription, last: int, scope: trio.CancelScope
    ) -> None:
        """Send queued events as they come; after an overflow, say so and close.

        A send to a peer that stopped reading blocks, and Hypercorn shields its
        socket writes, so nothing can interrupt it: the hub has dropped the
        subscription by then (nothing more is queued for it), and once the peer
        reads again (or goes away) the overflow message and the close follow.
        """
        sent = last
        next_at = 0.0
        batch = messages.batch
        while True:
            await subscription.wait()
            if batch and (wait := next_at - trio.current_time()) > 0:
                await trio.sleep(wait)  # what comes meanwhile joins this message
            if subscription.overflowed:  # what it missed, it reads again with since
                await messages.send([overflow_message(sent)])
                await messages.websocket.close(code=OVERFLOW_CLOSE)
                scope.cancel()
                return
            fresh = [event for event in subscription.take() if event.id > sent]
            if fresh:
                await messages.send([event.text for event in fresh])
                sent = fresh[-1].id
                if batch:
                    next_at = trio.current_time() + self._pace()


async def cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` once ``event`` is set (a task of the scope's nursery)."""
    await event.wait()
    scope.cancel()


def error_message(exc: HTTPError) -> str:
    """The message that ends a monitor the gateway cannot serve any more."""
    return json.dumps(error_frame(exc.status, exc.error, exc.detail))


def overflow_message(last_id: int) -> str:
    """The message before the close of a monitor that fell too far behind."""
    return json.dumps({"type": "overflow", "last_id": last_id})
