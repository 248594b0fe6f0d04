"""The Python client and sockexec-client through the HTTP gateway (same API)."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from sockexec_py.client import (
    BrokerUnavailable,
    Timeout,
    arun,
    open_async_session,
    open_session,
    run,
)
from sockexec_py.events import Exited, Output

from conftest import Broker, GatewayProcess


@pytest.fixture
def gateway(broker: Broker) -> Iterator[GatewayProcess]:
    process = GatewayProcess(broker.path)
    yield process
    process.stop()


def test_one_shot_over_http_is_byte_exact(gateway: GatewayProcess) -> None:
    payload = random.Random(1).randbytes(1_000_000)
    result = run(gateway.base, ["cat"], stdin=payload, timeout=30)
    assert result.stdout == payload and result.ok
    failed = run(gateway.base, ["sh", "-c", "echo e >&2; kill -HUP $$"])
    assert (failed.stderr, failed.termsig) == (b"e\n", "HUP")


def test_duplex_session_over_the_websocket(gateway: GatewayProcess) -> None:
    seen: list[bytes] = []
    url = gateway.base.replace("http://", "ws://")
    with open_session(url, ["cat"], timeout=30, on_stdout=seen.append) as session:
        frames = iter(session)
        session.send(b"\x00binary\xff")
        assert next(frames) == Output("stdout", b"\x00binary\xff")
        session.close_stdin()
        assert next(frames) == Exited(exitcode=0)
    assert seen == [b"\x00binary\xff"]


async def test_trio_one_shot_over_http(gateway: GatewayProcess) -> None:
    result = await arun(gateway.base, ["uname", "-s"], timeout=30)
    assert result.ok and result.stdout


def test_errors_through_the_gateway(gateway: GatewayProcess, tmp_path: Path) -> None:
    with pytest.raises(Timeout):
        run(gateway.base, ["sleep", "30"], timeout=0.5)
    with pytest.raises(BrokerUnavailable, match="cannot reach the gateway"):
        run("http://127.0.0.1:9/", ["true"])
    down = GatewayProcess(tmp_path / "no-broker.sock")
    try:
        with pytest.raises(BrokerUnavailable, match="503 broker_unavailable"):
            run(down.base, ["true"])
    finally:
        down.stop()


def test_token_from_the_environment(broker: Broker, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    gateway = GatewayProcess(broker.path, "--token-file", str(tokens))
    try:
        with pytest.raises(Exception, match="401 unauthorized"):
            run(gateway.base, ["true"])
        monkeypatch.setenv("SOCKEXEC_TOKEN", "s3cret")
        assert run(gateway.base, ["true"]).ok
        with open_session(gateway.base, ["true"], timeout=30) as session:
            session.close_stdin()
            assert session.wait().ok
    finally:
        gateway.stop()


def test_command_line_client_accepts_a_url(gateway: GatewayProcess) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sockexec_py.client_cli", gateway.base, "tr", "a-z", "A-Z"],
        input=b"hello",
        capture_output=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (0, b"HELLO")


async def test_trio_duplex_session_over_the_websocket(gateway: GatewayProcess) -> None:
    seen: list[bytes] = []
    with trio.fail_after(30):
        async with open_async_session(gateway.base, ["cat"], on_stdout=seen.append) as session:
            await session.send(b"trio \x00 bytes")
            frame = await session.__anext__()
            assert frame == Output("stdout", b"trio \x00 bytes")
            await session.close_stdin()
            assert await session.__anext__() == Exited(exitcode=0)
    assert seen == [b"trio \x00 bytes"]
