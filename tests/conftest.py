"""Shared fixtures: a real broker process on a temporary socket, and a raw client.

The broker runs as its own process (``python -m sockexec_py``), exactly as users run
it; readiness comes from ``--notify-fd`` (a newline once it accepts), never a sleep.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sockexec_py.events import Exited, Output
from sockexec_py.protocol import NEED_DATA, ClientSession, encode_request

ROOT = Path(__file__).resolve().parent.parent
MISC = ROOT / "misc"
IN_CI = os.environ.get("CI", "").lower() == "true"
# Third-party reference material (lua-resty-exec, netstring.lua, the C sockexec with its
# build script), never copied into the repository: see ../shared/reference/README.md.
REFERENCE = Path(os.environ.get("SOCKEXEC_LUA_REF") or ROOT.parent / "shared" / "reference")


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


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone before or while reading
        return False
    return state != b"Z"


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


def wait_until(predicate: object, timeout: float, what: str) -> None:
    """Poll a condition that has no event to wait on (a process dying elsewhere)."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class Broker:
    """A running ``sockexec-py`` process."""

    def __init__(self, path: Path, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.path = path
        read_fd, write_fd = os.pipe()
        self.stderr_path = path.with_suffix(".log")
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sockexec_py", *args, "--notify-fd", str(write_fd), str(path)],
            stdin=subprocess.DEVNULL,
            stderr=self._stderr,
            pass_fds=(write_fd,),
            env=env,
        )
        os.close(write_fd)
        try:
            ready, _, _ = select.select([read_fd], [], [], 20)
            line = os.read(read_fd, 1) if ready else b""
        finally:
            os.close(read_fd)
        if line != b"\n":
            self.proc.kill()
            self.proc.wait()
            self._stderr.close()
            raise RuntimeError(f"broker did not start: {self.log()!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def rss_kib(self, field: str = "VmRSS") -> int:
        """Resident memory now (VmRSS), or at its peak so far (``field="VmHWM"``)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
        raise AssertionError(f"no {field}")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def dump_until(self, needle: str, timeout: float = 10) -> str:
        """Ask for the SIGUSR1 report until it contains ``needle``; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            offset = len(self.log())
            os.kill(self.pid, signal.SIGUSR1)
            wait_until(
                lambda start=offset: "active connection(s)" in self.log()[start:], 5, "the dump"
            )
            report = self.log()[offset:]
            if needle in report:
                return report
            if time.monotonic() > deadline:
                pytest.fail(f"{needle!r} never appeared in the dump {report!r}")

    def wait_idle(self) -> None:
        """Wait until the broker has finished with every connection."""
        self.dump_until("sockexec-py: 0 active connection(s)")

    def children(self) -> list[int]:
        """Direct children of the broker (zombies included)."""
        with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
            return [int(p) for p in f.read().split()]

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._stderr.close()
        return code


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[object]:
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
def broker(start_broker: object) -> Broker:
    """A broker with the default flags."""
    assert callable(start_broker)
    result = start_broker()
    assert isinstance(result, Broker)
    return result


class GatewayProcess:
    """A running ``sockexec-gateway`` on a free loopback port."""

    def __init__(self, socket_path: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sockexec_py.gateway",
                "--socket",
                str(socket_path),
                "--listen",
                "127.0.0.1:0",
                *args,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        self.lines: list[str] = []
        ready, _, _ = select.select([self.proc.stderr], [], [], 30)
        assert ready, "the gateway did not start"
        for line in self.proc.stderr:
            self.lines.append(line)
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                break
        else:
            raise RuntimeError(f"gateway exited: {''.join(self.lines)}")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        payload = (
            raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        )
        if body is not None:  # what a JSON client sends (the gateway requires it)
            headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=payload, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, dict(response.getheaders()), data

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            assert self.proc.stderr is not None
            self.proc.stderr.close()


@pytest.fixture
def gateway(broker: Broker) -> Iterator[GatewayProcess]:
    process = GatewayProcess(broker.path)
    yield process
    process.stop()
