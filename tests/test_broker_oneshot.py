"""The one-shot session driven by callbacks, and each point where it hands a connection
over to the task-driven path: a real broker, raw protocol bytes.

Where the behaviour must not depend on the path, the test runs twice: with the
callback path (the default) and without it (``SOCKEXEC_PY_ONESHOT=0``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import struct
import termios
import threading
import time
from pathlib import Path

import pytest

from sockexec_py.events import Output
from sockexec_py.protocol import encode_request

from conftest import (
    MISC,
    Broker,
    StartBroker,
    connect,
    in_process_server,
    parse_reply,
    pid_alive,
    read_all,
    run,
    run_raw,
    wait_exit,
    wait_until,
)

TIMED_OUT = b"sockexec_py: timed out waiting for the request\n"
SHUTTING_DOWN = b"sockexec_py: the server is shutting down\n"


@pytest.fixture(params=[None, "0"], ids=["callbacks", "tasks"])
def env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The broker's environment: SOCKEXEC_PY_ONESHOT unset, or "0" (tasks only)."""
    env = {k: v for k, v in os.environ.items() if k != "SOCKEXEC_PY_ONESHOT"}
    if request.param is not None:
        env["SOCKEXEC_PY_ONESHOT"] = request.param
    return env


def read_line(sock: socket.socket) -> bytes:
    """Read one whole stdout pair of a line (``6:stdout,N:...\\n,``): its data."""
    data = b""
    while not data.endswith(b"\n,"):
        chunk = sock.recv(100)
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return parse_reply(data + b"8:exitcode,1:0,").stdout


def send_after_dump(broker: Broker, sock: socket.socket, parts: list[bytes]) -> None:
    """Send ``parts`` one by one, each once the broker has read all before it: the
    request arrives in as many reads (the broker waits for each)."""
    sent = 0
    for part in parts:
        sock.sendall(part)
        sent += len(part)
        broker.dump_until(f"in={sent} out=0 spooled=0 state=request")


# -- the request phase ---------------------------------------------------------------


@pytest.mark.parametrize("flags", [(), ("-t", "0")], ids=["t60", "t0"])
def test_request_split_across_writes_is_served(
    start_broker: StartBroker, env: dict[str, str], flags: tuple[str, ...]
) -> None:
    broker = start_broker(*flags, env=env)
    request = encode_request(["echo", "hi"]) + b"0:,"  # 1:2,4:echo,2:hi,0:,
    with connect(broker.path, timeout=10) as sock:  # cut inside the netstrings too
        send_after_dump(broker, sock, [request[:2], request[2:7], request[7:15]])
        sock.sendall(request[15:])
        assert read_all(sock) == b"6:stdout,3:hi\n,8:exitcode,1:0,"


def test_deadline_passing_while_the_request_is_incomplete(
    start_broker: StartBroker, env: dict[str, str]
) -> None:
    broker = start_broker("-t", "1", env=env)
    started = time.monotonic()
    with connect(broker.path, timeout=10) as sock:
        send_after_dump(broker, sock, [b"1:2,4:echo,"])
        reply = read_all(sock)
    elapsed = time.monotonic() - started
    assert reply == b"6:stderr,%d:%b,8:exitcode,3:125," % (len(TIMED_OUT), TIMED_OUT)
    assert 0.9 < elapsed < 5, elapsed
    broker.wait_idle()


# -- output the socket has no room for --------------------------------------------------


