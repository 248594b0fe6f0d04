"""What only the socat shell client needs checking (the tests it shares with
sockexec-client are in test_client_cli.py)."""

from __future__ import annotations

import subprocess

import pytest

from conftest import ROOT, Broker, require_tool

SOCAT_CLIENT = ROOT / "clients" / "sockexec-socat"


@pytest.mark.parametrize("shell", ["sh", "bash --posix"])
def test_targets_and_posix_shells(broker: Broker, shell: str) -> None:
    require_tool("socat")
    path = broker.path
    for target in (str(path), f"unix:{path}", f"unix://{path}", path.name):
        proc = subprocess.run(
            [*shell.split(), str(SOCAT_CLIENT), target, "tr", "a-z", "A-Z"],
            input=b"hello",
            capture_output=True,
            timeout=60,
            cwd=path.parent,
        )
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"HELLO", b""), target


def test_output_written_after_the_end_of_stdin_still_arrives(broker: Broker) -> None:
    """socat half-closes at the end of its input; the reply keeps coming."""
    require_tool("socat")
    script = "cat; echo; i=0; while [ $i -lt 3 ]; do i=$((i + 1)); echo after $i; done"
    proc = subprocess.run(
        ["sh", str(SOCAT_CLIENT), str(broker.path), "sh", "-c", script],
        input=b"before",
        capture_output=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (0, b"before\nafter 1\nafter 2\nafter 3\n")
