"""The supervisor alone, with real processes: spawn, reap (exit callbacks, status),
TERM then KILL of the whole group, and spawn failures reported with their exit code."""

from __future__ import annotations

import os
import resource
import signal
from pathlib import Path

import pytest
import trio

from sockexec_py.broker.spawn import Program, SpawnError
from sockexec_py.broker.supervisor import Supervisor
from sockexec_py.policy import ExecSpec, server_environ

from conftest import MISC, pid_alive


def spec(*argv: str) -> ExecSpec:
    """What ALLOW_ALL builds: argv[0] looked up in PATH, the server's environment."""
    return ExecSpec(path=None, argv=tuple(a.encode() for a in argv), env=server_environ())


async def read_line(fd: int | None) -> bytes:
    assert fd is not None
    data = b""
    while not data.endswith(b"\n"):
        await trio.lowlevel.wait_readable(fd)
        chunk = os.read(fd, 100)
        if not chunk:
            break
        data += chunk
    return data


async def test_spawn_and_reap_run_the_exit_callbacks() -> None:
    seen: list[Program] = []
    freed: list[str] = []
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, kill_timeout=5)
        program = await supervisor.spawn(spec("sh", "-c", "echo hi; exit 3"), seen.append)
        program.on_exit(lambda: freed.append("slot"))
        assert seen == [program] and program in supervisor.running
        assert await read_line(program.stdout_fd) == b"hi\n"
        await program.exited.wait()
        program.close_fds()
    assert program.status is not None and os.WEXITSTATUS(program.status) == 3
    assert freed == ["slot"] and not supervisor.running


async def test_terminate_kills_a_group_that_ignores_term() -> None:
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, kill_timeout=0.5)
        program = await supervisor.spawn(spec(str(MISC / "ignore-term")), lambda _: None)
        line = await read_line(program.stdout_fd)
        assert line.startswith(b"ready ")
        assert os.getpgid(program.pid) == program.pid  # its own process group
        with trio.fail_after(10):
            supervisor.terminate(program)
            supervisor.terminate(program)  # idempotent
            await program.exited.wait()
        program.close_fds()
    assert program.status is not None and os.WTERMSIG(program.status) == signal.SIGKILL
    assert not pid_alive(program.pid)


async def test_program_not_found_is_127_and_nothing_is_left() -> None:
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, kill_timeout=1)
        with pytest.raises(SpawnError, match="no-such-program: program not found") as caught:
            await supervisor.spawn(spec("no-such-program"), lambda _: None)
    assert caught.value.exitcode == 127 and not supervisor.running


@pytest.mark.parametrize("helper", [False, True], ids=["posix-spawn", "exec-helper"])
async def test_settings_posix_spawn_cannot_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, helper: bool
) -> None:
    """cwd and umask, which posix_spawn cannot set: through posix_spawn with the
    broker taking them on for the spawn (``spawn_as``), and through the exec helper,
    kept for limits above the broker's hard limit (root with CAP_SYS_RESOURCE) and
    systems without prlimit (forced here, where neither can be arranged)."""
    if helper:
        monkeypatch.setattr("sockexec_py.broker.supervisor.needs_helper", lambda spec: True)
    argv = (b"sh", b"-c", b"pwd; umask")
    settings = ExecSpec(b"/bin/sh", argv, server_environ(), cwd=str(tmp_path), umask=0o027)
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, kill_timeout=1)
        program = await supervisor.spawn(settings, lambda _: None)
        output = await read_line(program.stdout_fd)
        output += await read_line(program.stdout_fd)
        await program.exited.wait()
        program.close_fds()
    assert output.split() == [str(tmp_path).encode(), b"0027"]


async def test_exec_helper_failure_is_reported_after_its_reap(tmp_path: Path) -> None:
    """A limit above the broker's own hard limit needs the exec helper (it sets limits
    as root before it switches user); its failure comes back once it is reaped."""
    nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    started: list[Program] = []
    spec = ExecSpec(
        b"/bin/true",
        (b"true",),
        {},
        cwd=str(tmp_path / "missing"),
        rlimits=(("nofile", resource.RLIMIT_NOFILE, nofile_hard + 1),),
    )
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, kill_timeout=1)
        with pytest.raises(SpawnError, match=r"changing directory|setting rlimit") as caught:
            await supervisor.spawn(spec, started.append)
    assert caught.value.exitcode == 125
    (helper,) = started
    assert helper.exited.is_set() and not supervisor.running


async def test_a_directory_that_cannot_be_entered_starts_nothing(tmp_path: Path) -> None:
    started: list[Program] = []
    missing = ExecSpec(b"/bin/true", (b"true",), {}, cwd=str(tmp_path / "missing"))
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, kill_timeout=1)
        with pytest.raises(SpawnError, match=r"changing directory to .*: No such file") as caught:
            await supervisor.spawn(missing, started.append)
    assert caught.value.exitcode == 125 and started == [] and not supervisor.running
    assert os.getcwd() == str(Path.cwd())
