"""Spawning, terminating and reaping programs.

Programs are started with ``posix_spawnp`` (vfork-style: no page-table copy, no
Python code in the child) in a new process group, with default signal dispositions,
an empty signal mask and only fds 0/1/2: every fd the server opens is close-on-exec.

The :class:`Supervisor` owns every program from spawn to reap: its watcher task reaps
the program however its connection ended, and termination (TERM to the group, KILL
``kill_timeout`` seconds later if anything is still alive) runs there too, so a
connection can close at once while the escalation goes on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import marshal
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from sockexec_py.errors import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_REFUSED
from sockexec_py.protocol import printable

from . import _io

log = logging.getLogger("sockexec_py")

# Signals the child starts with at their default disposition: all that can be set.
_DEFAULT_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
_NOT_FOUND_ERRNOS = frozenset((errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP))
# Failures of the server itself (no memory, no fds, no processes): the request was
# refused, the program was not at fault.
_RESOURCE_ERRNOS = frozenset((errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE))
# How often to check whether a terminated group still has members.
_GROUP_POLL_INTERVAL = 0.05
# The least time between two scans for orphans to reap.
_ORPHAN_SCAN_INTERVAL = 0.05
_HAS_PIDFD = hasattr(os, "pidfd_open")
# Larger stdin/stdout pipes mean fewer wake-ups when data streams (Linux only). Only
# for root: an unprivileged user's pipes share a 64 MiB budget (pipe-user-pages-soft),
# past which Linux gives every new pipe a single page, and big pipes reach it sooner.
_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 256 * 1024
_ENLARGE_PIPES = hasattr(os, "geteuid") and os.geteuid() == 0


class SpawnError(Exception):
    """The program could not be started; ``exitcode`` is 125, 126 or 127."""

    def __init__(self, reason: str, exitcode: int) -> None:
        super().__init__(reason)
        self.exitcode = exitcode


class Program:
    """A running program: its pid (also its process group id) and its pipe ends.

    ``stdin_fd``/``stdout_fd``/``stderr_fd`` are the server's non-blocking ends; the
    connection closes them with :meth:`close_stdin` and :meth:`close_fds`. The status
    is set by the supervisor once the program has been reaped.
    """

    def __init__(self, pid: int, argv: Sequence[bytes], fds: tuple[int, int, int]) -> None:
        self.pid = pid
        self.argv = tuple(argv)
        self.stdin_fd: int | None = fds[0]
        self.stdout_fd: int | None = fds[1]
        self.stderr_fd: int | None = fds[2]
        self.started = time.monotonic()
        self.exited = trio.Event()
        #: Raw wait status once reaped.
        self.status: int | None = None
        self.terminating = False

    @property
    def returncode(self) -> int | None:
        """Exit status for a normal exit (None otherwise or while running)."""
        if self.status is None or not os.WIFEXITED(self.status):
            return None
        return os.WEXITSTATUS(self.status)

    @property
    def termsig(self) -> int | None:
        """The signal number that killed the program (None otherwise or while running)."""
        if self.status is None or not os.WIFSIGNALED(self.status):
            return None
        return os.WTERMSIG(self.status)

    def signal_group(self, signum: int) -> bool:
        """Send ``signum`` to the program's process group; False if the group is gone.

        Never raises: a group we may not signal (EPERM, members that changed uid) is
        logged, and treated as gone rather than crashing the supervisor.
        """
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            return False
        except OSError as exc:
            log.warning("cannot signal process group %d: %s", self.pid, exc.strerror)
            return False
        return True

    async def write_stdin(self, chunks: Sequence[bytes | memoryview]) -> bool:
        """Write ``chunks`` to the program's stdin (one ``writev`` when the pipe has
        room); False (data dropped) once the program stopped reading."""
        if self.stdin_fd is None:
            return False
        try:
            await _io.write_fd_all(self.stdin_fd, chunks)
        except BrokenPipeError:
            self.close_stdin()
            return False
        return True

    def close_stdin(self) -> None:
        """Close the program's stdin (it reads EOF)."""
        self._close("stdin_fd")

    def close_fds(self) -> None:
        """Close every pipe end the server still holds."""
        for name in ("stdin_fd", "stdout_fd", "stderr_fd"):
            self._close(name)

    def _close(self, name: str) -> None:
        fd = getattr(self, name)
        if fd is not None:
            setattr(self, name, None)
            trio.lowlevel.notify_closing(fd)
            os.close(fd)


