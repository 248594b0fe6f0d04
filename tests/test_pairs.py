"""Every output pair leaves in one send (SPEC §3): lua-resty-exec reads the data
after a type with a 1 ms timeout and fails the nginx request when a pair is split.
A send may carry several whole pairs; it never carries part of one."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sockexec_py.broker import pairs as pair_writer
from sockexec_py.protocol import NEED_DATA, ClientSession, encode_request

from conftest import MISC, Broker, in_process_server


@pytest.mark.parametrize("uring", [True, False], ids=["io_uring", "sendmsg"])
async def test_each_pair_is_handed_to_the_socket_in_a_single_send(
    tmp_path: Path, uring: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output pairs through sendmsg; the exit pair too without io_uring, or with it
    the ring's SEND (see below)."""
    if not uring:
        monkeypatch.setattr(pair_writer, "_RING", None)
    path = str(tmp_path / "rec.sock")
    sent_by_fd: dict[int, list[bytes]] = {}

    # A spy around the real sendmsg: what each call carried, per socket.
    original_sendmsg = socket.socket.sendmsg

    def recording_sendmsg(self: socket.socket, buffers: Any, *args: Any) -> int:
        sent = original_sendmsg(self, buffers, *args)
        sent_by_fd.setdefault(self.fileno(), []).append(b"".join(bytes(b) for b in buffers)[:sent])
        return sent

    server = in_process_server(path)
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
    # 1,000,000 + 300,000 bytes in pairs of at most 64 KiB, and the exit pair, which
    # the ring sends linked to the close (one SEND of the whole pair) where it exists.
    exit_pair = b"8:exitcode,1:0,"
    if uring and pairs_module_ring():
        assert pairs >= 16 + 5 and b"".join(sends) + exit_pair == bytes(reply)
    else:
        assert pairs >= 16 + 5 + 1 and b"".join(sends) == bytes(reply)


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


def pairs_module_ring() -> bool:
    """Whether this machine gives the broker an io_uring for the final send."""
    return pair_writer.final_ring() is not None
