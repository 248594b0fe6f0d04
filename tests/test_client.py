"""The Python client against a real broker: one-shot and duplex, blocking and trio."""

from __future__ import annotations

import os
import random
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from sockexec_py.client import (
    BrokerUnavailable,
    ProgramFailed,
    ProtocolError,
    Result,
    Timeout,
    arun,
    is_gateway,
    open_async_session,
    open_session,
    parse_target,
    run,
)
from sockexec_py.events import Exited, Output

from conftest import ROOT, Broker, GatewayProcess, StartBroker, pid_alive, wait_exit

BIG = 50_000_000


def _pid_program(fifo: Path) -> list[str]:
    """A program that reports its pid through ``fifo``, then runs for a minute."""
    return ["sh", "-c", f"echo $$ > {fifo}; exec sleep 60"]


def _read_pid(fifo: Path, timeout: float = 10) -> int:
    """The pid written to ``fifo``, waited for without polling (bounded)."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, "the program never reported its pid"
        return int(os.read(fd, 64))
    finally:
        os.close(fd)


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pid"
    os.mkfifo(path)
    return path


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    payload = random.Random(5).randbytes(BIG)
    path = tmp_path_factory.mktemp("big") / "random.bin"
    path.write_bytes(payload)
    return path, payload


def test_targets() -> None:
    assert parse_target("/run/x.sock") == "/run/x.sock"
    assert parse_target("relative.sock") == "relative.sock"
    assert parse_target("unix:/run/x.sock") == "/run/x.sock"
    assert parse_target("unix:///run/x.sock") == "/run/x.sock"
    with pytest.raises(ValueError, match="not a Unix socket target"):
        parse_target("ftp://host")
    assert all(is_gateway(t) for t in ("http://h", "https://h", "ws://h", "wss://h"))
    assert not is_gateway("unix:/run/x.sock")


# -- one-shot ------------------------------------------------------------------------


def test_run_with_stdin_and_result_helpers(broker: Broker) -> None:
    result = run(f"unix:{broker.path}", ["tr", "a-z", "A-Z"], stdin=b"hello", timeout=30)
    assert result == Result(b"HELLO", b"", 0, None)
    assert result.ok and result.check() is result
    failed = run(str(broker.path), ["sh", "-c", "echo no >&2; exit 3"], timeout=30)
    assert (failed.stdout, failed.stderr, failed.exitcode, failed.ok) == (b"", b"no\n", 3, False)
    with pytest.raises(ProgramFailed, match="exit status 3") as caught:
        failed.check()
    assert caught.value.result is failed
    killed = run(str(broker.path), ["sh", "-c", "kill -KILL $$"], timeout=30)
    assert (killed.exitcode, killed.termsig, killed.ok) == (None, "KILL", False)
    with pytest.raises(ProgramFailed, match="signal KILL"):
        killed.check()


def test_run_streams_50_mb_of_binary_output(broker: Broker, big_file: tuple[Path, bytes]) -> None:
    path, payload = big_file
    result = run(str(broker.path), ["cat", str(path)], timeout=60)
    assert result.stdout == payload and result.ok


async def test_arun_streams_50_mb_of_binary_output(
    broker: Broker, big_file: tuple[Path, bytes]
) -> None:
    path, payload = big_file
    result = await arun(str(broker.path), ["cat", str(path)], timeout=60)
    assert result.stdout == payload and result.ok


SMALL_FRAME = 64 * 1024
"""A broker started with ``--max-frame SMALL_FRAME`` refuses any longer stdin netstring."""


@pytest.fixture(scope="module")
def eight_mib() -> bytes:
    return random.Random(3).randbytes(8 << 20)


def test_run_streams_stdin_in_bounded_netstrings(
    start_broker: StartBroker, eight_mib: bytes
) -> None:
    """8 MiB through ``cat`` needs reading while writing (the broker's buffers are
    bounded) and stdin netstrings no longer than a small --max-frame."""
    broker = start_broker("--max-frame", str(SMALL_FRAME))
    result = run(str(broker.path), ["cat"], stdin=eight_mib, timeout=60)
    assert (len(result.stdout), result.stderr, result.exitcode) == (len(eight_mib), b"", 0)
    assert result.stdout == eight_mib


async def test_arun_streams_stdin_in_bounded_netstrings(
    start_broker: StartBroker, eight_mib: bytes
) -> None:
    broker = start_broker("--max-frame", str(SMALL_FRAME))
    result = await arun(str(broker.path), ["cat"], stdin=eight_mib, timeout=60)
    assert (len(result.stdout), result.stderr, result.exitcode) == (len(eight_mib), b"", 0)
    assert result.stdout == eight_mib


def test_session_send_of_a_large_chunk_goes_out_in_bounded_netstrings(
    start_broker: StartBroker, eight_mib: bytes
) -> None:
    """One ``send`` of more than --max-frame is split, not refused by the broker."""
    broker = start_broker("--max-frame", str(SMALL_FRAME))
    with open_session(str(broker.path), ["cat"], timeout=60) as session:

        def feed() -> None:
            session.send(eight_mib)
            session.close_stdin()

        feeder = threading.Thread(target=feed)
        feeder.start()
        result = session.wait()
        feeder.join(30)
    assert (len(result.stdout), result.stderr, result.exitcode) == (len(eight_mib), b"", 0)
    assert result.stdout == eight_mib


async def test_async_session_send_of_a_large_chunk_goes_out_in_bounded_netstrings(
    start_broker: StartBroker, eight_mib: bytes
) -> None:
    broker = start_broker("--max-frame", str(SMALL_FRAME))
    with trio.fail_after(60):
        async with (
            open_async_session(str(broker.path), ["cat"]) as session,
            trio.open_nursery() as nursery,
        ):

            async def feed() -> None:
                await session.send(eight_mib)
                await session.close_stdin()

            nursery.start_soon(feed)
            result = await session.wait()
    assert (len(result.stdout), result.stderr, result.exitcode) == (len(eight_mib), b"", 0)
    assert result.stdout == eight_mib


def test_gateway_websocket_message_larger_than_max_frame(start_broker: StartBroker) -> None:
    """The gateway hands each WebSocket message to ``AsyncSession.send``, which
    splits it: one message longer than the broker's --max-frame still goes through."""
    broker = start_broker("--max-frame", str(SMALL_FRAME))
    gateway = GatewayProcess(broker.path)
    try:
        payload = random.Random(4).randbytes(4 * SMALL_FRAME + 1)
        with open_session(gateway.base, ["wc", "-c"], timeout=60) as session:
            session.send(payload)
            session.close_stdin()
            result = session.wait()
    finally:
        gateway.stop()
    assert (result.stdout.strip(), result.exitcode) == (str(len(payload)).encode(), 0)


