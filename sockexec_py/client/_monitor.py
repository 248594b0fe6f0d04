"""Job events from the gateway's monitor WebSocket (``/v1/monitor``), blocking
(:func:`monitor`) and trio (:func:`amonitor`), resumed with ``since`` after every
reconnect so no event is lost or repeated.

:class:`MonitorState` is the sans-IO part (wsproto): the handshake, messages in,
events out, and the id to resume from. The drivers move bytes and reconnect when
the gateway closes (an ``overflow``, a restart) or cannot be reached, waiting a
little longer each time (:data:`RETRY_MAX` at most). Refusals (401, 403, 404, 400)
are raised: they do not get better by retrying.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import trio

from sockexec_py.errors import BrokerUnavailable, ProtocolError

from ._common import RECV_CHUNK, gateway_extra

with gateway_extra():
    from ._websocket import ACCEPTED, GatewayAddress, GatewayWebSocket

from .wire import raise_for_status

__all__ = ["RETRY_MAX", "MonitorEvent", "MonitorState", "amonitor", "monitor"]

#: The event types a monitor may ask for (``types=``).
MONITOR_EVENT_TYPES = frozenset({"scheduled", "queued", "started", "progress", "finished"})
#: The longest wait between two reconnects.
RETRY_MAX = 5.0
_RETRY_FIRST = 0.1


@dataclass(frozen=True, slots=True)
class MonitorEvent:
    """One job event: ``type`` is ``scheduled``, ``queued``, ``started``,
    ``progress`` or ``finished``; ``step`` names a task's step (None for the job
    itself); ``state``, the exit, ``duration`` and ``reason`` as the event has them
    (``finished`` has them all); ``data`` is the whole message."""

    id: int
    type: str
    job: str
    name: str
    time: str
    step: str | None = None
    state: str | None = None
    exitcode: int | None = None
    termsig: str | None = None
    duration: float | None = None
    reason: str | None = None
    progress: Mapping[str, Any] | None = None
    data: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MonitorEvent:
        try:
            return cls(
                id=int(data["id"]),
                type=data["type"],
                job=data["job"],
                name=data["name"],
                time=data["time"],
                step=data.get("step"),
                state=data.get("state"),
                exitcode=data.get("exitcode"),
                termsig=data.get("termsig"),
                duration=data.get("duration"),
                reason=data.get("reason"),
                progress=data.get("progress"),
                data=data,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"unexpected monitor message: {str(data)[:100]}") from exc


class MonitorState:
    """One monitor connection (sans-IO). ``since`` is the id to resume from: the
    last event received, or the gateway's ``last_id`` when it said ``ready`` or
    ``overflow``. :attr:`closed` once the gateway closed (reconnect then)."""

    def __init__(
        self,
        address: GatewayAddress,
        name: str | None,
        since: int | None,
        token: str | None,
        types: frozenset[str] | None = None,
    ) -> None:
        self._socket = GatewayWebSocket(address, token)
        self.name = name
        self.since = since
        self.types = types
        self._events: deque[MonitorEvent] = deque()
        self.ready = False

    def opening(self) -> bytes:
        """The upgrade request; events come in arrays (``batch=1``): fewer messages
        for the gateway to send when many events come at once."""
        params = {"batch": "1"}
        if self.name:
            params["name"] = self.name
        if self.since is not None:
            params["since"] = str(self.since)
        if self.types:
            params["types"] = ",".join(sorted(self.types))
        return self._socket.opening("/v1/monitor?" + urlencode(params))

    @property
    def address(self) -> GatewayAddress:
        return self._socket.address

    @property
    def closed(self) -> bool:
        """True once the gateway closed the connection: reconnect."""
        return self._socket.closed

    def data_to_send(self) -> bytes:
        return self._socket.data_to_send()

    def receive_data(self, data: bytes) -> None:
        """Bytes from the gateway (``b""``: it closed). Error handling: a refusal
        raises its typed error (:func:`~.wire.raise_for_status`)."""
        for message in self._socket.receive(data):
            if message is not ACCEPTED:
                assert isinstance(message, str)
                self._message(json.loads(message))

    def _message(self, message: Any) -> None:
        if isinstance(message, list):  # batch=1: the messages in order
            for item in message:
                self._message(item)
            return
        kind = message.get("type") if isinstance(message, dict) else None
        if kind in ("ready", "overflow"):
            self.ready = self.ready or kind == "ready"
            last = message.get("last_id")
            if isinstance(last, int) and (self.since is None or last > self.since):
                self.since = last
            return
        if kind == "gap":
            # Events purged before we came back (nothing to read of them), or a
            # since ahead of the gateway's history: what follows starts at first_id.
            first = message.get("first_id")
            self.since = first - 1 if isinstance(first, int) else 0
            return
        if kind == "error":
            raise_for_status(int(message.get("status", 500)), json.dumps(message).encode())
        event = MonitorEvent.from_json(message)
        if self.since is None or event.id > self.since:
            self.since = event.id
            self._events.append(event)

    def next_event(self) -> MonitorEvent | None:
        return self._events.popleft() if self._events else None


def _gateway_url(target: str) -> str:
    if not target.startswith(("http://", "https://", "ws://", "wss://")):
        raise ValueError(f"monitors go through the gateway (http://HOST:PORT), not {target!r}")
    return target.replace("ws://", "http://", 1).replace("wss://", "https://", 1)


# -- blocking ------------------------------------------------------------------------


def monitor(
    target: str,
    name: str | None = None,
    *,
    since: int | None = None,
    token: str | None = None,
    reconnect: bool = True,
    types: Iterable[str] | None = None,
) -> Iterator[MonitorEvent]:
    """Job events of the gateway at ``target`` (of the job name ``name``, or all),
    as they happen, for ever; with ``since``, the kept events after that id first;
    with ``types`` (e.g. ``["finished"]``), only those types of events.

    After the gateway closes the connection (an overflow, a restart) or cannot be
    reached, it reconnects with ``since`` = the last event seen: nothing is lost or
    repeated. ``reconnect=False`` ends the iteration instead. Error handling: a
    refusal raises (``GatewayRefused``, 401/403/404/400). Leave the loop to stop
    (``contextlib.closing`` closes the connection at once).
    """
    address = GatewayAddress(_gateway_url(target))
    kinds = _types(types)
    delay = _RETRY_FIRST
    while True:
        state = MonitorState(address, name, since, token, kinds)
        try:
            with _connect(address) as sock:
                sock.sendall(state.opening())
                while not state.closed:
                    event = state.next_event()
                    if event is not None:
                        yield event
                        continue
                    try:
                        data = sock.recv(RECV_CHUNK)
                    except ConnectionResetError:
                        data = b""
                    state.receive_data(data)
                    if owed := state.data_to_send():
                        sock.sendall(owed)
                    if state.ready:
                        delay = _RETRY_FIRST
                while (event := state.next_event()) is not None:
                    yield event
        except (BrokerUnavailable, OSError):
            if not reconnect:
                raise
        since = state.since
        if not reconnect:
            return
        time.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)


def _types(types: Iterable[str] | None) -> frozenset[str] | None:
    """``types`` checked here (a ValueError), not by a refusal after connecting."""
    if types is None:
        return None
    if isinstance(types, str):
        types = types.split(",")
    kinds = frozenset(types)
    if unknown := kinds - MONITOR_EVENT_TYPES:
        raise ValueError(f"unknown event types: {', '.join(sorted(unknown))}")
    return kinds or None


def _connect(address: GatewayAddress) -> socket.socket:
    try:
        sock = socket.create_connection((address.host, address.port), timeout=30)
        sock.settimeout(None)
        if address.secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=address.host)
    except OSError as exc:
        raise BrokerUnavailable(f"cannot reach the gateway at {address.url}: {exc}") from None
    return sock


# -- trio ----------------------------------------------------------------------------


class _AsyncEvents:
    """The trio driver: ``connect(since)`` makes the state of each connection."""

    def __init__(self, connect: Callable[[int | None], MonitorState], since: int | None) -> None:
        self._connect = connect
        self.since = since
        self._state: MonitorState | None = None
        self._stream: trio.abc.Stream | None = None
        self._delay = _RETRY_FIRST

    def __aiter__(self) -> _AsyncEvents:
        return self

    async def __anext__(self) -> MonitorEvent:
        while True:
            if self._state is None or self._stream is None:
                await self._open()
                continue
            state, stream = self._state, self._stream
            event = state.next_event()
            if event is not None:
                self.since = state.since
                return event
            if state.closed:
                await self._drop()
                continue
            try:
                data = await stream.receive_some(RECV_CHUNK)
            except (trio.BrokenResourceError, OSError):
                data = b""
            state.receive_data(bytes(data))
            if owed := state.data_to_send():
                try:
                    await stream.send_all(owed)
                except (trio.BrokenResourceError, OSError):
                    await self._drop()
            if state.ready:
                self._delay = _RETRY_FIRST

    async def _open(self) -> None:
        state = self._connect(self.since)
        address = state.address
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)
            if address.secure:
                stream = trio.SSLStream(
                    stream, ssl.create_default_context(), server_hostname=address.host
                )
            await stream.send_all(state.opening())
        except (OSError, trio.BrokenResourceError):
            await trio.sleep(self._delay)
            self._delay = min(self._delay * 2, RETRY_MAX)
            return
        self._state, self._stream = state, stream

    async def _drop(self) -> None:
        if self._state is not None:
            self.since = self._state.since
        if self._stream is not None:
            await self._stream.aclose()
        self._state = self._stream = None
        await trio.sleep(self._delay)
        self._delay = min(self._delay * 2, RETRY_MAX)

    async def aclose(self) -> None:
        if self._stream is not None:
            with trio.CancelScope(shield=True):
                await self._stream.aclose()
        self._state = self._stream = None


@asynccontextmanager
async def amonitor(
    target: str,
    name: str | None = None,
    *,
    since: int | None = None,
    token: str | None = None,
    types: Iterable[str] | None = None,
) -> AsyncIterator[AsyncIterator[MonitorEvent]]:
    """The trio flavour of :func:`monitor`: ``async with amonitor(url, name) as
    events: async for event in events``; leaving the block closes the connection."""
    address = GatewayAddress(_gateway_url(target))
    kinds = _types(types)
    events = _AsyncEvents(lambda since: MonitorState(address, name, since, token, kinds), since)
    try:
        yield events
    finally:
        await events.aclose()
