"""``sockexec-client`` and the socat shell client, run as users run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, Broker, require_tool

SOCAT_CLIENT = ROOT / "clients" / "sockexec-socat"


def _python_client(broker_path: Path, *argv: str) -> list[str]:
    return [sys.executable, "-m", "sockexec_py.client_cli", str(broker_path), *argv]


def _socat_client(broker_path: Path, *argv: str) -> list[str]:
    require_tool("socat")
    return ["sh", str(SOCAT_CLIENT), str(broker_path), *argv]


CLIENTS = [
    pytest.param(_python_client, id="sockexec-client"),
    pytest.param(_socat_client, id="socat"),
]


@pytest.mark.parametrize("client", CLIENTS)
def test_echo_through_tr(broker: Broker, client) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        client(broker.path, "tr", "a-z", "A-Z"), input=b"hello", capture_output=True, timeout=60
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"HELLO", b"")


@pytest.mark.parametrize("client", CLIENTS)
def test_exit_status_and_streams_land_on_the_right_fds(broker: Broker, client) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        client(broker.path, "sh", "-c", "echo out; echo err >&2; exit 7"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, b"out\n", b"err\n")


@pytest.mark.parametrize("client", CLIENTS)
def test_death_by_signal_is_128_plus_n(broker: Broker, client) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        client(broker.path, "sh", "-c", "kill -TERM $$"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 128 + 15
    assert proc.stderr.decode().strip().endswith("killed by signal TERM")


@pytest.mark.parametrize("client", CLIENTS)
def test_binary_stdin_round_trip(broker: Broker, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    payload = bytes(range(256)) * 2000  # 512,000 bytes: several 64 KiB stdin netstrings
    proc = subprocess.run(
        client(broker.path, "cat"), input=payload, capture_output=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout == payload


@pytest.mark.parametrize("client", CLIENTS)
def test_unreachable_broker_is_111(tmp_path: Path, client) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        client(tmp_path / "missing.sock", "true"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 111
    assert b"missing.sock" in proc.stderr


def test_installed_console_script(broker: Broker) -> None:
    script = require_tool("sockexec-client")
    proc = subprocess.run(
        ["sh", "-c", f"printf 'hello' | {script} {broker.path} tr a-z A-Z"],
        capture_output=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (0, b"HELLO")
