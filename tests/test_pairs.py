"""Every output pair leaves in one send (SPEC §3): lua-resty-exec reads the data
after a type with a 1 ms timeout and fails the nginx request when a pair is split.
A send may carry several whole pairs; it never carries part of one."""

from __future__ import annotations

import fcntl
import math
import selectors
import socket
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sockexec_py.broker.config import ServerConfig
from sockexec_py.broker.hangup import HangupMonitor
from sockexec_py.broker.server import _SEND_BUFFER, Connection, Server
from sockexec_py.protocol import NEED_DATA, ClientSession, encode_output_pair, encode_request

from conftest import MISC, Broker


async def test_each_pair_is_handed_to_the_socket_in_a_single_send(tmp_path: Path) -> None:
    path = str(tmp_path / "rec.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(10)
    listener.setblocking(False)
    sent_by_fd: dict[int, list[bytes]] = {}

    # A spy around the real sendmsg: what each call carried, per socket.
    original_sendmsg = socket.socket.sendmsg

    def recording_sendmsg(self: socket.socket, buffers: Any, *args: Any) -> int:
        sent = original_sendmsg(self, buffers, *args)
        sent_by_fd.setdefault(self.fileno(), []).append(b"".join(bytes(b) for b in buffers)[:sent])
        return sent

    server = Server(ServerConfig(socket_path=path), listener)
    socket.socket.sendmsg = recording_sendmsg  # type: ignore[method-assign]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await client.connect(path)
            argv = [str(MISC / "print-bytes"), "1000000", "300000"]
            await client.send(encode_request(argv) + b"0:,")
            reply = bytearray()
            while data := await client.recv(1 << 20):
                reply += data
            client.close()
            server.request_shutdown()
    finally:
        socket.socket.sendmsg = original_sendmsg  # type: ignore[method-assign]

    (sends,) = sent_by_fd.values()
    pairs = 0
    for sent in sends:
        # Each send carries whole pairs only: they parse on their own, and their
        # lengths add up to exactly what was sent (no pair continues in the next send).
        session = ClientSession()
        session.receive_data(sent)
        events = []
        while (event := session.next_event()) is not NEED_DATA:
            events.append(event)
        lengths = _pair_lengths(sent)
        assert len(events) == len(lengths) >= 1, sent[:40]
        pairs += len(lengths)
    # 1,000,000 + 300,000 bytes in pairs of at most 64 KiB, and the exit pair.
    assert pairs >= 16 + 5 + 1
    assert b"".join(sends) == bytes(reply)


@pytest.mark.parametrize("measured", [True, False], ids=["siocoutq", "pollout-only"])
async def test_pairs_stay_whole_when_short_lines_have_filled_the_send_queue(
    measured: bool,
) -> None:
    """A client reading late: short pairs fill the send queue, whose kernel footprint is
    far above their bytes (~1 KiB each); a large output must then wait for room rather
    than go out cut at the point where the kernel stops taking buffers. Also where the
    queue cannot be measured (no SIOCOUTQ): one pair per POLLOUT."""
    sends: list[tuple[int, int]] = []
    sock, theirs = _spied_socketpair(sends, _SEND_BUFFER)
    send_buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    conn = Connection(1, sock, math.inf, HangupMonitor())
    short_pair = b"".join(encode_output_pair("stdout", b"x" * 100))
    while _queued(sock) < send_buffer - 20_000:  # short lines nobody reads yet
        if measured:
            await conn.send_output("stdout", b"x" * 100)
        else:  # one pair per POLLOUT could not fill the queue this far: send directly
            sock.sendmsg([short_pair])
    if not measured:
        conn._measurable = False  # as on a system without SIOCOUTQ
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
            await conn.send_output("stdout", b"B" * 300_000)
    assert sends[short:], "the large output was not sent"
    assert all(sent == wanted for wanted, sent in sends), sends[short:]
    data = _stdout_of(bytes(received))
    assert data == b"x" * 100 * short + b"B" * 300_000
    conn.close()
    theirs.close()


@pytest.mark.parametrize("requested", [2048, 16384, 32768])  # the kernel doubles it
async def test_pairs_stay_whole_with_a_tiny_send_buffer(requested: int) -> None:
    """Where net.core.wmem_max is tiny, a 64 KiB pair would need more kernel buffers
    than the socket allows at once: pairs get smaller instead of being cut."""
    sends: list[tuple[int, int]] = []
    sock, theirs = _spied_socketpair(sends, requested)
    conn = Connection(1, sock, math.inf, HangupMonitor())
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
            await conn.send_output("stdout", b"B" * 300_000)
            conn.close()
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


def _pair_lengths(data: bytes) -> list[int]:
    """Lengths of the whole pairs (type netstring + data netstring) making up ``data``;
    fails when the last pair is cut short."""
    lengths = []
    start = 0
    while start < len(data):
        end = start
        for _ in range(2):
            colon = data.index(b":", end)
            end = colon + 1 + int(data[end:colon]) + 1
            assert end <= len(data), f"a pair is cut at the end of a send: {data[start:][:40]!r}"
            assert data[end - 1 : end] == b",", data[start:][:40]
        lengths.append(end - start)
        start = end
    return lengths


def _lua_like_session(path: Path, argv: list[str]) -> str | None:
    """Read as lua-resty-exec does: after each type, the data must follow within 1 ms
    (a split pair is a fatal `timeout` there); the close must follow the exit pair.
    Returns an error or None."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(encode_request(argv) + b"0:,")
        buffer = b""
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ)

        def read_more(timeout: float) -> bytes | None:
            if not selector.select(timeout):
                return None
            return sock.recv(1 << 20)

        def frame(timeout: float) -> bytes | None:
            nonlocal buffer
            while True:
                colon = buffer.find(b":")
                if colon > 0 and len(buffer) > colon + 1 + int(buffer[:colon]):
                    length = int(buffer[:colon])
                    payload = buffer[colon + 1 : colon + 1 + length]
                    buffer = buffer[colon + 2 + length :]
                    return payload
                data = read_more(timeout)
                if not data:
                    return None
                buffer += data

        while True:
            kind = frame(30)
            if kind is None:
                return "closed before the exit pair"
            data = frame(0.001)
            if data is None:
                return f"timeout: {kind!r} data did not follow within 1 ms"
            if kind in (b"exitcode", b"termsig"):
                if buffer:
                    return "bytes after the exit pair"
                # The server closes right after the exit pair, in the same step; how
                # soon the EOF lands also depends on the OS scheduling the server on a
                # loaded machine, so only its arrival (and nothing before it) is checked.
                closed = read_more(5)
                if closed != b"":
                    return f"no close after the exit pair (got {closed!r})"
                return None if data == b"0" else f"exit {data!r}"


def test_two_hundred_parallel_lua_like_clients_all_succeed(broker: Broker) -> None:
    argv = ["sh", "-c", "echo start; echo warn >&2; head -c 300000 /dev/zero; echo end"]
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        error = _lua_like_session(broker.path, argv)
        if error:
            with lock:
                errors.append(error)

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert errors == [], f"{len(errors)} failures, e.g. {errors[:3]}"
    assert time.monotonic() - started < 60
