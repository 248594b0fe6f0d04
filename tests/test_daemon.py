"""Daemon operations: startup over an existing path, systemd activation, signals,
debug log, and staying healthy (fds, zombies) under abuse."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockexec_py.protocol import encode_request

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
    wait_until,
)


def _start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "sockexec_py", *args], capture_output=True, timeout=30, env=env
    )


def test_live_server_on_the_path_is_a_fatal_error(broker: Broker) -> None:
    proc = _start_cli(str(broker.path))
    assert proc.returncode == 111
    assert proc.stderr.decode().splitlines() == [
        f"sockexec-py: fatal: a server is already listening on {broker.path}"
    ]
    assert run(broker.path, ["true"]).exitcode == 0  # the live one is untouched


def test_stale_socket_is_replaced(start_broker: StartBroker, tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "broker0.sock"))
    stale.close()  # the path stays, nobody listens: what a crash leaves behind
    broker = start_broker()
    assert broker.path == tmp_path / "broker0.sock"
    assert run(broker.path, ["true"]).exitcode == 0


def test_a_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("do not delete")
    proc = _start_cli(str(path))
    assert proc.returncode == 111
    assert b"exists and is not a socket" in proc.stderr
    assert path.read_text() == "do not delete"


def test_systemd_socket_activation(tmp_path: Path) -> None:
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(10)
    # LISTEN_PID must be the broker's own pid, known only after fork: set it in a
    # tiny exec wrapper, which also moves the socket to fd 3 (SD_LISTEN_FDS_START).
    wrapper = (
        "import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'sockexec_py', *sys.argv[2:]])\n"
    )
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            wrapper,
            str(listener.fileno()),
            "--notify-fd",
            str(write_fd),
            str(tmp_path / "unused.sock"),
        ],
        pass_fds=(listener.fileno(), write_fd),
        stderr=subprocess.PIPE,
    )
    os.close(write_fd)
    listener.close()
    try:
        assert select.select([read_fd], [], [], 20)[0] and os.read(read_fd, 1) == b"\n"
        assert run(path, ["sh", "-c", "echo ${LISTEN_PID:-unset} ${LISTEN_FDS:-unset}"]).stdout == (
            b"unset unset\n"
        )
        assert not (tmp_path / "unused.sock").exists()
    finally:
        os.close(read_fd)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    assert path.exists()  # systemd owns the path: not ours to remove


def test_systemd_readiness_notification(start_broker: StartBroker, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(20)
        broker = start_broker(env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert notify.recv(100) == b"READY=1"
    assert run(broker.path, ["true"]).exitcode == 0


def test_sigterm_terminates_programs_unlinks_and_exits_zero(start_broker: StartBroker) -> None:
    broker = start_broker("-k", "1")
    sessions = []
    pids = []
    for program in (["cat"], [str(MISC / "ignore-term")]):
        sock = connect(broker.path)
        sock.sendall(encode_request(program, [b"x\n"]))
        data = sock.recv(100)
        assert data.startswith(b"6:stdout,")
        sessions.append(sock)
    pids = broker.children()
    assert len(pids) == 2
    started = time.monotonic()
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 1 + 1 + 0.5  # within -k + 1 s
    assert not broker.path.exists()
    assert not any(pid_alive(p) for p in pids)
    # cat was terminated by TERM; the clients were told how their programs ended.
    replies = [parse_reply(sessions[0].recv(1 << 16) + read_all(sessions[0]))]
    assert replies[0].termsig == "TERM"
    for sock in sessions:
        sock.close()


def test_sigint_is_a_clean_shutdown_too(start_broker: StartBroker) -> None:
    broker = start_broker()
    assert run(broker.path, ["true"]).exitcode == 0
    broker.proc.send_signal(signal.SIGINT)
    assert broker.proc.wait(timeout=10) == 0
    assert not broker.path.exists()


def test_sigusr1_dumps_active_connections(start_broker: StartBroker) -> None:
    broker = start_broker()
    with connect(broker.path) as sock:
        sock.sendall(encode_request(["cat"], [b"ping"]))
        assert sock.recv(100) == b"6:stdout,4:ping,"
        (pid,) = broker.children()
        offset = len(broker.log())
        broker.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while "active connection(s)" not in broker.log()[offset:]:
            assert time.monotonic() < deadline
            select.select([], [], [], 0.01)
        lines = broker.log()[offset:].splitlines()
    assert lines[-1] == "sockexec-py: 1 active connection(s)"
    (line,) = lines[:-1]
    assert f"peer_pid={os.getpid()} peer_uid={os.getuid()} pid={pid} argv0=cat" in line
    assert "state=running" in line and "in=" in line and "out=4" in line


def test_debug_log_has_one_line_per_event_and_no_tracebacks(start_broker: StartBroker) -> None:
    broker = start_broker("-d", "-t", "2")
    assert run(broker.path, ["sh", "-c", "exit 4"]).exitcode == 4
    assert parse_reply(run_raw(broker.path, b"1:0,")).exitcode == 125
    assert run(broker.path, ["no-such-program"]).exitcode == 127
    assert run(broker.path, ["sleep", "30"]).termsig == "TERM"
    log = broker.log()
    for needle in (
        f"accept conn=1 peer_pid={os.getpid()} peer_uid={os.getuid()}",
        "spawn conn=1 pid=",
        "argv=['sh', '-c', 'exit 4']",
        "exit conn=1 pid=",
        "exitcode=4",
        "close conn=1 ",
        "refuse conn=2 exitcode=125 reason=argc must be at least 1",
        "refuse conn=3 exitcode=127 reason=no-such-program: program not found",
        "terminate conn=4 pid=",
        "reason=timeout",
        "termsig=TERM",
    ):
        assert needle in log, (needle, log)
    assert all(line.startswith("sockexec-py: ") for line in log.splitlines())


def test_client_sending_nothing_is_cut_at_the_deadline(start_broker: StartBroker) -> None:
    broker = start_broker("-t", "1")
    started = time.monotonic()
    with connect(broker.path) as sock:
        result = parse_reply(read_all(sock))
    assert result.exitcode == 125
    assert b"timed out waiting for the request" in result.stderr
    assert 0.9 < time.monotonic() - started < 5


def _fd_and_zombie_count(broker: Broker) -> tuple[list[str], list[int]]:
    """The broker's open fds (what each points to) and its zombie children."""
    zombies = [p for p in broker.children() if not pid_alive(p)]
    fd_dir = f"/proc/{broker.pid}/fd"
    fds = []
    for name in os.listdir(fd_dir):
        try:
            fds.append(f"{name}->{os.readlink(f'{fd_dir}/{name}')}")
        except FileNotFoundError:
            continue
    return sorted(fds), zombies


