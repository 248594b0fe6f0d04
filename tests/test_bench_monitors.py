"""The monitor row's receivers (``bench/jobs_monitors.py``): what they measure must
be right before any figure of theirs is. Frames are the gateway's own
(:func:`~sockexec_py.gateway.monitor_wire.text_frame`); the socket is a real
loopback TCP connection."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.jobs_monitors import Monitor, frame_size
from sockexec_py.gateway.monitor_wire import text_frame
from sockexec_py.jobs.document import rfc3339


@given(st.integers(0, 70000), st.integers(0, 12))
def test_frame_size_of_every_length_and_any_cut(size: int, cut: int) -> None:
    frame = text_frame(b"x" * size)
    head = frame[:cut]
    header = len(frame) - size
    assert frame_size(head) == (len(frame) if cut >= header else 0)


@pytest.fixture
def server() -> Iterator[tuple[int, list[socket.socket]]]:
    """A listener that answers one WebSocket upgrade and hands its side over."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def answer() -> None:
        conn, _ = listener.accept()
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the gateway's
        accepted.append(conn)
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield listener.getsockname()[1], accepted
    thread.join(5)
    for conn in accepted:
        conn.close()
    listener.close()


def finished(job: str, at: float) -> bytes:
    return text_frame(
        json.dumps({"id": 1, "type": "finished", "job": job, "time": rfc3339(at)}).encode()
    )


def test_each_message_is_dated_by_its_own_arrival(server: tuple[int, list[socket.socket]]) -> None:
    """Two messages 10 ms apart, read together: each keeps the kernel's stamp of its
    own segment (one read of both gets the later stamp for both). The segments stay
    apart only while the first is not acknowledged (the kernel merges an unread
    segment with the next once the sender let go of it), so the receiver delays its
    acknowledgements (``TCP_QUICKACK`` off, 40 ms at least) and the pair is tried
    again if a loaded machine slept past that."""
    port, accepted = server
    monitor = Monitor(port, stamps=True)
    try:
        read_apart(monitor, accepted[0])
    finally:
        monitor.sock.close()


def read_until(monitor: Monitor, done: Callable[[], bool]) -> bool:
    """Read what the socket holds until ``done()`` (True) or the gateway closed
    (False); at most 5 s."""
    deadline = time.monotonic() + 5
    while not done():
        left = deadline - time.monotonic()
        assert left > 0, "the monitor got nothing more"
        select.select([monitor.sock], [], [], left)
        if not monitor.readable():
            return False
    return True


def read_apart(monitor: Monitor, gateway: socket.socket) -> None:
    gaps = []
    for attempt in range(5):
        monitor.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
        at = time.time()
        gateway.sendall(finished(f"a{attempt}", at))
        time.sleep(0.01)  # a gap between the two arrivals, the subject of the test
        gateway.sendall(finished(f"b{attempt}", at))
        second = f"b{attempt}"
        assert read_until(monitor, lambda job=second: job in monitor.arrived)
        gaps.append(monitor.arrived[second] - monitor.arrived[f"a{attempt}"])
        if 0.009 <= gaps[-1] < 0.04:
            break
    else:
        pytest.fail(f"the two messages were dated {gaps} s apart")
    cut = finished("x" * 300, at)  # a frame cut short waits for its rest
    gateway.sendall(cut[:3])
    assert read_until(monitor, lambda: len(monitor.buffer) == 3)
    gateway.sendall(cut[3:] + finished("after", at))
    assert read_until(monitor, lambda: "after" in monitor.arrived)
    assert monitor.messages == 2 * len(gaps) + 2
    assert not monitor.buffer
    gateway.close()
    assert not read_until(monitor, lambda: False)  # the end of the stream is seen
