"""Shared fixtures: a real broker process on a temporary socket, and a raw client.

The broker and the gateway run as their own processes (``sockexec_py.testing``,
shared with ``bench/``), exactly as users run them; readiness comes from the
programs themselves, never a sleep.
"""

from __future__ import annotations

import http.client
import os
import select
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from sockexec_py.broker.config import ServerConfig
from sockexec_py.broker.server import Server
from sockexec_py.events import Exited, Output
from sockexec_py.protocol import NEED_DATA, ClientSession, encode_request
from sockexec_py.testing import BrokerProcess as Broker
from sockexec_py.testing import GatewayProcess, wait_until
from sockexec_py.testing.resty import REFERENCE

__all__ = ["REFERENCE", "Broker", "GatewayProcess", "StartBroker", "wait_until"]

ROOT = Path(__file__).resolve().parent.parent
MISC = ROOT / "misc"
IN_CI = os.environ.get("CI", "").lower() == "true"


def require_tool(name: str) -> str:
    """Path of an external tool; a missing one fails under CI=true, skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (the test command installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass
class Result:
    """What a raw session returned, pair by pair."""

    stdout: bytes = b""
    stderr: bytes = b""
    exitcode: int | None = None
    termsig: str | None = None
    events: list[Output | Exited] = field(default_factory=list)


def parse_reply(data: bytes) -> Result:
    """Parse a complete server reply (must end with the exit pair)."""
    session = ClientSession(max_frame=1 << 30)
    session.receive_data(data)
    session.receive_data(b"")
    result = Result()
    streams: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    while (event := session.next_event()) is not NEED_DATA:
        assert isinstance(event, Output | Exited)
        result.events.append(event)
        if isinstance(event, Output):
            streams[event.kind].append(event.data)
        else:
            result.exitcode, result.termsig = event.exitcode, event.termsig
    result.stdout = b"".join(streams["stdout"])
    result.stderr = b"".join(streams["stderr"])
    assert session.done, "reply ended without an exit pair"
    return result


def connect(path: str | Path, timeout: float = 30.0) -> socket.socket:
    """A blocking connect (it waits while the backlog is full), then a timeout."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except BaseException:
        sock.close()  # (left to the garbage collector, it is a ResourceWarning)
        raise
    sock.settimeout(timeout)
    return sock


def read_all(sock: socket.socket, reset_is_eof: bool = False) -> bytes:
    """Read until EOF. With ``reset_is_eof``, a reset also ends the reply: a server
    closing while the client still sends stdin the program never read resets the
    connection, and Linux hands over the data queued before the reset first."""
    chunks = []
    try:
        while data := sock.recv(1 << 20):
            chunks.append(data)
    except ConnectionResetError:
        if not reset_is_eof:
            raise
    return b"".join(chunks)


def run_raw(
    path: str | Path,
    request: bytes,
    *,
    half_close: bool = False,
    timeout: float = 30.0,
    reset_is_eof: bool = False,
) -> bytes:
    """Send raw request bytes while reading the reply until the server closes.

    Sending happens in a thread: the server holds no more than a socket buffer of
    output, so a client must read while it writes.
    """
    with connect(path, timeout) as sock:

        def send() -> None:
            try:
                sock.sendall(request)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server answered and closed early (e.g. a refused request)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            return read_all(sock, reset_is_eof)
        finally:
            sender.join(timeout)


def run(
    path: str | Path, argv: Sequence[str | bytes], stdin: bytes = b"", timeout: float = 30.0
) -> Result:
    """One-shot session: argv, stdin, ``0:,``; returns the parsed reply."""
    request = encode_request(argv, [stdin] if stdin else []) + b"0:,"
    return parse_reply(run_raw(path, request, timeout=timeout))


def in_process_server(path: str, **config: Any) -> Server:
    """A broker :class:`Server` on a new listening socket at ``path``, to run in the
    test's own trio loop (``nursery.start(server.serve)``); ``config``: the
    :class:`ServerConfig` fields that differ from the defaults."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(10)
    listener.setblocking(False)
    return Server(ServerConfig(socket_path=path, **config), listener)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone before or while reading
        return False
    return state != b"Z"


def running_children(children: list[int], name: bytes) -> list[int]:
    """Those of ``children`` (a broker's) alive whose command line mentions ``name``."""
    found = []
    for pid in children:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if name in cmdline and pid_alive(pid):
            found.append(pid)
    return found


def check_lines_arrive_while_running(
    port: int, programs: Callable[[bytes], list[int]], ms: int
) -> None:
    """GET /slow of the nginx on ``port`` (3 lines, ``ms`` apart): chunked, and the
    first line arrives while slow-print still runs."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", f"/slow?count=3&ms={ms}")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Transfer-Encoding") == "chunked"
        assert response.readline() == b"line 1\n"
        # The first line is here and slow-print still has 2 * ms of lines to print.
        assert programs(b"slow-print"), "the first line came only after the program"
        assert response.readline() == b"line 2\n"
        assert response.read() == b"line 3\n"
    finally:
        conn.close()


def check_dying_program_cuts_the_response(
    port: int, programs: Callable[[bytes], list[int]]
) -> None:
    """GET /slow of the nginx on ``port`` (100 lines), then SIGTERM to slow-print
    after the first line: the 200 already went out, so the response is cut short
    (no last chunk) instead of ending as if complete."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/slow?count=100&ms=100")
        response = conn.getresponse()
        assert (response.status, response.readline()) == (200, b"line 1\n")
        for pid in programs(b"slow-print"):
            os.kill(pid, signal.SIGTERM)
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    finally:
        conn.close()


def wait_exit(pids: int | list[int], timeout: float = 10) -> None:
    """Wait for processes (ours or not) to exit, through pidfds: no polling."""
    for pid in [pids] if isinstance(pids, int) else pids:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            ready, _, _ = select.select([pidfd], [], [], timeout)
            assert ready, f"pid {pid} still alive after {timeout}s"
        finally:
            os.close(pidfd)


class StartBroker(Protocol):
    """The ``start_broker`` fixture: ``start_broker("-m", "2")`` starts a broker."""

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, name: str = "broker"
    ) -> Broker: ...


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[StartBroker]:
    """Factory: ``start_broker("-m", "2")`` starts a broker and returns it.

    Teardown stops every broker, checks it exited 0 and logged no internal error.
    """
    brokers: list[Broker] = []

    def start(*args: str, env: dict[str, str] | None = None, name: str = "broker") -> Broker:
        broker = Broker(tmp_path / f"{name}{len(brokers)}.sock", args, env)
        brokers.append(broker)
        return broker

    yield start
    for broker in brokers:
        code = broker.stop()
        log = broker.log()
        assert "internal error" not in log and "Traceback" not in log, log
        assert code == 0, f"broker exited {code}: {log}"


@pytest.fixture
def broker(start_broker: StartBroker) -> Broker:
    """A broker with the default flags."""
    return start_broker()


@pytest.fixture
def jobs(broker: Broker, tmp_path: Path) -> Iterator[GatewayProcess]:
    """A gateway with jobs (a data dir in ``tmp_path``); its log must show no
    traceback at the end (monitors that leave, refused requests: no error).
    Modules that need other flags define their own ``jobs``."""
    process = GatewayProcess(broker.path, "--data-dir", str(tmp_path / "data"))
    process.log_until("listening")  # from here on its log is read (and kept)
    yield process
    process.stop()
    assert "Traceback" not in "".join(process.lines)


@pytest.fixture
def gateway(broker: Broker) -> Iterator[GatewayProcess]:
    process = GatewayProcess(broker.path)
    yield process
    process.stop()
