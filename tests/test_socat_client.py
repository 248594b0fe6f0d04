"""What only the socat shell client needs checking (the tests it shares with
sockexec-client are in test_client_cli.py)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

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


def _pipe_readers(inode: int) -> list[int]:
    """The processes other than us that hold a pipe (by inode) open."""
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds]
        except OSError:  # gone meanwhile, or not ours to look at
            continue
        if f"pipe:[{inode}]" in links:
            holders.append(int(pid))
    return holders


@pytest.mark.parametrize("shell", ["sh", "bash --posix"])
def test_returns_when_the_program_ends_though_its_stdin_stays_open(
    broker: Broker, shell: str
) -> None:
    """Our stdin is a pipe nobody writes to nor closes: the program's end is enough,
    and no read of that pipe is left behind."""
    require_tool("socat")
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.run(
            [*shell.split(), str(SOCAT_CLIENT), str(broker.path), "sh", "-c", "echo hi; exit 3"],
            stdin=read_end,
            capture_output=True,
            timeout=60,
        )
        assert (proc.returncode, proc.stdout, proc.stderr) == (3, b"hi\n", b"")
        assert _pipe_readers(os.fstat(read_end).st_ino) == []
    finally:
        os.close(read_end)
        os.close(write_end)


def test_endless_stdin_and_a_program_that_reads_none(broker: Broker) -> None:
    require_tool("socat")
    proc = subprocess.run(
        f"yes | sh {shlex.quote(str(SOCAT_CLIENT))} {shlex.quote(str(broker.path))} true",
        shell=True,
        capture_output=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")


def test_a_dd_without_fullblock_is_refused_in_one_line(broker: Broker, tmp_path: Path) -> None:
    """Exact reads of the reply need GNU/busybox dd's iflag=fullblock: say so."""
    require_tool("socat")
    real_dd = shutil.which("dd")
    fake = tmp_path / "bin" / "dd"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        "for arg; do case $arg in iflag=*)\n"
        '    echo "dd: unknown operand $arg" >&2; exit 1;;\n'
        "esac; done\n"
        f'exec {real_dd} "$@"\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    proc = subprocess.run(
        ["sh", str(SOCAT_CLIENT), str(broker.path), "true"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        env=env,
    )
    assert (proc.returncode, proc.stdout) == (111, b"")
    (line,) = proc.stderr.decode().splitlines()
    assert line.startswith("sockexec-socat: ") and "iflag=fullblock" in line, line
