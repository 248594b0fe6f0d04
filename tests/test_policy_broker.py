"""The execution policy enforced by a real broker (``--policy``), clients on real sockets."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sockexec_py.events import Exited, Output
from sockexec_py.protocol import NEED_DATA, ClientSession, encode_request

from conftest import Broker, StartBroker, connect, parse_reply, run, run_raw, wait_exit, wait_until

AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not AS_ROOT, reason="switching user needs the broker to be root")


def start(start_broker, tmp_path: Path, text: str, *flags: str) -> Broker:
    policy = tmp_path / "policy.toml"
    policy.write_text(text)
    broker = start_broker("--policy", str(policy), *flags)
    assert isinstance(broker, Broker)
    return broker


def denial(result: object) -> str:
    assert getattr(result, "exitcode", None) == 125, result
    stderr = result.stderr.decode()  # type: ignore[attr-defined]
    assert stderr.startswith("sockexec_py: denied: ") and stderr.count("\n") == 1, stderr
    return stderr.removeprefix("sockexec_py: denied: ").rstrip("\n")


def test_allowed_and_denied(start_broker: StartBroker, tmp_path: Path) -> None:
    broker = start(
        start_broker,
        tmp_path,
        '[[allow]]\nprogram = "echo"\n'
        '[[allow]]\nprogram = "/usr/bin/printf"\nargs_prefix = ["%s"]\n',
    )
    assert run(broker.path, ["echo", "hi"]).stdout == b"hi\n"
    assert run(broker.path, ["printf", "%s", "x"]).stdout == b"x"
    assert denial(run(broker.path, ["rm", "-rf", "/nonexistent"])) == (
        "program /usr/bin/rm is not allowed"
    )
    assert "must start with ['%s']" in denial(run(broker.path, ["printf", "%d", "1"]))
    assert "relative program path" in denial(run(broker.path, ["./echo"]))
    # Denied before anything ran: no child was ever spawned for these.
    log = broker.log()
    assert "audit conn=3 " in log and "outcome=denied: program /usr/bin/rm" in log
    assert "rule=allow:echo argv=['echo', 'hi'] outcome=exitcode=0 " in log


def test_without_policy_anything_runs(broker: Broker) -> None:
    assert run(broker.path, ["sh", "-c", "echo $0", "free"]).stdout == b"free\n"
    assert "audit" not in broker.log()


def test_named_command_with_hostile_parameters(start_broker: StartBroker, tmp_path: Path) -> None:
    broker = start(
        start_broker,
        tmp_path,
        '[[command]]\nname = "show"\nargv = ["/usr/bin/printf", "<%s>\\\\0", "@@1", "@@2"]\n',
    )
    hostile = ["; rm -rf /", "$(id)", "a\nb c", "--help", "-rf", "`id`", "@@1", "'\"*"]
    for one in hostile:
        result = run(broker.path, ["show", one, "x;y"])
        assert result.exitcode == 0, result
        # printf repeats its format per argument: exactly these two, literally.
        assert result.stdout.split(b"\0") == [f"<{one}>".encode(), b"<x;y>", b""]
    assert "takes 2 parameter(s), got 1" in denial(run(broker.path, ["show", "one"]))


def test_stdin_false_gives_the_program_eof(start_broker: StartBroker, tmp_path: Path) -> None:
    broker = start(start_broker, tmp_path, '[[allow]]\nprogram = "cat"\nstdin = false\n')
    result = run(broker.path, ["cat"], stdin=b"not for cat\n" * 1000)
    assert (result.stdout, result.exitcode) == (b"", 0)


def test_rule_timeout_replaces_t(start_broker: StartBroker, tmp_path: Path) -> None:
    broker = start(
        start_broker,
        tmp_path,
        '[[allow]]\nprogram = "sleep"\ntimeout = 0.5\n[[allow]]\nprogram = "sh"\ntimeout = 60\n',
        "-t",
        "1",
    )
    assert run(broker.path, ["sleep", "30"]).termsig == "TERM"
    # Longer than -t: the rule's timeout applies instead.
    result = run(broker.path, ["sh", "-c", "sleep 1.5; echo done"])
    assert (result.stdout, result.exitcode) == (b"done\n", 0)


def test_cwd_umask_env_and_rlimits(start_broker: StartBroker, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    broker = start(
        start_broker,
        tmp_path,
        f'[[allow]]\nprogram = "sh"\ncwd = "{workdir}"\numask = "027"\nenv = "clear"\n'
        'setenv = { GREETING = "hi there", PATH = "/usr/bin:/bin" }\n'
        'rlimits = { nofile = 256, cpu = 7, as = "512M", fsize = "1M", nproc = 64 }\n'
        '[[allow]]\nprogram = "env"\nenv = "clear"\nsetenv = { ONLY = "this" }\n',
    )
    script = "pwd; umask; echo $GREETING; ulimit -n; ulimit -t; ulimit -v; ulimit -f; ulimit -a"
    result = run(broker.path, ["sh", "-c", script])
    assert result.exitcode == 0, result
    lines = result.stdout.decode().splitlines()
    assert lines[:7] == [str(workdir), "0027", "hi there", "256", "7", "524288", "2048"]
    # `ulimit -a` (dash says "nofiles", bash "open files") shows the same limits.
    assert any(re.match(r"(nofiles|open files).* 256$", line) for line in lines[7:]), lines
    assert any(re.match(r"(process|max user processes).* 64$", line) for line in lines[7:])
    assert run(broker.path, ["env"]).stdout == b"ONLY=this\n"


def test_exec_helper_failures_are_reported_like_spawn_failures(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    broker = start(
        start_broker,
        tmp_path,
        '[[allow]]\nprogram = "true"\ncwd = "/nonexistent-dir"\n'
        '[[command]]\nname = "ghost"\nargv = ["/nonexistent/prog"]\numask = "022"\n',
    )
    result = run(broker.path, ["true"])
    assert result.exitcode == 125
    assert result.stderr == (
        b"sockexec_py: changing directory to /nonexistent-dir: No such file or directory\n"
    )
    result = run(broker.path, ["ghost"])
    assert (result.exitcode, result.stderr) == (
        127,
        b"sockexec_py: /nonexistent/prog: program not found\n",
    )
    broker.wait_idle()
    assert broker.children() == []  # the helpers were reaped


@needs_root
def test_run_as_user_with_groups_and_minimal_env(start_broker: StartBroker, tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    users = grp.getgrnam("users").gr_gid
    broker = start(
        start_broker,
        tmp_path,
        '[[allow]]\nprogram = "id"\nuser = "nobody"\ngroup = "users"\n'
        '[[allow]]\nprogram = "env"\nuser = "nobody"\n',
    )
    uid = run(broker.path, ["id", "-u"])
    assert uid.stdout == f"{nobody.pw_uid}\n".encode(), uid
    assert run(broker.path, ["id", "-g"]).stdout == f"{users}\n".encode()
    groups = run(broker.path, ["id", "-G"]).stdout.split()
    assert sorted(int(g) for g in groups) == sorted(set(os.getgrouplist("nobody", users)))
    env = dict(
        line.split("=", 1) for line in run(broker.path, ["env"]).stdout.decode().split("\n") if line
    )
    assert env == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": nobody.pw_dir,
        "USER": "nobody",
        "LOGNAME": "nobody",
        "SHELL": nobody.pw_shell,
    }


class RawSession:
    """A client that sends its argv now and stdin later, reading frames as they come."""

    def __init__(self, path: Path, argv: list[str]) -> None:
        self.sock = connect(path)
        self.sock.sendall(encode_request(argv))
        self.session = ClientSession(max_frame=1 << 20)
        self.stdout = b""

    def read_until(self, needle: bytes) -> None:
        while needle not in self.stdout:
            event = self.session.next_event()
            if event is NEED_DATA:
                data = self.sock.recv(65536)
                self.session.receive_data(data)
                assert data, f"closed before {needle!r}: {self.stdout!r}"
            elif isinstance(event, Output):
                self.stdout += event.data
            else:
                raise AssertionError(f"{event} before {needle!r}")

    def finish(self) -> Exited:
        self.sock.sendall(b"1:\n,0:,")  # the line the program waits for, then EOF
        while True:
            event = self.session.next_event()
            if event is NEED_DATA:
                self.session.receive_data(self.sock.recv(65536))
            elif isinstance(event, Output):
                self.stdout += event.data
            else:
                assert isinstance(event, Exited)
                self.sock.close()
                return event


def _wait_queued(broker, count: int) -> None:
    """Wait until ``count`` connections wait in a queue (from the SIGUSR1 reports)."""
    deadline = time.monotonic() + 20
    while True:
        report = broker.dump_until("active connection(s)")
        queued = report.count("state=queued")
        if queued == count:
            return
        assert queued < count, report
        assert time.monotonic() < deadline, f"never {count} queued: {report}"


def test_concurrency_limit_queue_order_and_queue_full(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    broker = start(
        start_broker,
        tmp_path,
        '[[allow]]\nprogram = "sh"\nmax_running = 2\nmax_queue = 3\n',
    )
    script = f'echo "start $0" >> {journal}; echo started; read line; echo "end $0" >> {journal}'
    sessions: list[RawSession] = []
    try:
        for number in range(1, 6):
            sessions.append(RawSession(broker.path, ["sh", "-c", script, str(number)]))
            if number <= 2:
                sessions[-1].read_until(b"started")
            else:  # wait until the broker holds it in the rule's queue: arrival order is set
                _wait_queued(broker, number - 2)
        sixth = run(broker.path, ["sh", "-c", "echo never"])
        assert sixth.exitcode == 125
        assert sixth.stderr == b"sockexec_py: queue full for allow 'sh' (2 running, 3 waiting)\n"
        for number, session in enumerate(sessions, 1):
            session.read_until(b"started")  # it runs once those before it have finished
            assert session.finish().exitcode == 0, number
    finally:
        for session in sessions:
            session.sock.close()
    lines = journal.read_text().splitlines()
    running, most = 0, 0
    for line in lines:
        running += 1 if line.startswith("start") else -1
        most = max(most, running)
    assert most == 2, lines
    assert [line for line in lines if line.startswith("start")] == [
        f"start {n}" for n in range(1, 6)
    ]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="sockexec-policy-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run_as(uid: int, gid: int, path: Path, argv: list[str]) -> bytes:
    """Run one request from a forked child that dropped to uid/gid; returns the reply."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            reply = run_raw(path, encode_request(argv) + b"0:,", timeout=20)
            with os.fdopen(write_end, "wb") as out:
                out.write(reply)
            os._exit(0)
        except BaseException:
            os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reply_in:
        reply = reply_in.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return reply


