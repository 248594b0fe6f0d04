"""Differential tests: the same valid requests to the C sockexec 3.1.1 and to us.

The C daemon is built for the session by ``build-sockexec.sh`` from the reference
folder (``SOCKEXEC_LUA_REF``, default ``../shared/reference``; it needs gcc and
Debian's skalibs-dev, which the test command installs). When it cannot be built the
module skips, and fails under CI=true.

For every request both daemons must send the same bytes on stdout (all stdout pairs
joined), the same bytes on stderr, and the same exit pair. Not compared: how the
output is cut into pairs (the C reads 4 KiB at a time, we up to 64 KiB) and how the two
streams interleave. The requests steer clear of the C's bugs (the first three are in
reference/README.md, the others were found here):
- it kills the program when the client half-closes: we never do, and read until EOF;
- it may send the exit pair before the last output pair: its whole reply is
  collected before anything is compared (ours must end with the exit pair, SPEC 3);
- a first read without the whole argc netstring crashes it;
- update_child.c hands skalibs' netstring_decode the buffer's whole length at an
  offset (``client_in_buffer.len``, not what is left after ``client_in_buffer_pos``),
  so a stdin netstring split across reads makes it read past its data: a segfault in
  libskarnet now and then, or a connection closed without a reply (seen with 200 KiB
  to 1 MiB of stdin). So the C gets every request in a single read: it is stopped
  (SIGSTOP) while the whole request is queued in one non-blocking send, then
  continued (SIGCONT);
- it reads argc past the netstring's end now and then, and waits forever for
  arguments that never come (``CDaemon.exchange`` says how that is told apart and
  retried);
- a program that cannot be run gets no reply at all from it (we answer 127): not in
  the corpus.
Our broker may close while the client still sends stdin the program never read
(``head -c``): the client then sees ECONNRESET after the whole reply, not EOF, and a
reset is taken as the end of our reply.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    IN_CI,
    MISC,
    REFERENCE,
    Broker,
    connect,
    parse_reply,
    read_all,
    require_tool,
    run_raw,
    wait_until,
)

BUILD_SCRIPT = REFERENCE / "build-sockexec.sh"
REPLY_TIMEOUT = 3.0
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # Linux; not in the socket module


def _unavailable(message: str) -> NoReturn:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def c_sockexec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C sockexec 3.1.1, built once per session into a temporary directory."""
    require_tool("gcc")
    if not BUILD_SCRIPT.is_file():
        _unavailable(f"no {BUILD_SCRIPT} (set SOCKEXEC_LUA_REF to the reference folder)")
    out = tmp_path_factory.mktemp("c-sockexec")
    try:
        build = subprocess.run(
            ["bash", str(BUILD_SCRIPT), str(out)], capture_output=True, text=True, timeout=100
        )
    except subprocess.TimeoutExpired:
        _unavailable("build-sockexec.sh took more than 100 s (installing skalibs-dev?)")
    binary = out / "sockexec"
    if build.returncode != 0 or not binary.is_file():
        _unavailable(
            f"build-sockexec.sh failed (status {build.returncode}; needs gcc and "
            f"skalibs-dev): {build.stderr.strip()[-500:]}"
        )
    return binary