_ENV_SNAPSHOT: dict[bytes, bytes] | None = None


def _environ() -> dict[bytes, bytes]:
    """The server's environment as a plain dict, converted once (not per spawn)."""
    global _ENV_SNAPSHOT
    if _ENV_SNAPSHOT is None:
        _ENV_SNAPSHOT = dict(os.environb)
    return _ENV_SNAPSHOT


@dataclass(frozen=True)
class ExecSpec:
    """A program to start under a policy rule: what to run, and how to set it up.

    ``path`` is absolute (no PATH search); ``argv[0]`` is what the program sees. The
    ``uid``/``gid``/``groups``/``cwd``/``umask``/``rlimits`` settings need the exec
    helper (see :attr:`needs_helper`); the rest goes straight to ``posix_spawn``.
    """

    path: bytes
    argv: tuple[bytes, ...]
    env: dict[bytes, bytes]
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None
    cwd: str | None = None
    umask: int | None = None
    #: (name, RLIMIT_* number, value) triples.
    rlimits: tuple[tuple[str, int, int], ...] = ()

    @property
    def needs_helper(self) -> bool:
        return (
            self.uid is not None
            or self.gid is not None
            or self.groups is not None
            or self.cwd is not None
            or self.umask is not None
            or bool(self.rlimits)
        )


def _make_pipes() -> tuple[list[int], list[int]]:
    """Three close-on-exec pipes: the server's ends and the child's ends (0, 1, 2)."""
    parent_ends: list[int] = []
    child_ends: list[int] = []
    try:
        for child_is_reader in (True, False, False):
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            if child_is_reader:
                parent_ends.append(write_end)
                child_ends.append(read_end)
            else:
                parent_ends.append(read_end)
                child_ends.append(write_end)
    except OSError as exc:
        for fd in parent_ends + child_ends:
            os.close(fd)
        raise SpawnError(f"cannot create pipes: {exc.strerror}", EXIT_REFUSED) from None
    return parent_ends, child_ends