@needs_root
def test_peer_uid_restriction(start_broker: StartBroker, shared_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    (shared_dir / "policy.toml").write_text(
        '[[allow]]\nprogram = "echo"\npeer_uids = [0]\n'
        '[[allow]]\nprogram = "printf"\npeer_uids = ["nobody"]\n'
    )
    broker = Broker(
        shared_dir / "broker.sock", ["--policy", str(shared_dir / "policy.toml"), "-M", "666"]
    )
    try:
        assert run(broker.path, ["echo", "root may"]).stdout == b"root may\n"
        as_nobody = parse_reply(_run_as(nobody.pw_uid, nobody.pw_gid, broker.path, ["echo", "x"]))
        assert denial(as_nobody) == (
            f"peer uid {nobody.pw_uid} gid {nobody.pw_gid} may not use allow 'echo'"
        )
        ok = parse_reply(_run_as(nobody.pw_uid, nobody.pw_gid, broker.path, ["printf", "y"]))
        assert (ok.stdout, ok.exitcode) == (b"y", 0)
        assert "may not use allow 'printf'" in denial(run(broker.path, ["printf", "z"]))
        assert f"audit conn=2 peer_uid={nobody.pw_uid} " in broker.log()
    finally:
        assert broker.stop() == 0


def test_sighup_reloads_and_a_broken_file_keeps_the_old_policy(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    broker = start(start_broker, tmp_path, '[[allow]]\nprogram = "echo"\n')
    policy = tmp_path / "policy.toml"
    assert run(broker.path, ["echo", "a"]).exitcode == 0

    policy.write_text('[[allow]]\nprogram = "printf"\n')
    os.kill(broker.pid, signal.SIGHUP)
    wait_until(lambda: "policy reloaded from" in broker.log(), 10, "the reload")
    assert "program /usr/bin/echo is not allowed" in denial(run(broker.path, ["echo", "a"]))
    assert run(broker.path, ["printf", "b"]).stdout == b"b"

    policy.write_text('[[allow]]\nprogram = "echo"\nbogus = true\n')
    os.kill(broker.pid, signal.SIGHUP)
    wait_until(lambda: "policy reload failed" in broker.log(), 10, "the failed reload")
    assert "unknown key(s) ['bogus']" in broker.log()
    assert run(broker.path, ["printf", "c"]).stdout == b"c"  # the previous policy stands
    assert run(broker.path, ["echo", "c"]).exitcode == 125


def test_check_policy_and_bad_policy_at_startup(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[[allow]]\nprogram = "echo"\nargs = ["hi"]\n')
    proc = subprocess.run(
        [sys.executable, "-m", "sockexec_py", "--check-policy", str(good)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "allow 'echo':" in proc.stdout and "arguments exactly ['hi']" in proc.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[[allow]]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sockexec_py", "--check-policy", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        f"sockexec-py: invalid policy: {bad}: [[allow]] #1: program must be a non-empty string\n"
    )
    sock = tmp_path / "s.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "sockexec_py", "--policy", str(bad), str(sock)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 100
    assert proc.stderr.startswith("sockexec-py: fatal: invalid policy: ")
    assert not sock.exists()


def test_gateway_requests_obey_the_policy(start_broker: StartBroker, tmp_path: Path) -> None:
    from conftest import GatewayProcess

    broker = start(start_broker, tmp_path, '[[allow]]\nprogram = "echo"\n')
    gateway = GatewayProcess(broker.path)
    try:
        status, _, body = gateway.request("POST", "/v1/exec", {"argv": ["echo", "ok"]})
        assert status == 200 and b'"stdout":"ok\\n"' in body.replace(b" ", b"")
        status, _, body = gateway.request("POST", "/v1/exec", {"argv": ["id"]})
        assert status == 200 and b"denied: program /usr/bin/id is not allowed" in body
        assert b'"exitcode":125' in body.replace(b" ", b"")
    finally:
        gateway.stop()


def test_client_leaving_as_a_run_as_program_starts_terminates_it(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    broker = start(
        start_broker,
        tmp_path,
        f'[[allow]]\nprogram = "sh"\ncwd = "{tmp_path}"\nmax_running = 1\nmax_queue = 0\n',
    )
    script = f"echo $$ > {pidfile}.new && mv {pidfile}.new {pidfile}; exec sleep 300"
    with connect(broker.path) as sock:  # the request, then gone as the program starts
        sock.sendall(encode_request(["sh", "-c", script]))
        deadline = time.monotonic() + 10
        while not broker.children():
            assert time.monotonic() < deadline, "the program never started"
    broker.wait_idle()
    if pidfile.exists():  # the hang-up came after the exec: the program was terminated
        wait_exit(int(pidfile.read_text()), timeout=10)
    # -t is 60 s: had the program been left running, its gate would still be taken.
    assert run(broker.path, ["sh", "-c", "echo free"]).stdout == b"free\n"


def test_reload_decides_queued_requests_again_and_keeps_counting(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    rule = '[[allow]]\nprogram = "sh"\nmax_running = 1\n'
    broker = start(start_broker, tmp_path, rule)
    first = RawSession(broker.path, ["sh", "-c", "echo started; read line"])
    second: RawSession | None = None
    try:
        first.read_until(b"started")
        second = RawSession(broker.path, ["sh", "-c", "echo second"])
        _wait_queued(broker, 1)
        # The same limit, reloaded: the running program still counts.
        os.kill(broker.pid, signal.SIGHUP)
        wait_until(lambda: broker.log().count("policy reloaded") == 1, 10, "the reload")
        third = RawSession(broker.path, ["sh", "-c", "echo third"])
        _wait_queued(broker, 2)
        # A policy without the rule: the queued requests are refused, not run.
        policy.write_text('[[allow]]\nprogram = "echo"\n')
        os.kill(broker.pid, signal.SIGHUP)
        wait_until(lambda: broker.log().count("policy reloaded") == 2, 10, "the reload")
        for queued in (second, third):
            reply = parse_reply(read_all_bytes(queued))
            assert denial(reply) == "program /usr/bin/sh is not allowed"
        assert first.finish().exitcode == 0  # what ran under the old policy finishes
    finally:
        first.sock.close()
        if second is not None:
            second.sock.close()


def read_all_bytes(session: RawSession) -> bytes:
    chunks = []
    while data := session.sock.recv(65536):
        chunks.append(data)
    session.sock.close()
    return b"".join(chunks)


def test_timeout_in_a_rule_queue_names_the_rule(start_broker: StartBroker, tmp_path: Path) -> None:
    broker = start(
        start_broker,
        tmp_path,
        '[[allow]]\nprogram = "sh"\nmax_running = 1\ntimeout = 60\n',
        "-t",
        "1",
    )
    holder = RawSession(broker.path, ["sh", "-c", "echo started; read line"])
    try:
        holder.read_until(b"started")
        result = run(broker.path, ["sh", "-c", "echo late"])
        assert result.exitcode == 125
        assert result.stderr == (
            b"sockexec_py: timed out waiting in the queue of allow 'sh' (1 of 1 running)\n"
        )
    finally:
        holder.sock.close()