def test_run_timeout_closes_the_connection_and_the_program_is_killed(
    broker: Broker, fifo: Path
) -> None:
    errors: list[Exception] = []

    def call() -> None:
        try:
            run(str(broker.path), _pid_program(fifo), timeout=1)
        except Exception as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    pid = _read_pid(fifo)
    caller.join(10)
    assert not caller.is_alive()
    assert [type(e) for e in errors] == [Timeout]
    assert str(errors[0]) == "the program did not finish within 1 s"
    wait_exit(pid)


async def test_arun_timeout_closes_the_connection_and_the_program_is_killed(
    broker: Broker, fifo: Path
) -> None:
    pids: list[int] = []

    async def read_pid() -> None:
        pids.append(await trio.to_thread.run_sync(_read_pid, fifo))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_pid)
            with pytest.raises(Timeout, match=r"did not finish within 0\.5 s"):
                await arun(str(broker.path), _pid_program(fifo), timeout=0.5)
    await trio.to_thread.run_sync(wait_exit, pids[0])


# -- duplex --------------------------------------------------------------------------


def test_duplex_session_interleaves_send_and_receive(broker: Broker) -> None:
    seen: list[bytes] = []
    with open_session(str(broker.path), ["cat"], timeout=30, on_stdout=seen.append) as session:
        frames = iter(session)
        session.send(b"one")
        assert next(frames) == Output("stdout", b"one")
        session.send(b"two")
        assert next(frames) == Output("stdout", b"two")
        session.close_stdin()
        session.send(b"ignored: stdin is closed")
        assert list(frames) == [Exited(exitcode=0)]
        assert session.exited == Exited(exitcode=0)
    assert seen == [b"one", b"two"]


