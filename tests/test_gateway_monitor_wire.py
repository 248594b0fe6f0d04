"""The wire monitors' units on socket pairs: the fan-out's rounds (events in order,
arrays for ``batch``, an overflow's message and close) and nothing written after
a close frame."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
import trio

from sockexec_py.gateway.monitor_wire import FanOut, WireMonitor
from sockexec_py.jobs.events import Event, EventHub


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each whole unmasked frame in ``data``."""
    out = []
    while len(data) >= 2:
        opcode, length, start = data[0] & 0x0F, data[1] & 0x7F, 2
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 4
        out.append((opcode, data[start : start + length]))
        data = data[start + length :]
    return out


def received(peer: socket.socket) -> bytes:
    """What the monitor's side wrote so far (it writes without waiting)."""
    data = b""
    while True:
        try:
            data += peer.recv(1 << 20)
        except BlockingIOError:
            return data


def event(event_id: int, kind: str = "finished") -> Event:
    text = json.dumps({"id": event_id, "type": kind, "job": f"j{event_id}", "name": "n"})
    return Event(event_id, f"j{event_id}", "n", kind, text)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """The tests' socket pairs, closed at the end."""
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def pair(sockets: list[socket.socket], batch: bool = False) -> tuple[WireMonitor, socket.socket]:
    """A monitor on one end of a socket pair; the other end, non-blocking."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    sockets += (ours, theirs)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    return WireMonitor(stream, batch, b""), theirs


async def test_a_round_writes_each_monitors_events_in_order(
    sockets: list[socket.socket],
) -> None:
    hub = EventHub()
    fanout = FanOut()
    single, single_peer = pair(sockets)
    batched, batched_peer = pair(sockets, batch=True)
    fanout.add(single, hub.subscribe(), 0)
    fanout.add(batched, hub.subscribe(), 1)  # it saw event 1 already (its replay)
    hub.publish([event(1), event(2, "started"), event(3)])
    fanout.round()
    texts = [json.loads(p) for op, p in server_frames(received(single_peer))]
    assert [t["id"] for t in texts] == [1, 2, 3]
    (array,) = [json.loads(p) for op, p in server_frames(received(batched_peer))]
    assert [t["id"] for t in array] == [2, 3]
    fanout.round()  # nothing new: nothing written
    assert received(single_peer) == b""


async def test_an_overflowed_monitor_gets_the_message_and_a_1013_close(
    sockets: list[socket.socket],
) -> None:
    hub = EventHub(limit=2)
    fanout = FanOut()
    monitor, peer = pair(sockets)
    fanout.add(monitor, hub.subscribe(), 0)
    hub.publish([event(1), event(2), event(3)])
    fanout.round()
    got = server_frames(received(peer))
    assert got[0] == (0x1, b'{"type": "overflow", "last_id": 0}')
    assert got[1][0] == 0x8 and got[1][1][:2] == (1013).to_bytes(2, "big")
    assert monitor.over.is_set() and monitor not in fanout.monitors


async def test_nothing_is_written_after_the_close_frame(
    sockets: list[socket.socket],
) -> None:
    """A replay page that comes back from the store after the gateway closed the
    monitor (shutdown) is dropped, not written after the close."""
    monitor, peer = pair(sockets)
    monitor.close(1001, ['{"type": "last"}'])
    monitor.write(b"\x81\x04late")
    await monitor.send(['{"type": "later"}'])
    got = server_frames(received(peer))
    assert [op for op, _ in got] == [0x1, 0x8]
    assert got[1][1][:2] == (1001).to_bytes(2, "big")


@pytest.mark.parametrize(
    "answer",
    [
        b"\x81\x04oops",  # unmasked: a protocol error
        b"\x88\x82\x00\x00\x00\x00\x03\xe8",  # its close: the handshake's end
    ],
)
async def test_what_the_client_sends_after_our_close_ends_it_quietly(
    sockets: list[socket.socket], answer: bytes
) -> None:
    """After our close frame (an overflow's 1013), a bad frame or the client's close
    ends the monitor: nothing more is written, nothing raised (a review found a bad
    frame made the reading raise)."""
    monitor, peer = pair(sockets)
    monitor.close(1013)
    peer.sendall(answer)
    with trio.fail_after(5):
        await monitor.reading()
    assert monitor.over.is_set() and not monitor.left
    got = server_frames(received(peer))
    assert [op for op, _ in got] == [0x8]  # our close, and nothing after it


async def test_a_client_that_stops_reading_its_replay_is_ended_as_overflowed(
    sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay page the client does not read within REPLAY_STALL ends the monitor
    like an overflow: the overflow message (the page's last id) and a 1013 close
    follow what it has not read yet (a review found it was held forever)."""
    monkeypatch.setattr("sockexec_py.gateway.monitor_wire.REPLAY_STALL", 0.2)
    monitor, peer = pair(sockets)
    page = [f'{{"id":{i},"type":"finished","pad":"{"x" * 4000}"}}' for i in range(1, 501)]
    with trio.fail_after(5):
        await monitor.send(page)  # 2 MB: more than the socket pair holds
    assert monitor.over.is_set()
    data = b""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor.flushing)  # what it writes as the client reads
            while not any(op == 0x8 for op, _ in server_frames(data)):
                await trio.lowlevel.wait_readable(peer)
                data += received(peer)
            nursery.cancel_scope.cancel()
    got = server_frames(data)
    assert len(got) == 502 and json.loads(got[-2][1]) == {"type": "overflow", "last_id": 500}
    assert got[-1][1][:2] == (1013).to_bytes(2, "big")


async def test_a_replay_stalled_on_its_ready_message_says_the_replays_last_id(
    sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The overflow's last_id is the last id the replay sent, the ready message's
    included (0 would send a client that reconnects with it through everything)."""
    monkeypatch.setattr("sockexec_py.gateway.monitor_wire.REPLAY_STALL", 0.2)
    monitor, _peer = pair(sockets)
    filler = [f'{{"id":{i},"type":"finished","pad":"{"x" * 4000}"}}' for i in range(1, 501)]
    with trio.fail_after(5):
        await monitor.send([*filler, json.dumps({"type": "ready", "last_id": 777})])
    assert monitor.over.is_set() and monitor.sent == 777
    assert json.dumps({"type": "overflow", "last_id": 777}).encode() in bytes(monitor.pending)
