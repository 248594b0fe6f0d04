"""``sockexec-client`` and the socat shell client, run as users run them: the same
tests for both (the socat client's own are in test_socat_client.py)."""

from __future__ import annotations

import os
import pty
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ROOT, Broker, StartBroker, require_tool

SOCAT_CLIENT = ROOT / "clients" / "sockexec-socat"
Client = Callable[..., list[str]]


def python_client(target: object, *argv: str) -> list[str]:
    return [sys.executable, "-m", "sockexec_py.client.cli", str(target), *argv]


def socat_client(target: object, *argv: str) -> list[str]:
    require_tool("socat")
    return ["sh", str(SOCAT_CLIENT), str(target), *argv]


@pytest.fixture(params=[python_client, socat_client], ids=["sockexec-client", "socat"])
def client(request: pytest.FixtureRequest) -> Client:
    factory: Client = request.param
    return factory


def _run(
    command: list[str], stdin: bytes | int | None = subprocess.DEVNULL
) -> subprocess.CompletedProcess[bytes]:
    if isinstance(stdin, bytes):
        return subprocess.run(command, input=stdin, capture_output=True, timeout=60, cwd=ROOT)
    return subprocess.run(command, stdin=stdin, capture_output=True, timeout=60, cwd=ROOT)


def test_echo_through_tr(broker: Broker, client: Client) -> None:
    proc = _run(client(broker.path, "tr", "a-z", "A-Z"), b"hello")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"HELLO", b"")


def test_exit_status_and_streams_land_on_the_right_fds(broker: Broker, client: Client) -> None:
    proc = _run(client(broker.path, "sh", "-c", "echo out; echo err >&2; exit 7"))
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, b"out\n", b"err\n")


def test_death_by_signal_is_128_plus_n(start_broker: StartBroker, client: Client) -> None:
    by_name = start_broker()
    proc = _run(client(by_name.path, "sh", "-c", "kill -TERM $$"))
    assert proc.returncode == 128 + 15
    assert proc.stderr.decode().endswith("killed by signal TERM\n")
    by_number = start_broker("--termsig-format", "number")
    proc = _run(client(by_number.path, "sh", "-c", "kill -HUP $$"))
    assert proc.returncode == 128 + 1
    assert proc.stderr.decode().endswith("killed by signal HUP\n")


def test_binary_stdin_and_stdout_round_trip(broker: Broker, client: Client) -> None:
    payload = bytes(range(256)) * 2000  # 512,000 bytes: several 64 KiB netstrings each way
    proc = _run(client(broker.path, "cat"), payload)
    assert proc.returncode == 0 and proc.stdout == payload


def test_arguments_go_out_as_bytes(broker: Broker, client: Client) -> None:
    argv = ["héllo wörld", "", "-n", "a\nb", "%s"]
    proc = _run(client(broker.path, "printf", "[%s]", *argv))
    assert proc.stdout == "".join(f"[{a}]" for a in argv).encode()


def test_duplex_echo_through_cat(broker: Broker, client: Client) -> None:
    """Stdin streams as it arrives: each line comes back before the next is sent."""
    with subprocess.Popen(
        client(broker.path, "cat"), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        for line in (b"one\n", b"two\n", b"three\n"):
            proc.stdin.write(line)
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, f"no echo of {line!r}"
            assert os.read(proc.stdout.fileno(), 100) == line
        proc.stdin.close()
        assert proc.wait(30) == 0
        assert proc.stdout.read() == b""


def test_a_terminal_is_not_read(broker: Broker, client: Client) -> None:
    primary, terminal = pty.openpty()
    try:
        proc = _run(client(broker.path, "cat"), terminal)
    finally:
        os.close(primary)
        os.close(terminal)
    assert (proc.returncode, proc.stdout) == (0, b"")


def test_program_ending_before_reading_all_stdin(broker: Broker, client: Client) -> None:
    proc = _run(client(broker.path, "head", "-c", "5"), b"x" * 5_000_000)
    assert (proc.returncode, proc.stdout) == (0, b"xxxxx")


@pytest.mark.parametrize("kind", ["missing", "stale", "not a socket"])
def test_unreachable_broker_is_111_with_the_reason(
    tmp_path: Path, client: Client, kind: str
) -> None:
    path = tmp_path / "broker.sock"
    if kind == "stale":
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(path))
    elif kind == "not a socket":
        path.write_text("")
    proc = _run(client(path, "true"))
    assert proc.returncode == 111
    reason = {"missing": "does not exist", "stale": "nobody is listening"}.get(kind, kind)
    (line,) = proc.stderr.decode().splitlines()
    assert str(path) in line and reason in line, line


def test_a_peer_breaking_the_protocol_is_111(tmp_path: Path, client: Client) -> None:
    path = tmp_path / "liar.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def liar() -> None:
            listener.settimeout(30)
            conn, _ = listener.accept()
            with conn:
                request = b""
                while not request.endswith(b"0:,"):  # all of it: no reset on close
                    request += conn.recv(65536) or b"0:,"
                conn.sendall(b"6:stdout,2:hi,5:bogus,1:x,")

        thread = threading.Thread(target=liar)
        thread.start()
        try:
            proc = _run(client(path, "true"))
        finally:
            thread.join(30)
    assert (proc.returncode, proc.stdout) == (111, b"hi")
    assert proc.stderr.count(b"\n") == 1, proc.stderr


def test_usage_errors_are_100(client: Client) -> None:
    proc = _run(client("/nowhere.sock"))
    assert proc.returncode == 100 and b"usage:" in proc.stderr


def test_installed_console_script(broker: Broker) -> None:
    script = require_tool("sockexec-client")
    proc = subprocess.run(
        ["sh", "-c", f"printf 'hello' | {script} {broker.path} tr a-z A-Z"],
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout, whatever is installed
    )
    assert (proc.returncode, proc.stdout) == (0, b"HELLO")