@pytest.mark.slow
def test_many_runs_leak_no_fd_and_leave_no_zombie(broker: Broker) -> None:
    assert run(broker.path, ["true"]).exitcode == 0
    broker.wait_idle()
    fds_before, _ = _fd_and_zombie_count(broker)
    request = encode_request(["true"]) + b"0:,"
    for _ in range(2_000):  # a leak of one fd in a hundred sessions shows
        assert run_raw(broker.path, request) == b"8:exitcode,1:0,"
    errors: list[str] = []

    def client() -> None:
        for _ in range(20):
            reply = run_raw(broker.path, encode_request(["sh", "-c", "echo $$"]) + b"0:,")
            if not reply.endswith(b"8:exitcode,1:0,"):
                errors.append(repr(reply))

    threads = [threading.Thread(target=client) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    broker.wait_idle()  # the last replies are out; let the broker finish cleaning up
    fds_after, zombies = _fd_and_zombie_count(broker)
    assert len(fds_after) == len(fds_before), (fds_before, fds_after)
    assert zombies == [] and broker.children() == []


def test_orphans_of_programs_are_adopted_and_reaped(broker: Broker) -> None:
    """A program's background child outlives it: the broker (a child subreaper) adopts
    it and reaps it when it exits, instead of leaving a zombie behind."""
    if not os.path.exists(f"/proc/{broker.pid}/task/{broker.pid}/children"):
        pytest.skip("this kernel has no /proc/<pid>/task/<tid>/children: no subreaper")
    # The background job's end is in the test's hands: it ends once its fifo is opened
    # for writing and closed again.
    orphans = []
    for _ in range(3):  # several, so scans coalesced by the broker miss none
        script = 'exec 3>&1 >/dev/null 2>&1 </dev/null; cat "$0" 3>&- & echo $! >&3'
        fifo = Path(broker.path).parent / f"orphan-{len(orphans)}.fifo"
        os.mkfifo(fifo)
        result = run(broker.path, ["sh", "-c", script, str(fifo)])
        assert result.exitcode == 0, result
        orphans.append((int(result.stdout), fifo))
    for pid, _ in orphans:
        wait_until(lambda pid=pid: pid in broker.children(), 10, f"{pid} adopted by the broker")
    for _, fifo in orphans:
        with open(fifo, "w"):
            pass  # the orphan's cat reads EOF: it exits and turns into a zombie
    for pid, _ in orphans:
        wait_until(lambda pid=pid: pid not in broker.children(), 10, f"{pid} reaped")


def test_five_hundred_concurrent_idle_sessions_all_complete(start_broker: StartBroker) -> None:
    """...in bounded memory: 500 programs ending together, each with a line of output,
    must not each hold a read buffer (256 KiB) at once."""
    broker = start_broker("-m", "1000")
    assert run(broker.path, ["true"]).exitcode == 0  # warm up: the first session's imports
    with open(f"/proc/{broker.pid}/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here
    rss_before = broker.rss_kib()
    socks = []
    try:
        for _ in range(500):
            sock = connect(broker.path, timeout=60)
            sock.sendall(encode_request(["sh", "-c", "sleep 1; echo done"]) + b"0:,")
            socks.append(sock)
        replies = [read_all(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert replies == [b"6:stdout,5:done\n,8:exitcode,1:0,"] * 500
    growth_mib = (broker.rss_kib("VmHWM") - rss_before) / 1024
    assert growth_mib < 32, f"peak RSS grew by {growth_mib:.1f} MiB for 500 sessions"


VALID_SESSION = b"1:2,3:cat,2:-u,5:hello,3:abc,0:,"


def _witness(broker: Broker) -> socket.socket:
    """A session left open across abuse: it must keep working."""
    sock = connect(broker.path)
    sock.sendall(encode_request(["cat"], [b"w"]))
    assert sock.recv(100) == b"6:stdout,1:w,"
    return sock


def _witness_still_echoes(sock: socket.socket) -> None:
    sock.sendall(b"2:ok,")
    assert sock.recv(100) == b"6:stdout,2:ok,"


def test_truncation_at_every_byte_offset_never_hurts_the_server(broker: Broker) -> None:
    with _witness(broker) as witness:
        _truncate_everywhere(broker, witness)


def _truncate_everywhere(broker: Broker, witness: socket.socket) -> None:
    for end in range(len(VALID_SESSION)):
        for half_close in (False, True):
            with connect(broker.path, timeout=10) as sock:
                sock.sendall(VALID_SESSION[:end])
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
                    reply = read_all(sock)
                    # A truncated request is refused in-band; cut in the stdin phase,
                    # the half-close ended stdin (or the frame) and the program ran.
                    # Cut inside a stdin frame, it is a protocol error after the start:
                    # the program is terminated, and the exit pair says so.
                    if reply:
                        result = parse_reply(reply)
                        assert result.exitcode in (0, 125) or result.termsig == "TERM", (
                            end,
                            reply,
                        )
    _witness_still_echoes(witness)
    assert run(broker.path, ["true"]).exitcode == 0


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    prefix_len=st.integers(min_value=0, max_value=len(VALID_SESSION)),
    garbage=st.binary(min_size=1, max_size=64),
)
def test_garbage_never_crashes_the_server_nor_other_sessions(
    broker: Broker, prefix_len: int, garbage: bytes
) -> None:
    with _witness(broker) as witness, connect(broker.path, timeout=10) as sock:
        try:
            sock.sendall(VALID_SESSION[:prefix_len] + garbage)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server refused and closed before we were done writing
        reply = read_all(sock)
        if reply:
            result = parse_reply(reply)
            assert result.exitcode is not None or result.termsig is not None
        _witness_still_echoes(witness)


def test_shutdown_answers_queued_clients_instead_of_dropping_them(
    start_broker: StartBroker,
) -> None:
    broker = start_broker("-m", "1", "-k", "1")
    running = connect(broker.path)
    running.sendall(encode_request(["cat"], [b"x"]))
    assert running.recv(100) == b"6:stdout,1:x,"
    queued = connect(broker.path)
    queued.sendall(encode_request(["true"]) + b"0:,")
    broker.dump_until("state=queued")
    broker.proc.send_signal(signal.SIGTERM)
    result = parse_reply(read_all(queued))
    assert result.exitcode == 125
    assert result.stderr == b"sockexec_py: the server is shutting down\n"
    assert broker.proc.wait(timeout=10) == 0
    running.close()
    queued.close()


@pytest.mark.parametrize(
    ("fd3", "problem"),
    [
        ("none", "is not open"),
        ("pipe", "is not a socket"),
        ("udp", "is not a Unix stream socket"),
        ("unix-dgram", "is not a Unix stream socket"),
        ("unix-unbound", "is not listening"),
        ("tcp-listening", "is not a Unix stream socket"),
    ],
)
def test_systemd_activation_without_a_usable_fd_3_is_fatal(
    tmp_path: Path, fd3: str, problem: str
) -> None:
    """Found by fuzzing: LISTEN_FDS=1 with nothing usable on fd 3 made the broker adopt
    one of its own sockets as the listener and serve nothing, silently."""
    wrapper = (
        "import os, socket, sys\n"
        "kind = sys.argv[1]\n"
        "os.closerange(3, 64)\n"
        "keep = []\n"
        "if kind == 'pipe':\n"
        "    r, w = os.pipe(); os.dup2(r, 3); keep = [w]\n"
        "elif kind != 'none':\n"
        "    family, type_ = {'udp': (socket.AF_INET, socket.SOCK_DGRAM),\n"
        "        'unix-dgram': (socket.AF_UNIX, socket.SOCK_DGRAM),\n"
        "        'unix-unbound': (socket.AF_UNIX, socket.SOCK_STREAM),\n"
        "        'tcp-listening': (socket.AF_INET, socket.SOCK_STREAM)}[kind]\n"
        "    s = socket.socket(family, type_)\n"
        "    if kind == 'tcp-listening':\n"
        "        s.bind(('127.0.0.1', 0)); s.listen()\n"
        "    os.dup2(s.fileno(), 3); keep = [s]\n"
        "os.set_inheritable(3, True) if kind != 'none' else None\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'sockexec_py', sys.argv[2]])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, fd3, str(tmp_path / "unused.sock")],
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 111, proc.stderr
    assert proc.stderr.decode() == f"sockexec-py: fatal: LISTEN_FDS=1 but fd 3 {problem}\n"