@pytest.mark.parametrize("spool", [64 << 20, 0], ids=["spooled", "backpressure"])
def test_output_beyond_the_socket_reaches_a_slow_reader_whole(
    start_broker: StartBroker, env: dict[str, str], spool: int
) -> None:
    broker = start_broker("--max-spool", str(spool), env=env)
    expected = b"".join(b"%d\n" % i for i in range(1, 300_001))  # about 2 MB
    with connect(broker.path, timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(encode_request(["seq", "300000"]) + b"0:,")
        if spool:  # it all went to the spool: only the client is left to read
            broker.dump_until("state=closing")
        else:  # the program blocks with the socket full
            broker.dump_until("state=running")
        chunks = []
        while data := sock.recv(4096):  # slowly: a page at a time
            chunks.append(data)
    result = parse_reply(b"".join(chunks))
    assert result.stdout == expected
    assert (result.stderr, result.exitcode) == (b"", 0)
    assert all(len(e.data) <= 64 * 1024 for e in result.events if isinstance(e, Output))
    broker.wait_idle()


def test_a_client_that_never_reads_is_cut_at_the_hard_bound(
    start_broker: StartBroker, env: dict[str, str]
) -> None:
    """No spool: the program blocks, the -t deadline terminates it, and the output it
    left can never be sent; past -t + -k + --drain-timeout + 1 the connection is cut."""
    flags = ("--max-spool", "0", "-t", "1", "-k", "1", "--drain-timeout", "0.5")
    broker = start_broker(*flags, env=env)
    started = time.monotonic()
    with connect(broker.path, timeout=10) as sock:
        sock.sendall(encode_request([str(MISC / "print-bytes"), "50000000"]) + b"0:,")
        broker.dump_until("state=running")
        wait_until(lambda: not broker.children(), 10, "the program's end")
        broker.wait_idle()
        elapsed = time.monotonic() - started
        reply = read_all(sock)
    assert 3.4 < elapsed < 8, elapsed
    assert reply.startswith(b"6:stdout,") and b"exitcode" not in reply[-200:]


# -- stdin after the request ---------------------------------------------------------


def test_stdin_sent_after_the_request_reaches_cat(
    start_broker: StartBroker, env: dict[str, str]
) -> None:
    broker = start_broker(env=env)
    with connect(broker.path, timeout=10) as sock:
        sock.sendall(encode_request(["cat"]))
        broker.dump_until("state=running")  # the program runs before any stdin
        for chunk in (b"hello", b" ", b"world\n"):
            sock.sendall(b"%d:%b," % (len(chunk), chunk))
            assert sock.recv(100) == b"6:stdout,%d:%b," % (len(chunk), chunk)
        sock.sendall(b"0:,")
        assert read_all(sock) == b"8:exitcode,1:0,"


def test_a_client_still_sending_stdin_when_the_program_ended(
    start_broker: StartBroker, env: dict[str, str]
) -> None:
    """``sh -c 'exit 3'`` reads nothing; the client streams stdin past its end, then
    ``0:,``: the exit pair still comes, after the client finished."""
    broker = start_broker(env=env)
    stdin = [b"x" * 1000] * 2000
    request = encode_request(["sh", "-c", "exec 0<&-; exit 3"], stdin) + b"0:,"
    result = parse_reply(run_raw(broker.path, request, reset_is_eof=True))
    assert (result.stdout, result.exitcode) == (b"", 3)
    broker.wait_idle()


# -- the end of a program ------------------------------------------------------------


def test_background_child_holding_stdout_delays_the_exit_pair_to_the_drain_timeout(
    start_broker: StartBroker, env: dict[str, str]
) -> None:
    broker = start_broker("--drain-timeout", "1", env=env)
    with connect(broker.path, timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(encode_request(["sh", "-c", "sleep 30 & echo $!"]) + b"0:,")
        background = int(read_line(sock))
        try:
            rest = read_all(sock)
            elapsed = time.monotonic() - started
            assert pid_alive(background)  # it still holds stdout: the drain timeout ended it
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(background, signal.SIGKILL)
    assert rest == b"8:exitcode,1:0,"
    assert 0.9 < elapsed < 5, elapsed


@pytest.mark.parametrize("end_stdin", [False, True], ids=["stdin-open", "stdin-closed"])
def test_client_hanging_up_terminates_its_program(
    start_broker: StartBroker, env: dict[str, str], end_stdin: bool
) -> None:
    broker = start_broker(env=env)
    with connect(broker.path, timeout=10) as sock:
        request = encode_request(["sh", "-c", "echo $$; exec sleep 100"])
        sock.sendall(request + (b"0:," if end_stdin else b""))
        pid = int(read_line(sock))
        assert pid_alive(pid)
    wait_exit(pid, timeout=10)
    broker.wait_idle()


def test_shutdown_answers_every_one_shot_session(
    start_broker: StartBroker, env: dict[str, str]
) -> None:
    broker = start_broker("-k", "1", env=env)
    running = connect(broker.path)
    waiting = connect(broker.path)
    chatting = connect(broker.path)
    try:
        running.sendall(encode_request(["sh", "-c", "echo $$; exec sleep 100"]) + b"0:,")
        pid = int(read_line(running))
        send_after_dump(broker, waiting, [b"1:1,"])  # the request phase
        chatting.sendall(encode_request(["cat"], [b"x"]))
        assert chatting.recv(100) == b"6:stdout,1:x,"
        started = time.monotonic()
        broker.proc.send_signal(signal.SIGTERM)
        assert parse_reply(read_all(running)).termsig == "TERM"
        assert read_all(waiting) == b"6:stderr,%d:%b,8:exitcode,3:125," % (
            len(SHUTTING_DOWN),
            SHUTTING_DOWN,
        )
        assert parse_reply(read_all(chatting)).termsig == "TERM"
        assert broker.proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 2.5  # within -k + 1 s
    finally:
        for sock in (running, waiting, chatting):
            sock.close()
    assert not broker.path.exists()
    assert not pid_alive(pid)


def stdout_pipe_is_full(pid: int) -> bool:
    """The program's stdout pipe holds all it can: the program blocks on write."""
    fd = os.open(f"/proc/{pid}/fd/1", os.O_RDONLY | os.O_NONBLOCK)
    try:
        (queued,) = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))
        return bool(queued == fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))
    finally:
        os.close(fd)