def spawn(
    argv: Sequence[bytes],
    env: dict[bytes, bytes] | None = None,
    *,
    path: bytes | None = None,
    extra_fds: Sequence[int] = (),
) -> Program:
    """Start ``argv`` with fresh pipes, no shell.

    ``argv[0]`` is looked up in PATH unless ``path`` gives the file to execute.
    ``extra_fds`` become the child's fds 3, 4… (the exec helper's status socket).
    Raises :class:`SpawnError` with the exit code to report: 127 when the program is
    not found, 126 when it cannot be executed, 125 when the server lacks resources.
    """
    parent_ends, child_ends = _make_pipes()
    name = printable(path or argv[0])
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(child_ends)]
    actions += [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(extra_fds)]
    try:
        pid = (os.posix_spawnp if path is None else os.posix_spawn)(
            argv[0] if path is None else path,
            list(argv),
            _environ() if env is None else env,
            file_actions=actions,
            setpgroup=0,
            setsigmask=(),
            setsigdef=_DEFAULT_SIGNALS,
        )
    except OSError as exc:
        for fd in parent_ends:
            os.close(fd)
        if exc.errno in _NOT_FOUND_ERRNOS:
            raise SpawnError(f"{name}: program not found", EXIT_NOT_FOUND) from None
        if exc.errno in _RESOURCE_ERRNOS:
            raise SpawnError(f"{name}: cannot spawn: {exc.strerror}", EXIT_REFUSED) from None
        raise SpawnError(f"{name}: cannot execute: {exc.strerror}", EXIT_CANNOT_EXECUTE) from None
    finally:
        for fd in child_ends:
            os.close(fd)
    for fd in parent_ends:
        os.set_blocking(fd, False)
    if _ENLARGE_PIPES:
        try:
            fcntl.fcntl(parent_ends[0], _F_SETPIPE_SZ, _PIPE_SIZE)
            fcntl.fcntl(parent_ends[1], _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            pass  # a tuning only; the default pipe size works
    return Program(pid, argv, (parent_ends[0], parent_ends[1], parent_ends[2]))


_HELPER = os.fsencode(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_exec_helper.py"))


def spawn_helper(spec: ExecSpec) -> tuple[Program, socket.socket]:
    """Start the exec helper for ``spec``; returns the program and the status socket.

    The caller sends the spec and reads the outcome with :func:`finish_helper`. The
    program's pid is the helper's: it becomes the program at exec.
    """
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise SpawnError(f"cannot start the exec helper: {exc.strerror}", EXIT_REFUSED) from None
    try:
        executable = os.fsencode(sys.executable)
        program = spawn(
            (executable, b"-I", b"-S", _HELPER),
            {},
            path=executable,
            extra_fds=(theirs.fileno(),),
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    program.argv = spec.argv
    ours.setblocking(False)
    return program, ours


async def finish_helper(spec: ExecSpec, status: socket.socket) -> None:
    """Send ``spec`` to the exec helper and wait for its exec; SpawnError on failure."""
    with status:
        message = marshal.dumps(
            {
                "path": spec.path,
                "argv": list(spec.argv),
                "env": spec.env,
                "uid": spec.uid,
                "gid": spec.gid,
                "groups": list(spec.groups) if spec.groups is not None else None,
                "cwd": spec.cwd,
                "umask": spec.umask,
                "rlimits": [list(item) for item in spec.rlimits],
            }
        )
        try:
            await _io.sendmsg_all(status, [message])
            status.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the helper died first: its exit status tells the story
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := await _io.recv(status, 4096):
                chunks.append(chunk)
    answer = b"".join(chunks)
    if answer == b"X":
        return  # about to exec, and the exec closed the socket: the program runs
    if not answer:
        raise SpawnError("the exec helper died before starting the program", EXIT_REFUSED)
    code, _, reason = answer.removeprefix(b"X").partition(b" ")
    raise SpawnError(printable(reason), int(code) if code.isdigit() else EXIT_REFUSED)


class Supervisor:
    """Owns programs from spawn to reap, and bounds how many run at once.

    Resource handling: each program gets a watcher task in the supervisor's nursery
    that reaps it and frees its slot; :meth:`terminate` starts the TERM→KILL
    escalation in the same nursery. The nursery's owner waits for both, so no program
    outlives the server unreaped.
    """

    def __init__(self, nursery: trio.Nursery, max_running: int, kill_timeout: float) -> None:
        self._nursery = nursery
        self._slots = trio.Semaphore(max_running)
        self.kill_timeout = kill_timeout
        self.running: set[Program] = set()

    async def acquire_slot(self) -> None:
        """Wait (FIFO) until fewer than ``max_running`` programs run."""
        try:
            self._slots.acquire_nowait()  # the common case: no scheduling round
        except trio.WouldBlock:
            await self._slots.acquire()

    def release_slot(self) -> None:
        """Give back a slot taken with :meth:`acquire_slot` that did not spawn."""
        self._slots.release()

    def spawn(
        self,
        argv: Sequence[bytes],
        env: dict[bytes, bytes] | None = None,
        *,
        path: bytes | None = None,
    ) -> Program:
        """Spawn ``argv`` in an acquired slot; the slot is freed when it is reaped.

        On :class:`SpawnError` the slot is released before the error propagates.
        """
        try:
            program = spawn(argv, env, path=path)
        except BaseException:
            self._slots.release()
            raise
        self._track(program)
        return program

    async def spawn_spec(
        self, spec: ExecSpec, started: Callable[[Program], None] | None = None
    ) -> Program:
        """Spawn a policy rule's program in an acquired slot (see :meth:`spawn`).

        Settings ``posix_spawn`` cannot apply go through the exec helper: a failure
        there (no such directory, a limit refused, program not found) raises
        :class:`SpawnError` once the helper is reaped, like a failed spawn.
        ``started`` is called as soon as the process exists, before the helper has
        exec'd, so a client leaving meanwhile can have it terminated.
        """
        if not spec.needs_helper:
            return self.spawn(spec.argv, spec.env, path=spec.path)
        try:
            program, status = spawn_helper(spec)
        except BaseException:
            self._slots.release()
            raise
        self._track(program)
        if started is not None:
            started(program)
        try:
            await finish_helper(spec, status)
        except SpawnError:
            program.close_fds()
            with trio.CancelScope(shield=True):
                await program.exited.wait()  # it exits right after saying why
            raise
        except BaseException:
            program.close_fds()
            self.terminate(program)
            raise
        return program

    def _track(self, program: Program) -> None:
        self.running.add(program)
        self._nursery.start_soon(self._reap, program)

    def terminate(self, program: Program) -> None:
        """Terminate the program's group: TERM now, KILL after ``kill_timeout``.

        Idempotent, returns at once; the escalation runs in the supervisor's nursery.
        """
        if program.terminating or program.exited.is_set():
            return  # a reaped leader's group number may already be someone else's
        program.terminating = True
        self._nursery.start_soon(self._escalate, program)

    async def _escalate(self, program: Program) -> None:
        program.signal_group(signal.SIGTERM)
        program.signal_group(signal.SIGCONT)  # a stopped program must see its TERM
        with trio.move_on_after(self.kill_timeout):
            await program.exited.wait()
            # The leader is gone; wait for the rest of its group, if any, to follow.
            while program.signal_group(0):
                await trio.sleep(_GROUP_POLL_INTERVAL)
            return
        program.signal_group(signal.SIGKILL)

    async def _reap(self, program: Program) -> None:
        # Shielded: even when the server is cancelled, every child gets reaped.
        with trio.CancelScope(shield=True):
            try:
                program.status = await _wait_for_exit(program.pid)
            finally:
                self.running.discard(program)
                self._slots.release()
                program.exited.set()


async def _wait_for_exit(pid: int) -> int:
    """Wait for ``pid`` to exit and reap it; returns the raw wait status.

    A pidfd where the kernel has them (Linux 5.3+, and not refused by a seccomp
    profile); else a thread per program, without trio's default cap of 40 threads,
    which would leave the 41st program unreaped.
    """
    pidfd = -1
    if _HAS_PIDFD:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = -1
    if pidfd >= 0:
        try:
            while True:
                reaped, status = os.waitpid(pid, os.WNOHANG)
                if reaped:
                    return status
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
    _, status = await trio.to_thread.run_sync(
        os.waitpid, pid, 0, abandon_on_cancel=False, limiter=_UNLIMITED_THREADS
    )
    return status


_UNLIMITED_THREADS = trio.CapacityLimiter(math.inf)


def deadline_after(seconds: float) -> float:
    """A trio deadline ``seconds`` from now; 0 or less means none."""
    return trio.current_time() + seconds if seconds > 0 else math.inf


class OrphanReaper:
    """Adopts and reaps the orphans of our programs (Linux child subreaper).

    A program's background children outlive it; reparented to init they may linger
    as zombies (containers often have no reaping init) and keep a terminated group
    "alive" for the whole ``-k`` delay. As a subreaper the broker adopts them and
    reaps them itself. Only for the daemon process: in a process that has other
    children (a test runner) it would reap those too.
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    @staticmethod
    def enable() -> bool:
        """Become a child subreaper; False where the platform cannot.

        Orphans are found through ``/proc/self/task/*/children`` (a kernel built with
        CONFIG_PROC_CHILDREN): without it adopted orphans could not be told from our
        programs, so the broker does not adopt them at all.
        """
        if not os.path.exists(f"/proc/self/task/{os.getpid()}/children"):
            return False
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_child_subreaper = 36
            return bool(libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0)
        except (OSError, AttributeError):
            return False

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            task_status.started()
            self.reap_orphans()
            async for _ in signals:
                self.reap_orphans()
                # Every program's exit is a SIGCHLD too: scanning /proc for each would
                # cost more than the rest of a short session. SIGCHLDs arriving during
                # the pause are coalesced into one more scan; an orphan waits that long.
                await trio.sleep(_ORPHAN_SCAN_INTERVAL)

    def reap_orphans(self) -> None:
        """Reap every exited child that is not a program the supervisor tracks."""
        tracked = {program.pid for program in self._supervisor.running}
        for pid in _children() - tracked:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _children() -> set[int]:
    pids: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            continue
    return pids
