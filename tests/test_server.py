"""The broker end to end: real processes, a real Unix socket, raw protocol bytes."""

from __future__ import annotations

import os
import random
import select
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sockexec_py.events import Exited, Output
from sockexec_py.protocol import NEED_DATA, ClientSession, encode_request

from conftest import (
    MISC,
    Broker,
    StartBroker,
    connect,
    parse_reply,
    pid_alive,
    read_all,
    run,
    run_raw,
    wait_exit,
    wait_until,
)


def test_uname_example_from_the_spec(broker: Broker) -> None:
    reply = run_raw(broker.path, b"1:2,5:uname,2:-a,0:,")
    expected = subprocess.run(["uname", "-a"], capture_output=True, check=True).stdout
    assert reply == b"6:stdout,%d:%b,8:exitcode,1:0," % (len(expected), expected)


def test_cat_is_interactive(broker: Broker) -> None:
    """Output arrives while stdin is still open: send, read the echo, send more."""
    with connect(broker.path, timeout=10) as sock:
        sock.sendall(b"1:1,3:cat,5:hello,")
        assert sock.recv(100) == b"6:stdout,5:hello,"
        sock.sendall(b"1: ,")
        assert sock.recv(100) == b"6:stdout,1: ,"
        sock.sendall(b"3:abc,")
        assert sock.recv(100) == b"6:stdout,3:abc,"
        sock.sendall(b"0:,")
        assert read_all(sock) == b"8:exitcode,1:0,"


def test_stdin_sent_after_a_pause_reaches_the_program(broker: Broker) -> None:
    """The request alone first (no stdin task waits on the socket then); stdin later."""
    with connect(broker.path, timeout=10) as sock:
        sock.sendall(encode_request(["sh", "-c", "echo ready; exec cat"]))
        assert sock.recv(100) == b"6:stdout,6:ready\n,"  # the program runs, stdin is idle
        sock.sendall(b"5:hello,")
        assert sock.recv(100) == b"6:stdout,5:hello,"
        sock.sendall(b"0:,")
        assert read_all(sock) == b"8:exitcode,1:0,"


@pytest.mark.parametrize(
    "request_bytes, later",
    [
        # Garbage in the stdin phase, after the program started.
        (encode_request(["sleep", "100"]), b"xyz"),
        # Anything after the end of stdin (`0:,`) is a protocol error too.
        (encode_request(["sleep", "100"]) + b"0:,", b"1:a,"),
    ],
    ids=["garbage-in-stdin", "data-after-end-of-stdin"],
)
def test_a_protocol_error_after_the_start_terminates_the_program(
    broker: Broker, request_bytes: bytes, later: bytes
) -> None:
    """SPEC §4: logged, the program terminated as on disconnect, the exit pair says how."""
    with connect(broker.path, timeout=10) as sock:
        sock.sendall(request_bytes)
        broker.dump_until("state=running")  # the program runs: the garbage comes after the start
        sock.sendall(later)
        result = parse_reply(read_all(sock))
    assert (result.exitcode, result.termsig) == (None, "TERM")


def test_half_close_after_end_of_stdin_keeps_the_session(broker: Broker) -> None:
    """A client that sent `0:,` and then shut down its write side still gets it all."""
    argv = [str(MISC / "slow-print"), "3", "50"]
    reply = run_raw(broker.path, encode_request(argv) + b"0:,", half_close=True)
    assert parse_reply(reply).stdout == b"line 1\nline 2\nline 3\n"


def test_five_megabytes_of_random_bytes_through_cat(broker: Broker) -> None:
    payload = random.Random(7).randbytes(5_000_000)
    chunks = [payload[i : i + 300_000] for i in range(0, len(payload), 300_000)]
    request = encode_request(["cat"], chunks) + b"0:,"
    result = parse_reply(run_raw(broker.path, request))
    assert result.stdout == payload
    assert result.stderr == b""
    assert result.exitcode == 0


def test_stdout_and_stderr_are_kept_apart(broker: Broker) -> None:
    result = run(broker.path, [str(MISC / "print-bytes"), "300000", "200000"])
    assert result.stdout == b"o" * 300_000
    assert result.stderr == b"e" * 200_000
    assert result.exitcode == 0
    assert all(len(e.data) <= 64 * 1024 for e in result.events if hasattr(e, "data"))


def test_exit_status_is_reported(broker: Broker) -> None:
    assert run(broker.path, ["sh", "-c", "exit 3"]).exitcode == 3


def test_death_by_signal_is_reported_by_name(broker: Broker) -> None:
    result = run(broker.path, ["sh", "-c", "kill -SEGV $$"])
    assert (result.exitcode, result.termsig) == (None, "SEGV")