def test_shutdown_cuts_a_client_that_never_reads(
    start_broker: StartBroker, env: dict[str, str]
) -> None:
    """Its output can never all go out: the broker still exits within -k + 1 s."""
    broker = start_broker("--max-spool", "0", "-k", "1", env=env)
    with connect(broker.path, timeout=10) as sock:
        sock.sendall(encode_request([str(MISC / "print-bytes"), "50000000"]) + b"0:,")
        broker.dump_until("state=running")
        (pid,) = broker.children()
        wait_until(lambda: stdout_pipe_is_full(pid), 10, "a full pipe")
        started = time.monotonic()
        broker.proc.send_signal(signal.SIGTERM)
        assert broker.proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 2.5
        reply = read_all(sock)
    assert reply.startswith(b"6:stdout,") and b"exitcode" not in reply[-200:]
    assert not pid_alive(pid)


# -- admission -----------------------------------------------------------------------


def test_program_not_found_is_refused_with_127(
    start_broker: StartBroker, env: dict[str, str]
) -> None:
    broker = start_broker(env=env)
    result = run(broker.path, ["no-such-program-here"])
    assert result.stderr == b"sockexec_py: no-such-program-here: program not found\n"
    assert (result.stdout, result.exitcode) == (b"", 127)


def test_a_session_beyond_m_waits_its_turn(start_broker: StartBroker, env: dict[str, str]) -> None:
    broker = start_broker("-m", "1", env=env)
    with connect(broker.path, timeout=10) as first, connect(broker.path, timeout=10) as second:
        first.sendall(encode_request(["cat"], [b"x"]))
        assert first.recv(100) == b"6:stdout,1:x,"
        second.sendall(encode_request(["echo", "second"]) + b"0:,")
        broker.dump_until("state=queued")
        first.sendall(b"0:,")
        assert read_all(first) == b"8:exitcode,1:0,"
        assert read_all(second) == b"6:stdout,7:second\n,8:exitcode,1:0,"


def test_policy_refusals_limits_and_rule_timeouts(
    start_broker: StartBroker, env: dict[str, str], tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[allow]]\nprogram = "echo"\n'
        '[[allow]]\nprogram = "sleep"\ntimeout = 0.5\n'
        '[[allow]]\nprogram = "cat"\nmax_running = 1\n'
    )
    broker = start_broker("--policy", str(policy), env=env)
    assert run(broker.path, ["echo", "ok"]).stdout == b"ok\n"
    denied = run(broker.path, ["true"])
    assert denied.exitcode == 125 and denied.stderr.startswith(b"sockexec_py: denied: ")
    started = time.monotonic()
    assert run(broker.path, ["sleep", "30"]).termsig == "TERM"  # the rule's timeout
    assert time.monotonic() - started < 5
    assert run(broker.path, ["cat"], stdin=b"meow").stdout == b"meow"