def _netstring_pairs(reply: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, data) pairs of a reply, in order, read leniently: nothing is assumed
    about which pair comes last (the C may send the exit pair before output)."""
    frames, pos = [], 0
    while pos < len(reply):
        colon = reply.index(b":", pos)
        end = colon + 1 + int(reply[pos:colon])
        assert reply[end : end + 1] == b",", f"bad netstring at byte {pos} of {reply[:200]!r}"
        frames.append(reply[colon + 1 : end])
        pos = end + 1
    assert len(frames) % 2 == 0, f"a type without its data: {reply[-200:]!r}"
    return list(zip(frames[::2], frames[1::2], strict=True))


@dataclass(frozen=True)
class Reply:
    stdout: bytes
    stderr: bytes
    exit: tuple[tuple[bytes, bytes], ...]  # every exitcode/termsig pair (one expected)


def _reply(raw: bytes) -> Reply:
    streams: dict[bytes, list[bytes]] = {b"stdout": [], b"stderr": []}
    ends = []
    for kind, data in _netstring_pairs(raw):
        if kind in streams:
            streams[kind].append(data)
        else:
            assert kind in (b"exitcode", b"termsig"), kind
            ends.append((kind, data))
    return Reply(b"".join(streams[b"stdout"]), b"".join(streams[b"stderr"]), tuple(ends))


class CDaemon:
    """A running C sockexec on ``path``, with its default flags and -d (its log tells
    which argc it read)."""

    def __init__(self, binary: Path, path: Path) -> None:
        self.binary, self.path = binary, path
        self.log_path = path.with_suffix(".log")
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        self.path.unlink(missing_ok=True)  # it refuses to bind over an existing file
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "-d", str(self.path)], stdin=subprocess.DEVNULL, stderr=log
            )
        # No readiness notification, and a connection that sends nothing would crash
        # it (a first read without argc): the kernel's table says when it listens.
        wait_until(self._listening, 20, "the C sockexec to listen")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"the C sockexec exited {self.proc.returncode}: {self.log()}")
        with open("/proc/net/unix") as table:  # Flags 00010000: __SO_ACCEPTCON
            rows = [line.rstrip("\n").split(None, 7) for line in table]
        return any(row[3:4] == ["00010000"] and row[7:] == [str(self.path)] for row in rows)

    def exchange(self, request: bytes) -> bytes:
        """Send ``request`` so that the daemon reads all of it at once; its reply.

        The C parses argc with uint_scan() from a buffer that is not NUL-terminated
        (update_child.c): a digit left in the heap after it makes "1" read as "15",
        and the daemon waits for arguments that never come (about once in 500
        requests here; the stray byte comes from heap pointers, so it changes with
        every start, and stays for the rest of a daemon's life). Its debug log says
        which argc it read: then, and only then, the daemon is restarted and the
        request sent again.
        """
        argc = int(request.split(b":", 1)[1].split(b",", 1)[0])
        for _ in range(3):
            offset = len(self.log())
            try:
                return self._send_whole_and_read(request)
            except TimeoutError:
                misread = re.findall(r"reading (\d+) arguments", self.log()[offset:])
                if not misread or int(misread[-1]) == argc:
                    raise
            self.stop()
            self.restarts += 1
            self._start()
        pytest.fail(f"the C sockexec misread argc three times: {self.log()[-2000:]}")

    def _send_whole_and_read(self, request: bytes) -> bytes:
        with connect(self.path) as sock:
            # Room for the whole request in the socket (unprivileged, up to
            # net.core.wmem_max; as root, SO_SNDBUFFORCE goes past it).
            room = len(request) + (256 << 10)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, room)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, room)
            sock.setblocking(False)
            os.kill(self.proc.pid, signal.SIGSTOP)
            try:
                sent = sock.send(request)
            except BlockingIOError:
                sent = 0
            finally:
                os.kill(self.proc.pid, signal.SIGCONT)
            if sent != len(request):
                _unavailable(
                    f"a {len(request)}-byte request does not fit in a socket buffer here "
                    "(raise net.core.wmem_max, or run as root)"
                )
            # Every reply of the corpus takes milliseconds; this only bounds a hang.
            sock.settimeout(REPLY_TIMEOUT)
            return read_all(sock)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        # Its exit status is not checked: it may abort with a double free on SIGTERM.
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Daemons:
    c: CDaemon
    ours: Broker

    def compare(self, argv: list[bytes], stdin: Sequence[bytes] = ()) -> Reply:
        """Send the same request to both; assert the same replies; return ours."""
        request = _encode([str(len(argv)).encode(), *argv, *stdin, b""])
        theirs = _reply(self.c.exchange(request))
        # Ours may close while stdin the program never read (head -c) is still
        # coming: the client then sees a reset after the reply rather than EOF.
        raw = run_raw(self.ours.path, request, reset_is_eof=True)
        ours = _reply(raw)
        strict = parse_reply(raw)  # ours also ends with its exit pair, and only there
        assert (strict.stdout, strict.stderr) == (ours.stdout, ours.stderr)
        assert len(theirs.exit) == 1, theirs
        assert ours == theirs
        return ours


def _encode(frames: list[bytes]) -> bytes:
    """Netstrings, written here rather than with our codec: the request is the test's."""
    return b"".join(b"%d:%s," % (len(frame), frame) for frame in frames)


@pytest.fixture(scope="module")
def daemons(c_sockexec: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemons]:
    tmp = tmp_path_factory.mktemp("differential")
    c = CDaemon(c_sockexec, tmp / "c.sock")
    try:
        ours = Broker(tmp / "ours.sock", [])
        try:
            yield Daemons(c, ours)
        finally:
            code = ours.stop()
        log = ours.log()
        assert "internal error" not in log and "Traceback" not in log, log
        assert code == 0, f"broker exited {code}: {log}"
    finally:
        c.stop()


# -- the corpus ----------------------------------------------------------------------

SH = [b"sh", b"-c"]
NO_CORE = b"ulimit -c 0; "  # a signal that dumps core must not leave files behind


def _data(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


PROGRAMS = [
    pytest.param([b"true"], id="true"),
    pytest.param([b"echo", b"hello"], id="echo"),
    pytest.param([*SH, b"echo o1; echo e1 >&2; echo o2; echo e2 >&2"], id="interleaved"),
    pytest.param([*SH, b"echo only-err >&2; exit 1"], id="stderr-only-1"),
    pytest.param([*SH, b"seq 1 20000; seq 1 5000 >&2; seq 3; exit 2"], id="long-2"),
    pytest.param([*SH, b"printf 'no newline'; exit 42"], id="exit-42"),
    pytest.param([*SH, b"echo bye >&2; exit 255"], id="exit-255"),
    pytest.param([str(MISC / "print-bytes").encode(), b"300000", b"200000"], id="print-bytes"),
    pytest.param([*SH, NO_CORE + b"echo before; kill -TERM $$"], id="TERM"),
    pytest.param([*SH, NO_CORE + b"echo before >&2; kill -KILL $$"], id="KILL"),
    pytest.param([*SH, NO_CORE + b"seq 1000; kill -SEGV $$"], id="SEGV"),
    pytest.param([*SH, NO_CORE + b"kill -HUP $$"], id="HUP"),
    pytest.param([*SH, NO_CORE + b"kill -ABRT $$"], id="ABRT"),
    # argv with odd bytes, one element each (no NUL: a C string cannot hold one)
    pytest.param(
        [b"printf", b"[%s]\\n", b"", b" ", b"a b", b"\xff\xfe\x80", b"\x01\x1b[0m", b"\n\t"],
        id="odd-bytes",
    ),
    pytest.param([b"printf", b"[%s]", b"--", b"-n", b"%s%d", b"$(id)", b"'\""], id="odd-text"),
    pytest.param([b"printf", b"%s", b"a" * 70000], id="long-argument"),
    pytest.param([b"printf", b"[%s]", *(b"x%d" % i for i in range(1000))], id="1000-arguments"),
]


@pytest.mark.parametrize("argv", PROGRAMS)
def test_programs(daemons: Daemons, argv: list[bytes]) -> None:
    daemons.compare(argv)


STDIN_SIZES = [0, 1, 65536, 1 << 20]
STDIN_PROGRAMS = [[b"cat"], [b"wc", b"-c"], [b"head", b"-c", b"100"]]


@pytest.mark.parametrize("size", STDIN_SIZES)
@pytest.mark.parametrize("argv", STDIN_PROGRAMS, ids=lambda argv: b"_".join(argv).decode())
def test_stdin(daemons: Daemons, argv: list[bytes], size: int) -> None:
    stdin = _data(size, size)
    ours = daemons.compare(argv, [stdin] if stdin else [])
    expected = {b"cat": stdin, b"wc": b"%d\n" % size, b"head": stdin[:100]}[argv[0]]
    assert (ours.stdout, ours.exit) == (expected, ((b"exitcode", b"0"),))


def test_stdin_in_several_netstrings(daemons: Daemons) -> None:
    chunks = [_data(n, n) for n in (1, 4096, 100000, 3)]
    assert daemons.compare([b"cat"], chunks).stdout == b"".join(chunks)


# -- random requests ------------------------------------------------------------------

no_nul = st.binary(max_size=2000).map(lambda data: data.replace(b"\x00", b"\x01"))
endings = st.one_of(
    st.integers(0, 255).map(lambda code: b"exit %d" % code),
    st.sampled_from([b"TERM", b"KILL", b"SEGV", b"HUP", b"USR1"]).map(
        lambda name: b"kill -%s $$" % name
    ),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.booleans(), no_nul), max_size=6), ending=endings)
def test_random_programs(daemons: Daemons, steps: list[tuple[bool, bytes]], ending: bytes) -> None:
    # The script is fixed text; the bytes to print reach it as positional parameters.
    script = NO_CORE + b"".join(
        b'printf %%s "$%d"%s; ' % (i, b" >&2" if to_stderr else b"")
        for i, (to_stderr, _) in enumerate(steps, 1)
    )
    daemons.compare([*SH, script + ending, b"sh", *(data for _, data in steps)])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    argv=st.sampled_from(STDIN_PROGRAMS),
    sizes=st.lists(st.integers(1, 300_000), max_size=4),
    seed=st.integers(0, 2**32),
)
def test_random_stdin(daemons: Daemons, argv: list[bytes], sizes: list[int], seed: int) -> None:
    daemons.compare(argv, [_data(size, seed + i) for i, size in enumerate(sizes)])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=st.lists(no_nul.map(lambda data: data[:100]), max_size=8))
def test_random_arguments(daemons: Daemons, args: list[bytes]) -> None:
    daemons.compare([b"printf", b"[%s]", *args])