def test_termsig_as_number(start_broker: StartBroker) -> None:
    broker = start_broker("--termsig-format", "number")
    assert run(broker.path, ["sh", "-c", "kill -HUP $$"]).termsig == str(int(signal.SIGHUP))


def test_program_ignoring_term_is_killed_after_kill_timeout(start_broker: StartBroker) -> None:
    broker = start_broker("-t", "1", "-k", "1")
    started = time.monotonic()
    result = run(broker.path, [str(MISC / "ignore-term")])
    elapsed = time.monotonic() - started
    assert result.stdout.startswith(b"ready ")
    assert (result.exitcode, result.termsig) == (None, "KILL")
    assert elapsed < 5, elapsed  # -t 1 then -k 1: about 2 s
    assert not pid_alive(int(result.stdout.split()[1]))


def test_deadline_terminates_a_silent_program(start_broker: StartBroker) -> None:
    broker = start_broker("-t", "1")
    result = run(broker.path, ["sleep", "100"])
    assert result.termsig == "TERM"


def test_missing_program_is_127(broker: Broker) -> None:
    result = run(broker.path, ["no-such-program-here"])
    assert result.stderr == b"sockexec_py: no-such-program-here: program not found\n"
    assert result.exitcode == 127


def test_non_executable_file_is_126(broker: Broker, tmp_path: Path) -> None:
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    result = run(broker.path, [str(script)])
    assert result.stderr.startswith(b"sockexec_py: ")
    assert b"cannot execute" in result.stderr
    assert result.exitcode == 126


def test_bad_format_executable_is_126(broker: Broker, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x7fELF not really")
    garbage.chmod(0o755)
    result = run(broker.path, [str(garbage)])
    assert result.exitcode == 126
    assert b"cannot execute" in result.stderr


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (b"1:0,", b"argc must be at least 1"),
        (b"1:x,", b"argc is not a decimal number"),
        (b"01:1,", b"leading zero"),
        (b"1:1,3:ca", None),  # truncated: answered only after the half-close
        (b"1:2,3:cat,1:\0,0:,", b"argument 1 contains a NUL byte"),
        (b"GET / HTTP/1.1\r\n\r\n", b"invalid character in netstring length"),
        (b"1:1,3:cat!", b"not terminated by ','"),
    ],
)
def test_bad_requests_are_refused_in_band_with_125(
    broker: Broker, request_bytes: bytes, reason: bytes | None
) -> None:
    result = parse_reply(run_raw(broker.path, request_bytes, half_close=True))
    assert result.exitcode == 125
    assert result.stderr.startswith(b"sockexec_py: ") and result.stderr.endswith(b"\n")
    assert result.stderr.count(b"\n") == 1
    if reason is not None:
        assert reason in result.stderr


def test_frame_longer_than_max_frame_is_refused_at_once(start_broker: StartBroker) -> None:
    broker = start_broker("--max-frame", "1000")
    with connect(broker.path, timeout=10) as sock:
        sock.sendall(b"1:1,99999999999999:")  # no payload follows: refused on the digits
        result = parse_reply(read_all(sock))
    assert result.exitcode == 125
    assert b"longer than the limit of 1000 bytes" in result.stderr


def test_argc_above_max_args_is_refused(start_broker: StartBroker) -> None:
    broker = start_broker("--max-args", "3")
    result = parse_reply(run_raw(broker.path, b"1:4,"))
    assert result.exitcode == 125
    assert b"exceeds the limit of 3 arguments" in result.stderr


def count_stream(sock: socket.socket) -> tuple[int, Exited | None]:
    """Read a reply to the end, counting stdout bytes without keeping them."""
    session = ClientSession(max_frame=1 << 20)
    total, exited = 0, None
    buf = bytearray(1 << 20)
    while True:
        n = sock.recv_into(buf)
        session.receive_data(bytes(buf[:n]))
        while (event := session.next_event()) is not NEED_DATA:
            if isinstance(event, Output):
                total += len(event.data)
            else:
                exited = event
        if not n:
            return total, exited


def _fifo_pid(fifo: Path) -> list[int]:
    """Read the pids a program wrote into a FIFO (blocks until it writes)."""
    with open(fifo) as f:
        return [int(p) for p in f.read().split()]


def test_client_disconnect_kills_a_silent_program_and_its_group(
    broker: Broker, tmp_path: Path
) -> None:
    fifo = tmp_path / "pids"
    os.mkfifo(fifo)
    script = f"sleep 100 & echo $$ $! > {fifo}; wait"
    sock = connect(broker.path)
    sock.sendall(encode_request(["sh", "-c", script]))
    pids = _fifo_pid(fifo)
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)
    sock.close()  # a full close, while the program prints nothing
    wait_exit(pids, timeout=5)
    assert not any(pid_alive(p) for p in pids)