def test_session_callbacks_and_wait(broker: Broker) -> None:
    out: list[bytes] = []
    err: list[bytes] = []
    script = "echo out; echo err >&2; exit 4"
    with open_session(
        str(broker.path), ["sh", "-c", script], on_stdout=out.append, on_stderr=err.append
    ) as session:
        session.close_stdin()
        assert session.wait() == Result(b"out\n", b"err\n", 4, None)
    assert (out, err) == ([b"out\n"], [b"err\n"])


def test_session_fed_from_another_thread(broker: Broker) -> None:
    with open_session(str(broker.path), ["cat"], timeout=30) as session:

        def feed() -> None:
            for i in range(100):
                session.send(b"%d\n" % i)
            session.close_stdin()

        feeder = threading.Thread(target=feed)
        feeder.start()
        result = session.wait()
        feeder.join(10)
    assert result.stdout == b"".join(b"%d\n" % i for i in range(100))


def test_leaving_a_session_early_kills_the_program(broker: Broker) -> None:
    with open_session(str(broker.path), ["sh", "-c", "echo $$; exec sleep 60"]) as session:
        frame = next(iter(session))
        assert isinstance(frame, Output)
        pid = int(frame.data)
        assert pid_alive(pid)
    wait_exit(pid)


def test_session_timeout_kills_the_program(broker: Broker) -> None:
    argv = ["sh", "-c", "echo $$; exec sleep 60"]
    with (
        pytest.raises(Timeout, match=r"the session did not finish within 1\.5 s"),
        open_session(str(broker.path), argv, timeout=1.5) as session,
    ):
        frames = iter(session)
        frame = next(frames)
        assert isinstance(frame, Output)
        pid = int(frame.data)
        next(frames)
    wait_exit(pid)


async def test_trio_session_interleaves_send_and_receive(broker: Broker) -> None:
    out: list[bytes] = []
    async with open_async_session(str(broker.path), ["cat"], timeout=30, on_stdout=out.append) as s:
        frames = s.__aiter__()
        await s.send(b"ping")
        assert await frames.__anext__() == Output("stdout", b"ping")
        await s.send(b"pong")
        assert await frames.__anext__() == Output("stdout", b"pong")
        await s.close_stdin()
        assert await s.wait() == Result(b"", b"", 0, None)  # the rest: nothing but the exit
    assert out == [b"ping", b"pong"]


async def test_trio_session_left_early_or_timed_out_kills_the_program(broker: Broker) -> None:
    argv = ["sh", "-c", "echo $$; exec sleep 60"]
    pids = []
    with trio.fail_after(10):
        async with open_async_session(str(broker.path), argv) as session:
            async for frame in session:
                assert isinstance(frame, Output)
                pids.append(int(frame.data))
                break
    with pytest.raises(Timeout, match=r"the session did not finish within 1\.5 s"):
        async with open_async_session(str(broker.path), argv, timeout=1.5) as session:
            async for frame in session:
                if isinstance(frame, Output):
                    pids.append(int(frame.data))
    assert len(pids) == 2
    await trio.to_thread.run_sync(wait_exit, pids)


async def test_an_outer_trio_deadline_stays_the_callers(broker: Broker) -> None:
    with trio.move_on_after(0.3) as scope:
        async with open_async_session(str(broker.path), ["sleep", "60"], timeout=30) as s:
            await s.wait()
    assert scope.cancelled_caught


# -- errors --------------------------------------------------------------------------


def _as_nobody(call: Callable[[], str]) -> str:
    """Run ``call`` in a forked child that dropped root (root ignores socket modes)."""
    if os.geteuid() != 0:
        return call()
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_fd, call().encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], 20)
        assert ready, "the unprivileged child did not answer"
        message = os.read(read_fd, 4096).decode()
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    return message