# -- many sessions ----------------------------------------------------------------------


def test_many_sessions_end_well_and_leak_no_fd(
    start_broker: StartBroker, env: dict[str, str]
) -> None:
    broker = start_broker(env=env)
    assert run(broker.path, ["true"]).exitcode == 0  # first-session costs paid
    broker.wait_idle()
    fds = broker.open_fds()
    for _ in range(200):
        assert run_raw(broker.path, b"1:1,4:true,0:,") == b"8:exitcode,1:0,"
    replies: dict[int, bytes] = {}

    def client(i: int) -> None:
        replies[i] = run_raw(broker.path, encode_request(["echo", str(i)]) + b"0:,")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(replies) == list(range(50))
    for i, reply in replies.items():
        line = b"%d\n" % i
        assert reply == b"6:stdout,%d:%b,8:exitcode,1:0," % (len(line), line)
    broker.wait_idle()
    assert broker.open_fds() == fds


async def test_a_bug_in_a_callback_ends_its_session_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in a one-shot callback (a bug) is logged and ends that session,
    its program terminated; the broker goes on serving the next one."""
    import trio

    from sockexec_py.broker.oneshot import OneShot

    path = str(tmp_path / "bug.sock")
    server = in_process_server(path)
    real = OneShot._output_readable

    def broken(self: OneShot, kind: str) -> None:
        raise RuntimeError("a bug")

    async def session(argv: list[str]) -> bytes:
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            await client.connect(path)
            await client.send(encode_request(argv) + b"0:,")
            reply = b""
            while data := await client.recv(65536):
                reply += data
            return reply

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            try:
                monkeypatch.setattr(OneShot, "_output_readable", broken)
                assert await session(["sh", "-c", "echo out; exec sleep 60"]) == b""
                monkeypatch.setattr(OneShot, "_output_readable", real)
                assert (await session(["echo", "next"])).endswith(b"8:exitcode,1:0,")
                while server.supervisor.running:  # the sleep is terminated and reaped
                    await trio.sleep(0.01)
            finally:
                server.request_shutdown()


@pytest.mark.parametrize("oneshot", ["1", "0"], ids=["callbacks", "tasks"])
async def test_a_program_that_cannot_be_killed_is_cut_at_the_hard_bound(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    oneshot: str,
) -> None:
    """A program in uninterruptible sleep outlives even SIGKILL. A kernel state a test
    cannot make portably, so the broker's signals are swallowed here instead: past
    -t + -k + --drain-timeout + 1 the connection is cut all the same (no exit pair),
    with a warning naming the program, which keeps its slot until it is reaped."""
    import trio

    from sockexec_py.broker.spawn import Program

    monkeypatch.setenv("SOCKEXEC_PY_ONESHOT", oneshot)
    path = str(tmp_path / "cut.sock")
    server = in_process_server(path, timeout=0.5, kill_timeout=0.2, drain_timeout=0.2)
    monkeypatch.setattr(Program, "signal_group", lambda self, signum: True)

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            try:
                with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                    started = trio.current_time()  # (the deadline runs from the accept)
                    await client.connect(path)
                    await client.send(encode_request(["sh", "-c", "echo up; exec sleep 60"]))
                    await client.send(b"0:,")
                    reply = b""
                    while data := await client.recv(65536):
                        reply += data
                    elapsed = trio.current_time() - started
                assert reply == b"6:stdout,3:up\n,"
                assert 1.9 <= elapsed < 6, elapsed
                (program,) = server.supervisor.running  # not reaped: it holds its slot
                assert pid_alive(program.pid)
                assert f"pid={program.pid} not ended after SIGKILL" in caplog.text
                os.kill(program.pid, signal.SIGKILL)
                while server.supervisor.running:
                    await trio.sleep(0.01)
            finally:
                server.request_shutdown()