def test_half_close_ends_stdin_and_output_still_arrives(broker: Broker) -> None:
    reply = run_raw(broker.path, b"1:1,3:cat,5:hello,", half_close=True)
    assert reply == b"6:stdout,5:hello,8:exitcode,1:0,"
    reply = run_raw(
        broker.path, encode_request([str(MISC / "slow-print"), "3", "50"]), half_close=True
    )
    result = parse_reply(reply)
    assert result.stdout == b"line 1\nline 2\nline 3\n"
    assert result.exitcode == 0


def test_drain_timeout_bounds_a_background_child_holding_stdout(start_broker: StartBroker) -> None:
    broker = start_broker("--drain-timeout", "0.5")
    started = time.monotonic()
    result = run(broker.path, [str(MISC / "std-fds"), "background", "30"])
    assert result.stdout == b"parent done\n"
    assert result.exitcode == 0
    assert time.monotonic() - started < 10


def test_child_gets_only_std_fds_and_default_signals(broker: Broker) -> None:
    assert run(broker.path, [str(MISC / "std-fds"), "list"]).stdout == b"0 1 2\n"
    status = run(broker.path, ["cat", "/proc/self/status"]).stdout.decode()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert int(fields["SigBlk"], 16) == 0
    # Signals 1-31 (SIGPIPE included) are at their default disposition. (32 and 33 are
    # glibc's own and cannot be reset by posix_spawn.)
    assert int(fields["SigIgn"], 16) & 0x7FFFFFFF == 0
    pgid = int(
        run(
            broker.path, ["sh", "-c", "ps -o pgid= -p $$ || cut -d' ' -f5 /proc/$$/stat"]
        ).stdout.split()[0]
    )
    assert pgid != os.getpgid(broker.pid)


def test_client_that_reads_nothing_blocks_the_program_not_the_server(broker: Broker) -> None:
    gib = 1 << 30
    idle_kib = broker.rss_kib()
    with connect(broker.path, timeout=60) as sock:
        sock.sendall(encode_request(["head", "-c", str(gib), "/dev/zero"]) + b"0:,")
        wait_until(lambda: len(broker.children()) == 1, 10, "the program to start")
        (pid,) = broker.children()

        def written() -> int:
            with open(f"/proc/{pid}/io") as f:
                return int(next(line for line in f if line.startswith("wchar:")).split()[1])

        # Wait until the whole chain (pipe, server, socket) is full: wchar stops moving.
        previous = -1
        deadline = time.monotonic() + 20
        while (current := written()) != previous:
            assert time.monotonic() < deadline, "the program never blocked"
            previous = current
            select.select([], [], [], 0.2)
        assert pid_alive(pid), "the program finished: nothing held it back"
        assert current < gib // 4
        growth_mib = (broker.rss_kib() - idle_kib) / 1024
        assert growth_mib < 8, f"server RSS grew by {growth_mib:.1f} MiB"
        # Now read everything: no byte was lost while the program was held back.
        stdout_bytes, exited = count_stream(sock)
    assert stdout_bytes == gib and exited == Exited(exitcode=0)


