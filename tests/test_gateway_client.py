"""The Python client and sockexec-client through the HTTP gateway (same API)."""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from sockexec_py.client import (
    BrokerUnavailable,
    ProtocolError,
    Timeout,
    arun,
    open_async_session,
    open_session,
    run,
)
from sockexec_py.client.wire import GatewayRefused
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


def test_token_from_the_environment(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
        # A refused WebSocket is the same typed error as a refused one-shot request.
        monkeypatch.setenv("SOCKEXEC_TOKEN", "wrong")
        with (
            pytest.raises(ProtocolError, match="401 unauthorized") as info,
            open_session(gateway.base, ["true"], timeout=30),
        ):
            pass
        assert not isinstance(info.value, BrokerUnavailable)
    finally:
        gateway.stop()


async def test_refused_websockets_raise_what_one_shot_requests_raise(
    broker: Broker, tmp_path: Path, monkeypatch
) -> None:
    """The trio flavour: refused before the handshake (401), or after it (503)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    gateway = GatewayProcess(broker.path, "--token-file", str(tokens))
    down = GatewayProcess(tmp_path / "no-broker.sock")
    try:
        monkeypatch.setenv("SOCKEXEC_TOKEN", "wrong")
        with pytest.raises(ProtocolError, match="401 unauthorized") as info:
            async with open_async_session(gateway.base, ["true"]):
                pass
        assert not isinstance(info.value, BrokerUnavailable)
        monkeypatch.delenv("SOCKEXEC_TOKEN")
        with pytest.raises(BrokerUnavailable, match="503 broker_unavailable"):
            async with open_async_session(down.base, ["true"]) as session:
                await session.close_stdin()
                await session.wait()
    finally:
        gateway.stop()
        down.stop()


def test_command_line_client_accepts_a_url(gateway: GatewayProcess) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sockexec_py.client.cli", gateway.base, "tr", "a-z", "A-Z"],
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


@contextlib.contextmanager
def _garbage_broker(path: Path) -> Iterator[None]:
    """A fake broker on ``path`` that answers every one-shot request with a pair of an
    unknown type (what the gateway reports as 502)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def serve() -> None:
        with contextlib.suppress(OSError):  # ends when the listener is closed
            while True:
                conn, _ = listener.accept()
                with conn:
                    request = b""
                    while not request.endswith(b"0:,") and (data := conn.recv(65536)):
                        request += data  # read it all: closing with unread data resets
                    conn.sendall(b"5:bogus,1:x,")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(10)


def test_a_broker_answering_badly_is_a_protocol_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sock"
    with _garbage_broker(path):
        gateway = GatewayProcess(path)
        try:
            with pytest.raises(ProtocolError, match="502 broker_protocol_error") as info:
                run(gateway.base, ["true"], timeout=30)
            assert not isinstance(info.value, BrokerUnavailable)
        finally:
            gateway.stop()


def test_argv_the_gateway_cannot_carry_is_refused_naming_the_argument(
    gateway: GatewayProcess,
) -> None:
    # The gateway carries argv as JSON text: bytes that are not UTF-8 (and str holding
    # lone surrogates, as sys.argv has for such bytes) cannot go through.
    for argv in ([b"echo", b"ok", b"\xff"], ["echo", "ok", "\udcff"]):
        with pytest.raises(ProtocolError, match=r"argv\[2\] is not valid UTF-8"):
            run(gateway.base, argv, timeout=30)
        with pytest.raises(ProtocolError, match=r"argv\[2\] is not valid UTF-8"):
            open_session(gateway.base.replace("http", "ws"), argv, timeout=30)
    assert (
        run(gateway.base, [b"echo", "h\u00e9".encode()], timeout=30).stdout == "h\u00e9\n".encode()
    )


FIFTY_MIB = random.Random(50).randbytes(50 << 20)


def test_one_send_of_50_mib_through_the_websocket(gateway: GatewayProcess) -> None:
    """One ``send()`` far past Hypercorn's 16 MiB message limit: the session splits it
    into messages of at most 64 KiB, as it splits stdin into netstrings on the socket."""
    digest = hashlib.sha256(FIFTY_MIB).hexdigest().encode()
    with open_session(gateway.base, ["sha256sum"], timeout=120) as session:
        session.send(FIFTY_MIB)
        session.close_stdin()
        result = session.wait()
    assert (result.stdout[:64], result.exitcode) == (digest, 0)


async def test_one_send_of_50_mib_through_the_websocket_trio(gateway: GatewayProcess) -> None:
    digest = hashlib.sha256(FIFTY_MIB).hexdigest().encode()
    url = gateway.base.replace("http://", "ws://")
    async with open_async_session(url, ["sha256sum"], timeout=120) as session:
        await session.send(FIFTY_MIB)
        await session.close_stdin()
        result = await session.wait()
    assert (result.stdout[:64], result.exitcode) == (digest, 0)


def test_a_body_over_max_body_is_the_gateways_413_not_a_broken_pipe(broker: Broker) -> None:
    """Found by fuzzing: the gateway answers 413 before reading the body; the client,
    still writing, saw a broken pipe and raised BrokerUnavailable."""
    gateway = GatewayProcess(broker.path, "--max-body", "100000")
    try:
        with pytest.raises(GatewayRefused, match="413 too_large") as caught:
            run(gateway.base, ["cat"], stdin=bytes(20_000_000), timeout=30)
        assert caught.value.status == 413
        assert isinstance(caught.value, ProtocolError)
    finally:
        gateway.stop()


def test_terminate_through_the_websocket(gateway: GatewayProcess) -> None:
    with open_session(gateway.base, ["sleep", "300"], timeout=30) as session:
        session.close_stdin()
        session.terminate()  # after close_stdin too
        assert session.wait().termsig == "TERM"
