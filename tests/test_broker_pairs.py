"""The pair writer alone, on socketpairs: every pair whole in one ``sendmsg`` (SPEC
§3), whatever the send queue holds and however small the send buffer is."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import socket
import sys
import termios
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sockexec_py.broker import pairs, sendqueue
from sockexec_py.broker.connection import Connection
from sockexec_py.broker.oneshot import OneShot
from sockexec_py.broker.pairs import PairWriter
from sockexec_py.broker.sendqueue import footprint
from sockexec_py.broker.server import SEND_BUFFER
from sockexec_py.events import Exited, Output
from sockexec_py.protocol import NEED_DATA, ClientSession, encode_output_pair, encode_request

from conftest import in_process_server


@pytest.mark.parametrize("measured", [True, False], ids=["siocoutq", "pollout-only"])
async def test_pairs_stay_whole_when_short_lines_have_filled_the_send_queue(
    measured: bool,
) -> None:
    """A client reading late: short pairs fill the send queue, whose kernel footprint is
    far above their bytes (~1 KiB each); a large output must then wait for room rather
    than go out cut at the point where the kernel stops taking buffers. Also where the
    queue cannot be measured (no SIOCOUTQ): one pair per POLLOUT."""
    sends: list[tuple[int, int]] = []
    sock, theirs = _spied_socketpair(sends, SEND_BUFFER)
    send_buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    writer = PairWriter(sock)
    short_pair = b"".join(encode_output_pair("stdout", b"x" * 100))
    while _queued(sock) < send_buffer - 20_000:  # short lines nobody reads yet
        if measured:
            await writer.send_output("stdout", b"x" * 100)
        else:  # one pair per POLLOUT could not fill the queue this far: send directly
            sock.sendmsg([short_pair])
    if not measured:
        writer.room_meter.measurable = False  # as on a system without SIOCOUTQ
    short = len(sends)
    received = bytearray()
    chunks = [b"x" * 100] * short + [b"B" * 65536] * 4 + [b"B" * (300_000 - 4 * 65536)]
    expected = sum(len(b) for c in chunks for b in encode_output_pair("stdout", c))

    async def late_reader() -> None:
        await trio.testing.wait_all_tasks_blocked()  # the writer waits for room now
        theirs.setblocking(False)
        while len(received) < expected:
            await trio.lowlevel.wait_readable(theirs)
            received.extend(theirs.recv(1 << 20))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(late_reader)
            await writer.send_output("stdout", b"B" * 300_000)
    assert sends[short:], "the large output was not sent"
    assert all(sent == wanted for wanted, sent in sends), sends[short:]
    data = _stdout_of(bytes(received))
    assert data == b"x" * 100 * short + b"B" * 300_000
    writer.close()
    theirs.close()


@pytest.mark.parametrize("requested", [2048, 16384, 32768])  # the kernel doubles it
async def test_pairs_stay_whole_with_a_tiny_send_buffer(requested: int) -> None:
    """Where net.core.wmem_max is tiny, a 64 KiB pair would need more kernel buffers
    than the socket allows at once: pairs get smaller instead of being cut."""
    sends: list[tuple[int, int]] = []
    sock, theirs = _spied_socketpair(sends, requested)
    writer = PairWriter(sock)
    received = bytearray()
    theirs.setblocking(False)

    async def reader() -> None:
        while True:
            await trio.lowlevel.wait_readable(theirs)
            data = theirs.recv(1 << 20)
            if not data:
                return
            received.extend(data)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await writer.send_output("stdout", b"B" * 300_000)
            writer.close()
    assert sends and all(sent == wanted for wanted, sent in sends), sends
    data = _stdout_of(bytes(received))
    assert data == b"B" * 300_000
    theirs.close()


def _spied_socketpair(
    sends: list[tuple[int, int]], send_buffer: int
) -> tuple[socket.socket, socket.socket]:
    """A non-blocking socketpair whose first end records each sendmsg as (asked, sent)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    class Spy(socket.socket):
        def sendmsg(self, buffers: Any, *args: Any) -> int:
            sent = super().sendmsg(buffers, *args)
            sends.append((sum(len(b) for b in buffers), sent))
            return sent

    sock = Spy(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=ours.detach())
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    return sock, theirs


def _stdout_of(reply: bytes) -> bytes:
    """The stdout data of a stream of output pairs."""
    session = ClientSession()
    session.receive_data(reply)
    data = b""
    while (event := session.next_event()) is not NEED_DATA:
        data += event.data  # type: ignore[union-attr]
    return data


