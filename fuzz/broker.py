"""A fuzz harness for the broker: random and mutated requests, delivered whole, in
pieces or byte by byte, with half-closes, hang-ups and clients that never read.

After every session it checks what the client got: either nothing, or a reply made
of whole pairs ending with one exit pair (a refusal is ``stderr`` + ``exitcode``
125/126/127). After a run it checks the broker: still up, and back to where it began
(open fds, children, RSS within a small margin). A failure prints the seed and the
session that showed it, so it can be replayed: ``python -m fuzz --seed S --only N``.

``python -m fuzz --sessions 100000`` is the long run (README); the test suite runs
a short one (``tests/test_fuzz.py``).
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sockexec_py.errors import RemoteProtocolError
from sockexec_py.events import Exited
from sockexec_py.netstring import encode
from sockexec_py.protocol import NEED_DATA, ClientSession, encode_request
from sockexec_py.testing import BrokerProcess

#: Requests a client may make; each is mutated or sent as it is.
PROGRAMS: tuple[tuple[bytes, ...], ...] = (
    (b"true",),
    (b"false",),
    (b"echo", b"hello"),
    (b"cat",),
    (b"head", b"-c", b"100000", b"/dev/zero"),
    (b"sh", b"-c", b"echo out; echo err >&2; exit 3"),
    (b"sh", b"-c", b"kill -TERM $$"),
    (b"wc", b"-c"),
    (b"no-such-program",),
    (b"",),
    (b"/",),
    (b"sleep", b"0.05"),
)
#: Byte strings that break the protocol in interesting places.
GARBAGE = (b"", b":", b",", b"0", b"00:", b"-1:", b"99999999999999999999:", b"\x00", b"1:", b"x")


@dataclass
class Verdict:
    """What one session showed; ``problem`` is None when it was fine."""

    number: int
    description: str
    problem: str | None = None


@dataclass
class RunReport:
    sessions: int = 0
    problems: list[Verdict] = field(default_factory=list)
    replies: int = 0


def request_for(rng: random.Random) -> tuple[bytes, str]:
    """A request (valid or not) and a short description of how it was made."""
    argv = rng.choice(PROGRAMS)
    stdin = [rng.randbytes(rng.choice((0, 1, 10, 5000, 70000))) for _ in range(rng.randint(0, 3))]
    data = encode_request(argv) + b"".join(encode(c) for c in stdin if c)
    if rng.random() < 0.7:
        data += b"0:,"
    how = rng.random()
    if how < 0.45:
        return data, f"valid {argv[:1]!r}"
    if how < 0.6:  # cut short
        cut = rng.randint(0, max(len(data) - 1, 0))
        return data[:cut], f"truncated at {cut} of {argv[:1]!r}"
    if how < 0.75:  # a byte changed
        if not data:
            return data, "empty"
        position = rng.randrange(len(data))
        changed = bytearray(data)
        changed[position] = rng.randrange(256)
        return bytes(changed), f"byte {position} changed in {argv[:1]!r}"
    if how < 0.9:  # garbage spliced in
        position = rng.randint(0, len(data))
        junk = rng.choice(GARBAGE)
        return data[:position] + junk + data[position:], f"{junk!r} at {position}"
    return rng.randbytes(rng.randint(1, 64)), "random bytes"


def deliver(sock: socket.socket, data: bytes, rng: random.Random) -> str:
    """Send ``data`` whole, in random pieces, or byte by byte; maybe half-close."""
    mode = rng.choice(("whole", "pieces", "bytes"))
    if mode == "whole" or len(data) < 2:
        sock.sendall(data)
    elif mode == "pieces":
        offset = 0
        while offset < len(data):
            step = rng.randint(1, max(len(data) // 3, 1))
            sock.sendall(data[offset : offset + step])
            offset += step
    else:
        for index in range(min(len(data), 400)):
            sock.sendall(data[index : index + 1])
        sock.sendall(data[400:])
    if rng.random() < 0.3:
        sock.shutdown(socket.SHUT_WR)
        mode += "+half-close"
    return mode


def check_reply(reply: bytes, complete: bool, asked: bool) -> str | None:
    """None when ``reply`` is a well-formed reply (or a prefix of one if the client
    left early), or nothing at all for a client that asked nothing; the problem
    otherwise."""
    if not reply:
        return "no reply to a request" if complete and asked else None
    session = ClientSession(max_frame=1 << 30)
    session.receive_data(reply)
    if complete:
        session.receive_data(b"")
    exited: Exited | None = None
    try:
        while (event := session.next_event()) is not NEED_DATA:
            if isinstance(event, Exited):
                exited = event
    except RemoteProtocolError as exc:
        if not complete and "closed before" in str(exc):
            return None
        return f"malformed reply: {exc} (after {len(reply)} bytes)"
    assert not complete or exited is not None  # the parser refuses an end without it
    return None


def one_session(path: Path, number: int, rng: random.Random, report: RunReport) -> Verdict:
    data, what = request_for(rng)
    behaviour = rng.choices(("reads", "never reads", "hangs up"), (0.8, 0.1, 0.1))[0]
    verdict = Verdict(number, f"{what}; {behaviour}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        with contextlib.suppress(OSError):  # refused and closed while we sent
            verdict.description += f"; {deliver(sock, data, rng)}"
        if behaviour == "hangs up":
            return verdict
        if behaviour == "never reads":
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            return verdict
        reply = bytearray()
        complete = True
        try:
            while chunk := sock.recv(1 << 20):
                reply += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            complete = False
            verdict.problem = "no end of reply within 30 s (the broker's -t is 2 s)"
        problem = check_reply(bytes(reply), complete, asked=bool(data))
        if problem and not verdict.problem:
            verdict.problem = problem
        if reply and not problem:
            report.replies += 1
    return verdict


def run(
    broker: BrokerProcess,
    sessions: int,
    seed: int,
    *,
    clients: int = 32,
    only: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> RunReport:
    """Run ``sessions`` sessions (``clients`` at a time) against ``broker``."""
    report = RunReport()
    numbers: Iterator[int] = iter([only] if only is not None else range(sessions))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                number = next(numbers, None)
            if number is None:
                return
            rng = random.Random(f"{seed}:{number}")
            try:
                verdict = one_session(broker.path, number, rng, report)
            except Exception as exc:  # the harness's own failure is a finding too
                verdict = Verdict(number, "the client failed", f"{type(exc).__name__}: {exc}")
            with lock:
                report.sessions += 1
                if verdict.problem:
                    report.problems.append(verdict)
                if progress and report.sessions % 1000 == 0:
                    progress(report.sessions)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return report
