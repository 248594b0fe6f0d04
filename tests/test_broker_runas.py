"""The fast run-as path (issue 14): a rule's user, groups, directory, umask and limits
through ``posix_spawn`` (and ``prlimit`` for limits), with no Python start-up in the
child: every attribute the program gets, and the broker's own identity unchanged."""

from __future__ import annotations

import grp
import os
import pwd
import resource
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from sockexec_py.broker import spawn as spawn_module
from sockexec_py.broker.cli import close_on_exec_inherited
from sockexec_py.broker.runas import needs_helper
from sockexec_py.broker.spawn import Program
from sockexec_py.broker.supervisor import Supervisor
from sockexec_py.errors import single_errors
from sockexec_py.policy import ExecSpec

from conftest import MISC

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")

CHECKER = r"""
echo "argv0=$0"
echo "ids=$(id -u) $(id -g) $(id -G)"
echo "cwd=$(pwd)"
echo "umask=$(umask)"
echo "nofile=$(ulimit -Sn) $(ulimit -Hn)"
echo "cpu=$(ulimit -St) $(ulimit -Ht)"
grep -E '^Sig(Blk|Ign)' /proc/self/status | tr -d '\t' | sed 's/:/=/'
echo "fds=$(%s list)"
""" % (MISC / "std-fds")


async def run_spec(spec: ExecSpec) -> dict[str, str]:
    """Spawn ``spec`` through the supervisor, the exec helper forbidden; its report."""
    assert not needs_helper(spec)
    chunks = []
    with single_errors():
        return await _run(spec, chunks)


async def _run(spec: ExecSpec, chunks: list[bytes]) -> dict[str, str]:
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, kill_timeout=5)
        program: Program = await supervisor.spawn(spec, lambda _: None)
        assert program.stdout_fd is not None
        while True:
            await trio.lowlevel.wait_readable(program.stdout_fd)
            chunk = os.read(program.stdout_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        await program.exited.wait()
        program.close_fds()
    assert program.status is not None and os.WEXITSTATUS(program.status) == 0
    lines = b"".join(chunks).decode().splitlines()
    return dict(line.split("=", 1) for line in lines)


@pytest.fixture(autouse=True)
def as_in_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """No exec helper allowed; and the test process's inherited fds close-on-exec, as
    the daemon makes its own at start-up."""

    def refuse(spec: ExecSpec) -> None:
        raise AssertionError("the exec helper was used")

    monkeypatch.setattr("sockexec_py.broker.supervisor.spawn_helper", refuse)
    close_on_exec_inherited(keep=set())


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory any user can reach (pytest's tmp dirs are root's only)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as name:
        os.chmod(name, 0o755)
        yield Path(name)


@needs_root
async def test_every_attribute_of_a_run_as_rule(shared_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    users = grp.getgrnam("users").gr_gid
    groups = tuple(sorted(set(os.getgrouplist("nobody", users))))
    workdir = shared_dir / "work"
    workdir.mkdir()
    before = (os.getresuid(), os.getresgid(), os.getgroups(), os.getcwd())
    old_umask = os.umask(0o022)
    os.umask(old_umask)
    spec = ExecSpec(
        b"/bin/sh",
        (b"checker", b"-c", CHECKER.encode()),
        {b"PATH": b"/usr/bin:/bin"},
        uid=nobody.pw_uid,
        gid=users,
        groups=groups,
        cwd=str(workdir),
        umask=0o027,
        rlimits=(
            ("nofile", resource.RLIMIT_NOFILE, 256),
            ("cpu", resource.RLIMIT_CPU, 7),
        ),
    )
    report = await run_spec(spec)
    uid, gid, *supplementary = report["ids"].split()
    assert (int(uid), int(gid)) == (nobody.pw_uid, users)
    assert sorted(int(g) for g in supplementary) == sorted(groups)
    assert report["cwd"] == str(workdir)
    assert report["umask"] == "0027"
    assert (report["nofile"], report["cpu"]) == ("256 256", "7 7")
    assert int(report["SigBlk"], 16) == 0
    assert int(report["SigIgn"], 16) & 0x7FFFFFFF == 0  # 32/33: glibc's own (as plain)
    assert report["fds"] == "0 1 2"
    # prlimit executes the program by its path: that is what argv[0] becomes.
    assert report["argv0"] == "/bin/sh"
    # The broker took these on for the spawn only.
    assert (os.getresuid(), os.getresgid(), os.getgroups(), os.getcwd()) == before
    assert os.umask(old_umask) == old_umask


async def test_without_limits_argv0_is_kept_and_nothing_else_runs_first(tmp_path: Path) -> None:
    spec = ExecSpec(
        b"/bin/sh", (b"my-name", b"-c", CHECKER.encode()), {}, cwd=str(tmp_path), umask=0o077
    )
    report = await run_spec(spec)
    assert (report["argv0"], report["cwd"], report["umask"]) == ("my-name", str(tmp_path), "0077")
    assert report["fds"] == "0 1 2"


@needs_root
async def test_the_directory_is_entered_as_the_programs_user(shared_dir: Path) -> None:
    """Root could enter it; nobody cannot: the run is refused, as with the exec helper."""
    private = shared_dir / "private"
    private.mkdir(mode=0o700)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    spec = ExecSpec(
        b"/bin/true", (b"true",), {}, uid=pwd.getpwnam("nobody").pw_uid, cwd=str(private)
    )
    with pytest.raises(spawn_module.SpawnError, match=r"changing directory to .*: Permission"):
        await run_spec(spec)
    assert os.getresuid() == (0, 0, 0)


async def test_a_missing_program_behind_prlimit_is_127_in_our_words() -> None:
    spec = ExecSpec(
        b"/nonexistent/prog",
        (b"prog",),
        {},
        rlimits=(("core", resource.RLIMIT_CORE, 0),),
    )
    with pytest.raises(spawn_module.SpawnError, match="/nonexistent/prog: program not found"):
        await run_spec(spec)