def _queued(sock: socket.socket) -> int:
    """The send queue's kernel footprint (SIOCOUTQ)."""
    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)), sys.byteorder)


async def test_the_final_send_closes_the_socket_and_drops_unread_input() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    closed: list[int] = []
    writer = PairWriter(ours, before_close=lambda: closed.append(ours.fileno()))
    theirs.sendall(b"unread stdin the program never took")
    await writer.send_final(b"8:exitcode,1:0,")
    assert writer.closed and closed and ours.fileno() == -1
    # The client sees the exit pair then EOF, not ECONNRESET for its unread bytes.
    assert theirs.recv(100) == b"8:exitcode,1:0,"
    assert theirs.recv(100) == b""
    assert writer.bytes_out == len(b"8:exitcode,1:0,")
    theirs.close()


async def test_a_vanished_client_breaks_the_writer_once() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    broken: list[bool] = []
    writer = PairWriter(ours, on_broken=lambda: broken.append(True))
    theirs.close()
    await writer.send_output("stdout", b"x" * 10)
    await writer.send_output("stderr", b"y" * 10)  # dropped: nobody can read it
    assert writer.broken and broken == [True] and writer.bytes_out == 0
    await writer.send_final(b"8:exitcode,1:0,")
    assert writer.closed


@contextmanager
def collector_off() -> Iterator[None]:
    """No garbage collection in the block: what a reference cycle keeps stays alive."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Owner:
    """Stands for the connection: it holds the writer, the writer its callbacks."""

    writer: PairWriter | None = None

    def on_close(self) -> None:
        pass


async def test_a_closed_writer_lets_go_of_its_owners_callbacks() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    with ours, theirs, collector_off():
        owner = _Owner()
        owner.writer = PairWriter(ours, before_close=owner.on_close, on_broken=owner.on_close)
        alive = weakref.ref(owner)
        await owner.writer.send_final(b"8:exitcode,1:0,")
        assert owner.writer.closed
        del owner
        assert alive() is None  # freed at once: no cycle through the callbacks


async def test_sessions_leave_no_reference_cycles_behind(tmp_path: Path) -> None:
    """A served session's objects are freed as it ends, without the collector: a
    cycle per session made it run every ~15 sessions, inside the round trip."""
    path = str(tmp_path / "gc.sock")
    server = in_process_server(path)
    gc.collect()
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage
    try:
        with collector_off(), trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                try:
                    for _ in range(20):
                        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                            await client.connect(path)
                            await client.send(encode_request(["true"]) + b"0:,")
                            reply = b""
                            while data := await client.recv(65536):
                                reply += data
                        assert reply.endswith(b"8:exitcode,1:0,")
                finally:
                    server.request_shutdown()
            gc.collect()
            left = [t for t in gc.garbage if isinstance(t, Connection | PairWriter | OneShot)]
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()
    assert left == []


def test_footprint_bounds_what_the_kernel_charges_for_a_pair() -> None:
    """The estimate against the real queue: each pair size sent alone to an unread
    socket costs no more kernel memory (SIOCOUTQ) than footprint() says."""
    for size in (0, 1, 100, 1000, 1714, 1811, 4096, 36_000, 65536):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.sendmsg(list(encode_output_pair("stdout", b"z" * size)))
        assert _queued(ours) <= footprint(size), size
        ours.close()
        theirs.close()


@pytest.mark.parametrize("uring", [True, False], ids=["io_uring", "sendmsg"])
async def test_the_final_send_and_close_run_back_to_back(
    uring: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The close race (issue 18): whatever closing does besides close(2) happens before
    the exit pair is sent, so nothing stands between the send that wakes the client
    and the close it waits for: one io_uring system call where there is one, else
    sendmsg and close back to back."""
    if not uring:
        monkeypatch.setattr(pairs, "_RING", None)
    calls: list[str] = []
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    class Spy(socket.socket):
        def sendmsg(self, buffers: Any, *args: Any) -> int:
            calls.append("sendmsg")
            return super().sendmsg(buffers, *args)

        def recv(self, *args: Any) -> bytes:
            calls.append("recv")
            return super().recv(*args)

        def close(self) -> None:
            calls.append("close")
            super().close()

    sock = Spy(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=ours.detach())
    sock.setblocking(False)
    fd = sock.fileno()
    writer = PairWriter(sock, before_close=lambda: calls.append("unwatch"))
    theirs.sendall(b"unread")
    await writer.send_final(b"8:exitcode,1:0,")
    assert calls[0] == "unwatch" and "recv" in calls
    if uring and pairs.final_ring() is not None:
        assert "sendmsg" not in calls  # the ring sent it, linked to the close
    else:
        assert calls[-2:] == ["sendmsg", "close"] and calls.count("sendmsg") == 1
    assert theirs.recv(100) == b"8:exitcode,1:0," and theirs.recv(100) == b""
    with pytest.raises(OSError):
        os.fstat(fd)  # closed, whichever way
    assert writer.closed and writer.bytes_out == len(b"8:exitcode,1:0,")
    theirs.close()


