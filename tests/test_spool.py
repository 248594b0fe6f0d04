"""Spilling instead of stalling (SPEC §7): a client that writes all of its stdin before
reading (lua-resty-exec) gets everything, in order, in whole pairs, with the broker's
memory bounded; past the caps, or when the spool cannot be written, backpressure as
before and never a lost byte."""

from __future__ import annotations

import contextlib
import resource
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sockexec_py.netstring import encode
from sockexec_py.protocol import encode_request

from conftest import Broker, StartBroker, parse_reply, wait_until

EIGHT_MIB = bytes(range(256)) * (8 << 12)


def _lua_like(path: Path, argv: list[str], stdin: bytes, timeout: float = 60) -> bytes:
    """All of stdin and ``0:,`` first, and only then read: lua-resty-exec's one-shot."""
    chunks = [encode(stdin[i : i + 65536]) for i in range(0, len(stdin), 65536)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(encode_request(argv) + b"".join(chunks) + b"0:,")
        reply = bytearray()
        while data := sock.recv(1 << 20):
            reply += data
    return bytes(reply)


def test_eight_mib_through_cat_from_a_client_that_reads_last(broker: Broker) -> None:
    rss_before = broker.rss_kib()
    result = parse_reply(_lua_like(broker.path, ["cat"], EIGHT_MIB))
    assert (result.exitcode, len(result.stdout)) == (0, len(EIGHT_MIB))
    assert result.stdout == EIGHT_MIB
    assert broker.rss_kib("VmHWM") - rss_before < 16 << 10  # spilled to disk, not RAM


def test_without_the_spool_the_same_client_stalls_until_the_deadline(
    start_broker: StartBroker,
) -> None:
    broker = start_broker("--max-spool", "0", "-t", "2")
    result = parse_reply(_lua_like(broker.path, ["cat"], EIGHT_MIB))
    assert result.termsig == "TERM" and len(result.stdout) < len(EIGHT_MIB)


def test_past_the_per_connection_cap_backpressure_comes_back(start_broker: StartBroker) -> None:
    broker = start_broker("--max-spool", str(2 << 20), "-t", "2")
    result = parse_reply(_lua_like(broker.path, ["cat"], EIGHT_MIB))
    assert result.termsig == "TERM"
    assert 2 << 20 < len(result.stdout) < len(EIGHT_MIB)
    assert result.stdout == EIGHT_MIB[: len(result.stdout)]  # a prefix: nothing lost


def test_the_total_cap_is_shared_by_connections(start_broker: StartBroker) -> None:
    """Two clients, a total of 3 MiB: together they cannot both spill 8 MiB."""
    broker = start_broker("--max-spool-total", str(3 << 20), "-t", "3")
    replies: list[bytes] = []

    def client() -> None:
        replies.append(_lua_like(broker.path, ["cat"], EIGHT_MIB))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    results = [parse_reply(r) for r in replies]
    assert len(results) == 2
    assert any(r.termsig == "TERM" for r in results)
    for r in results:
        assert r.stdout == EIGHT_MIB[: len(r.stdout)]


def test_an_unusable_spool_dir_is_backpressure_and_one_log_line(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    broker = start_broker("--spool-dir", str(not_a_dir), "-t", "2")
    result = parse_reply(_lua_like(broker.path, ["cat"], EIGHT_MIB))
    assert result.termsig == "TERM" and result.stdout == EIGHT_MIB[: len(result.stdout)]
    lines = [line for line in broker.log().splitlines() if "spool" in line]
    assert len(lines) == 1 and f"cannot create a spool file in {not_a_dir}" in lines[0], lines


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """Start processes with RLIMIT_FSIZE (their writes past it fail: a full disk)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_full_disk_loses_no_byte(tmp_path: Path) -> None:
    """The spool's writes fail past 1 MiB (RLIMIT_FSIZE stands for a full disk): what
    could not be spilled waits for the client, in order, and everything arrives."""
    with _file_size_limit(1 << 20):
        broker = Broker(tmp_path / "b.sock", ["-t", "60"])
    try:
        argv = ["seq", "1", "2000000"]  # 14.9 MB: each line tells where it belongs
        expected = subprocess.run(argv, capture_output=True, check=True).stdout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(60)
            sock.connect(str(broker.path))
            sock.sendall(encode_request(argv) + b"0:,")
            wait_until(lambda: "cannot write to the spool" in broker.log(), 30, "the failure")
            reply = bytearray()
            while data := sock.recv(1 << 20):
                reply += data
        result = parse_reply(bytes(reply))
        assert result.exitcode == 0 and result.stdout == expected
        assert len(broker.log().splitlines()) == 1  # one line says it
    finally:
        assert broker.stop() == 0


@pytest.mark.parametrize("spilled", [False, True])
def test_spooled_output_keeps_its_order_with_stderr(broker: Broker, spilled: bool) -> None:
    """stdout and stderr, spilled or not: each stream whole and in order, the exit pair
    last (parse_reply checks it). Spilled: 4 MB of output come before the program
    reads any stdin, while the client is still writing its 8 MiB."""
    script = "seq 1 300000; seq 1 300000 >&2; cat >/dev/null"
    result = parse_reply(
        _lua_like(broker.path, ["sh", "-c", script], EIGHT_MIB if spilled else b"")
    )
    expected = b"".join(b"%d\n" % i for i in range(1, 300001))
    assert (result.exitcode, result.stdout, result.stderr) == (0, expected, expected)