def _unavailable(target: str) -> str:
    try:
        run(target, ["true"], timeout=10)
    except BrokerUnavailable as exc:
        return str(exc)
    return "connected"


def test_each_unavailable_broker_is_said_plainly(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.sock")
    assert _unavailable(missing) == (
        f"broker socket {missing} does not exist (is sockexec-py running?)"
    )
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(stale))
    assert _unavailable(str(stale)).startswith(f"nobody is listening on {stale}")
    regular = tmp_path / "regular-file"
    regular.write_text("")
    assert _unavailable(str(regular)) == (
        f"{regular} is not a socket (is it the broker's socket path?)"
    )
    with (
        tempfile.TemporaryDirectory() as shared,  # reachable by an unprivileged user
        socket.socket(socket.AF_UNIX) as listener,
    ):
        os.chmod(shared, 0o755)
        guarded = os.path.join(shared, "guarded.sock")
        listener.bind(guarded)
        listener.listen(1)
        os.chmod(guarded, 0o600 if os.geteuid() == 0 else 0)
        message = _as_nobody(lambda: _unavailable(guarded))
    assert message.startswith(f"permission denied on {guarded}"), message
    with pytest.raises(BrokerUnavailable, match="cannot reach the gateway"):
        run("http://127.0.0.1:1/", ["true"], timeout=10)


async def test_trio_unavailable_broker(tmp_path: Path) -> None:
    with pytest.raises(BrokerUnavailable, match="does not exist"):
        await arun(str(tmp_path / "missing.sock"), ["true"])
    with pytest.raises(BrokerUnavailable, match="does not exist"):
        async with open_async_session(str(tmp_path / "missing.sock"), ["true"]):
            pass  # pragma: no cover


async def test_a_peer_breaking_the_protocol_is_a_protocol_error(tmp_path: Path) -> None:
    """Not an ExceptionGroup from trio's nursery: the error callers catch."""
    path = str(tmp_path / "liar.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(4)

    async def liar() -> None:
        for reply in (b"6:stdout,2:hi,5:bogus,1:x,", b"6:stdout,2:hi,"):
            conn, _ = await listener.accept()
            with conn:
                await conn.recv(1024)
                await conn.send(reply)

    with trio.fail_after(10), listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(liar)
            with pytest.raises(ProtocolError, match="unknown frame type"):
                await arun(path, ["true"])
            with pytest.raises(ProtocolError, match="closed before the exit status"):
                await trio.to_thread.run_sync(lambda: run(path, ["true"]))


# -- README --------------------------------------------------------------------------


def _python_client_section() -> str:
    """The README's "Python client" section; before the maintainer merges it into
    README.md, the proposed text in clients/README_SECTION.md."""
    proposed = ROOT / "clients" / "README_SECTION.md"
    text = (proposed if proposed.exists() else ROOT / "README.md").read_text()
    match = re.search(r"^## Python client\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, "no '## Python client' section"
    return match.group(1)


def test_readme_python_examples_run(broker: Broker) -> None:
    blocks = re.findall(r"```python\n(.*?)```", _python_client_section(), re.S)
    assert len(blocks) == 2
    outputs = []
    for block in blocks:
        proc = subprocess.run(
            [sys.executable, "-c", f"SOCKET = {str(broker.path)!r}\n{block}"],
            capture_output=True,
            timeout=60,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        outputs.append(proc.stdout)
    assert b"Exited(exitcode=0" in outputs[1] and b"data=b'hi'" in outputs[1]


def test_session_terminate_gets_the_exit_frame(broker: Broker) -> None:
    with open_session(str(broker.path), ["sleep", "300"], timeout=30) as session:
        session.terminate()
        session.send(b"dropped: nothing goes after the request")
        assert session.wait() == Result(b"", b"", None, "TERM")


async def test_async_session_terminate_gets_the_exit_frame(broker: Broker) -> None:
    async with open_async_session(str(broker.path), ["cat"], timeout=30) as session:
        await session.send(b"one")
        assert await session.__anext__() == Output("stdout", b"one")
        await session.terminate()
        await session.terminate()  # once is enough
        assert await session.wait() == Result(b"", b"", None, "TERM")
