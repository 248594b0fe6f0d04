"""The Python client against a real broker: one-shot and duplex, blocking and trio."""

from __future__ import annotations

import random
import socket
import threading
import time
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
    open_async_session,
    open_session,
    parse_target,
    run,
)
from sockexec_py.events import Exited, Output

from conftest import Broker, pid_alive, wait_exit


def test_targets() -> None:
    assert parse_target("/run/x.sock") == "/run/x.sock"
    assert parse_target("unix:/run/x.sock") == "/run/x.sock"
    with pytest.raises(ValueError):
        parse_target("ftp://host")


def test_run_with_stdin_and_result_helpers(broker: Broker) -> None:
    result = run(f"unix:{broker.path}", ["tr", "a-z", "A-Z"], stdin=b"hello")
    assert result == Result(b"HELLO", b"", 0, None)
    assert result.ok and result.check() is result
    failed = run(str(broker.path), ["sh", "-c", "echo no >&2; exit 3"])
    assert (failed.stderr, failed.exitcode, failed.ok) == (b"no\n", 3, False)
    with pytest.raises(ProgramFailed, match="exit status 3"):
        failed.check()
    killed = run(str(broker.path), ["sh", "-c", "kill -KILL $$"])
    assert (killed.exitcode, killed.termsig) == (None, "KILL")


def test_run_large_binary_output_and_echoed_stdin(broker: Broker) -> None:
    big = run(str(broker.path), ["head", "-c", str(50_000_000), "/dev/urandom"], timeout=60)
    assert len(big.stdout) == 50_000_000 and big.ok
    payload = random.Random(3).randbytes(8_000_000)
    echoed = run(str(broker.path), ["cat"], stdin=payload, timeout=60)
    assert echoed.stdout == payload  # written while reading: no deadlock


def test_duplex_session_interleaves_send_and_receive(broker: Broker) -> None:
    seen: list[bytes] = []
    with open_session(str(broker.path), ["cat"], on_stdout=seen.append) as session:
        frames = iter(session)
        session.send(b"one")
        assert next(frames) == Output("stdout", b"one")
        session.send(b"two")
        assert next(frames) == Output("stdout", b"two")
        session.close_stdin()
        assert list(frames) == [Exited(exitcode=0)]
    assert seen == [b"one", b"two"]


def test_leaving_a_session_early_terminates_the_program(broker: Broker) -> None:
    with open_session(str(broker.path), ["sh", "-c", "echo $$; exec sleep 60"]) as session:
        pid = int(next(iter(session)).data)  # type: ignore[union-attr]
        assert pid_alive(pid)
    wait_exit(pid)


def test_timeout(broker: Broker) -> None:
    started = time.monotonic()
    with pytest.raises(Timeout):
        run(str(broker.path), ["sleep", "30"], timeout=0.5)
    assert time.monotonic() - started < 5


def test_each_unavailable_broker_is_said_plainly(tmp_path: Path, broker: Broker) -> None:
    with pytest.raises(BrokerUnavailable, match="does not exist"):
        run(str(tmp_path / "missing.sock"), ["true"])
    stale = tmp_path / "stale.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(stale))
    listener.close()
    with pytest.raises(BrokerUnavailable, match="nobody is listening"):
        run(str(stale), ["true"])
    with pytest.raises(BrokerUnavailable, match="cannot reach the gateway"):
        run("http://127.0.0.1:1/", ["true"])


def test_session_from_another_thread(broker: Broker) -> None:
    with open_session(str(broker.path), ["cat"]) as session:

        def feed() -> None:
            for i in range(100):
                session.send(b"%d\n" % i)
            session.close_stdin()

        feeder = threading.Thread(target=feed)
        feeder.start()
        result = session.wait()
        feeder.join(10)
    assert result.stdout == b"".join(b"%d\n" % i for i in range(100))


async def test_trio_run_and_session(broker: Broker) -> None:
    result = await arun(str(broker.path), ["cat"], stdin=b"x" * 3_000_000, timeout=30)
    assert result.stdout == b"x" * 3_000_000 and result.ok
    with trio.fail_after(10):
        async with open_async_session(str(broker.path), ["cat"]) as session:
            frames = session.__aiter__()
            await session.send(b"ping")
            assert await frames.__anext__() == Output("stdout", b"ping")
            await session.close_stdin()
            assert await frames.__anext__() == Exited(exitcode=0)


async def test_trio_timeout_and_early_exit(broker: Broker) -> None:
    with pytest.raises(Timeout):
        await arun(str(broker.path), ["sleep", "30"], timeout=0.3)
    with trio.fail_after(10):
        async with open_async_session(
            str(broker.path), ["sh", "-c", "echo $$; exec sleep 60"]
        ) as s:
            async for frame in s:
                assert isinstance(frame, Output)
                pid = int(frame.data)
                break
    await trio.to_thread.run_sync(wait_exit, pid)
    with pytest.raises(BrokerUnavailable):
        await arun("/nonexistent/broker.sock", ["true"])


async def test_a_peer_breaking_the_protocol_is_a_protocol_error(tmp_path: Path) -> None:
    """Not an ExceptionGroup from trio's nursery: the error callers catch."""
    path = str(tmp_path / "liar.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(4)

    async def liar() -> None:
        for _ in range(2):
            conn, _ = await listener.accept()
            with conn:
                await conn.recv(1024)
                await conn.send(b"6:stdout,2:hi,5:bogus,1:x,")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(liar)
            with pytest.raises(ProtocolError, match="unknown frame type"):
                await arun(path, ["true"])
            with pytest.raises(ProtocolError, match="unknown frame type"):
                await trio.to_thread.run_sync(lambda: run(path, ["true"]))
    listener.close()