def test_socket_mode_is_applied(start_broker: StartBroker) -> None:
    broker = start_broker("-M", "0600")
    st = os.stat(broker.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    broker2 = start_broker()  # default 0660
    assert stat.S_IMODE(os.stat(broker2.path).st_mode) == 0o660


def test_connections_beyond_m_are_queued_not_dropped(start_broker: StartBroker) -> None:
    broker = start_broker("-m", "2")
    first, second, third = (connect(broker.path, timeout=20) for _ in range(3))
    for sock, text in ((first, b"a"), (second, b"b")):
        sock.sendall(encode_request(["cat"], [text]))
        assert sock.recv(100) == b"6:stdout,1:%b," % text
    third.sendall(encode_request(["cat"], [b"c"]))
    report = broker.dump_until("state=queued")
    assert report.count("state=running") == 2
    assert len(broker.children()) == 2
    first.sendall(b"0:,")
    assert read_all(first) == b"8:exitcode,1:0,"
    assert third.recv(100) == b"6:stdout,1:c,"  # served once a slot freed
    for sock in (second, third):
        sock.sendall(b"0:,")
        assert read_all(sock) == b"8:exitcode,1:0,"
        sock.close()
    first.close()


def test_thousand_clients_connecting_at_once_are_all_served(broker: Broker) -> None:
    """As nginx does: non-blocking connects, where EAGAIN is an immediate failure."""
    clients = []
    try:
        for _ in range(1000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            clients.append(sock)
            sock.connect(str(broker.path))  # raises BlockingIOError if the backlog is full
        request = encode_request(["true"]) + b"0:,"
        replies = {sock: bytearray() for sock in clients}
        for sock in clients:
            sock.setblocking(True)
            sock.sendall(request)
            sock.setblocking(False)
        # epoll, not select(): after other tests these fds may be numbered past 1023.
        pending = set(clients)
        with selectors.DefaultSelector() as selector:
            for sock in clients:
                selector.register(sock, selectors.EVENT_READ)
            deadline = time.monotonic() + 90
            while pending:
                assert time.monotonic() < deadline, f"{len(pending)} clients never got a reply"
                for key, _ in selector.select(1):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    data = sock.recv(4096)
                    if data:
                        replies[sock] += data
                    else:
                        pending.discard(sock)
                        selector.unregister(sock)
        assert all(bytes(r) == b"8:exitcode,1:0," for r in replies.values())
    finally:
        for sock in clients:
            sock.close()


def test_bad_flags_give_a_usage_line_and_status_100(tmp_path: Path) -> None:
    for args in (
        ["-q", "0"],
        ["-M", "999"],
        ["-k", "0"],
        ["-k", "nan"],
        ["-t", "inf"],
        ["-t", "x"],
        ["--nope"],
        [],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "sockexec_py", *args, str(tmp_path / "s.sock")][
                : None if args else 3
            ],
            capture_output=True,
            timeout=30,
        )
        assert proc.returncode == 100, (args, proc.stderr)
        lines = proc.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sockexec-py: usage error: "), proc.stderr


def test_version_flag(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sockexec_py", "-v"], capture_output=True, timeout=30
    )
    assert proc.returncode == 0
    assert proc.stdout.decode().startswith("sockexec-py ")


def test_spawn_error_for_an_argv0_with_a_newline_is_one_line(broker: Broker) -> None:
    result = run(broker.path, [b"no-such\nprogram\xff"])
    assert result.exitcode == 127
    assert result.stderr == b"sockexec_py: no-such\\nprogram\\xff: program not found\n"


def test_an_empty_program_name_is_127_and_leaks_nothing(broker: Broker) -> None:
    """Found by fuzzing: argv[0] the empty netstring got no reply, an internal error,
    and cost the broker three pipe fds per request."""
    reply = parse_reply(run_raw(broker.path, b"1:1,0:,"))
    assert (reply.exitcode, reply.stderr) == (
        127,
        b"sockexec_py: the program name is empty: program not found\n",
    )
    broker.wait_idle()
    before = broker.open_fds()
    for _ in range(300):
        assert parse_reply(run_raw(broker.path, b"1:1,0:,0:,")).exitcode == 127
    broker.wait_idle()
    assert broker.open_fds() == before
    assert "internal error" not in broker.log()


def test_the_client_may_ask_for_termination_and_still_gets_the_exit(
    start_broker: StartBroker,
) -> None:
    broker = start_broker("-k", "1")
    with connect(broker.path) as sock:
        sock.sendall(encode_request(["sleep", "300"]) + b"0:,")
        sock.sendall(b"!")
        assert parse_reply(read_all(sock)).termsig == "TERM"
    # A program that ignores TERM gets KILL after -k, as on a hang-up.
    with connect(broker.path) as sock:
        sock.sendall(encode_request([str(MISC / "ignore-term")]))
        ready = sock.recv(100)
        assert ready.startswith(b"6:stdout,")  # it ignores TERM from now on
        sock.sendall(b"!")
        result = parse_reply(ready + read_all(sock))
        assert result.stdout.startswith(b"ready ") and result.termsig == "KILL"


def test_a_client_still_sending_stdin_when_the_program_ends_may_finish(broker: Broker) -> None:
    """``head -c 5`` fed 4 MiB: the program is gone long before the client has sent
    it all. Closing then would reset the connection in the middle of the client's
    send (nginx drops the reply lua-resty-exec had); the broker takes the rest of
    stdin (and drops it) up to the client's 0:, and then answers."""
    stdin = b"".join(b"65536:" + bytes(65536) + b"," for _ in range(64))
    for _ in range(5):
        with connect(broker.path) as sock:
            # All of stdin first, then read, as lua-resty-exec does: a reset would
            # fail the sendall.
            sock.sendall(encode_request(["head", "-c", "5"]) + stdin + b"0:,")
            reply = parse_reply(read_all(sock))
            assert (reply.stdout, reply.exitcode) == (bytes(5), 0)