class WrongMeter(sendqueue.RoomMeter):
    """A room estimate that is wrong: room the socket does not have."""

    def room(self) -> int:
        return 1 << 30


async def test_a_nowait_batch_cut_short_is_finished_by_a_task_in_turn() -> None:
    """The room estimate wrong (forced here: the meter reports room the socket does not
    have): the part of the batch that did not fit goes on from a task, without blocking
    the caller; the output and exit pair sent meanwhile wait their turn, so the client
    reads every pair whole and in order."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    writer = PairWriter(ours)
    writer.room_meter = WrongMeter(ours)
    first, second = b"a" * 200_000, b"b" * 1000
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            writer.attach(nursery.start_soon)
            assert writer.send_output_nowait("stdout", first)  # returns at once, cut
            assert not writer.send_output_nowait("stderr", second)  # not its turn
            assert not writer.send_final_nowait(b"8:exitcode,1:0,")

            async def rest() -> None:
                await writer.send_output("stderr", second)
                await writer.send_final(b"8:exitcode,1:0,")

            nursery.start_soon(rest)
            received = bytearray()
            theirs.setblocking(False)
            while True:
                await trio.lowlevel.wait_readable(theirs)
                data = theirs.recv(65536)
                if not data:
                    break
                received += data
    theirs.close()
    client = ClientSession()
    client.receive_data(bytes(received))
    client.receive_data(b"")
    events = []
    while not isinstance(event := client.next_event(), Exited):
        assert isinstance(event, Output), event
        events.append((event.kind, bytes(event.data)))
    assert b"".join(data for kind, data in events if kind == "stdout") == first
    assert events[-1] == ("stderr", second)


def test_the_last_pair_cut_short_is_given_up_on_a_stalled_client() -> None:
    """sendqueue.send_rest finishes a final pair cut short without a scheduling point,
    and is bounded: a client that reads takes it all; one that stopped does not hold
    the broker for more than ``within``."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        cut_short_final(ours, theirs)


def cut_short_final(ours: socket.socket, theirs: socket.socket) -> None:
    ours.setblocking(False)
    filled = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            filled += ours.send(b"x" * 4096)
    rest = memoryview(b"y" * 50_000)
    with pytest.raises(TimeoutError):
        sendqueue.send_rest(ours.fileno(), [rest], within=0.05)
    received = bytearray()

    def reader() -> None:
        while data := theirs.recv(65536):
            received.extend(data)

    thread = threading.Thread(target=reader)
    thread.start()
    sendqueue.send_rest(ours.fileno(), [rest], within=10)
    ours.shutdown(socket.SHUT_WR)
    thread.join(10)
    assert len(received) == filled + len(rest) and received.endswith(bytes(rest))


async def test_a_cut_batch_whose_writer_closes_under_it_ends_quietly() -> None:
    """The task finishing a cut batch is woken (room came), and the session's end
    closes the writer before it runs, or after: either way it ends without an error
    (it is a task of the server's nursery: an error would end every session). Each
    round is a coin toss between the two orders; 30 rounds take both."""
    for _ in range(30):
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        theirs.setblocking(False)
        writer = PairWriter(ours)
        writer.room_meter = WrongMeter(ours)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                writer.attach(nursery.start_soon)
                assert writer.send_output_nowait("stdout", b"a" * 200_000)
                assert writer.bytes_out == 200_000 and not writer.send_final_nowait(b"")
                await trio.testing.wait_all_tasks_blocked()  # the task waits for room
                with contextlib.suppress(BlockingIOError):
                    while theirs.recv(1 << 20):
                        pass
                await trio.sleep(0)  # the task is woken: it runs before or after...
                writer.close()  # ... this close
        theirs.close()
        assert not writer.broken
