"""Starting a program: pipes and ``posix_spawn``, and the running program.

Programs are started with ``posix_spawn`` (vfork-style: no page-table copy, no Python
code in the child) in a new process group, with default signal dispositions, an empty
signal mask and only fds 0/1/2: every fd the server opens is close-on-exec. Run-as
rules (user, directory, umask, limits) build on this in :mod:`.runas`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager

import trio

from sockexec_py.errors import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_REFUSED
from sockexec_py.replies import printable

from . import _io

log = logging.getLogger("sockexec_py")

# Signals the child starts with at their default disposition: all that can be set.
_DEFAULT_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
_NOT_FOUND_ERRNOS = frozenset((errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP))
# Failures of the server itself (no memory, no fds, no processes): the request was
# refused, the program was not at fault.
_RESOURCE_ERRNOS = frozenset((errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE))
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
    """A started program: its pid (also its process group id) and its pipe ends.

    ``stdin_fd``/``stdout_fd``/``stderr_fd`` are the server's non-blocking ends; the
    connection closes them with :meth:`close_stdin` and :meth:`close_fds`. The
    supervisor sets :attr:`status` once the program has been reaped, then runs the
    :meth:`on_exit` callbacks and sets :attr:`exited`.
    """

    __slots__ = (  # many live at once: no __dict__ each
        "_exit_callbacks", "argv", "exited", "pid", "status", "stderr_fd", "stdin_fd",
        "stdout_fd", "terminating"
    )  # fmt: skip

    def __init__(self, pid: int, argv: Sequence[bytes], fds: tuple[int, int, int]) -> None:
        self.pid = pid
        self.argv = tuple(argv)
        self.stdin_fd: int | None = fds[0]
        self.stdout_fd: int | None = fds[1]
        self.stderr_fd: int | None = fds[2]
        self.exited = trio.Event()
        #: Raw wait status once reaped.
        self.status: int | None = None
        self.terminating = False
        self._exit_callbacks: list[Callable[[], None]] = []

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the program has been reaped (a slot to free...)."""
        self._exit_callbacks.append(callback)

    def reaped(self, status: int | None) -> None:
        """Record the wait status; for the supervisor's reaper only."""
        self.status = status
        callbacks, self._exit_callbacks = self._exit_callbacks, []
        try:
            for callback in callbacks:
                callback()
        finally:
            self.exited.set()

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
    env: Mapping[bytes, bytes],
    *,
    path: bytes | None = None,
    extra_fds: Sequence[int] = (),
    identity: AbstractContextManager[None] | None = None,
    program_argv: Sequence[bytes] | None = None,
) -> Program:
    """Start ``argv`` with fresh pipes, no shell.

    ``argv[0]`` is looked up in PATH unless ``path`` gives the file to execute.
    ``extra_fds`` become the child's fds 3, 4… (the exec helper's status socket).
    ``identity``: the spawn happens inside it (a run-as rule's user, directory and
    umask: :func:`~.runas.spawn_as`). ``program_argv`` is what the program is known by
    when ``argv`` starts an exec step first (logs, the SIGUSR1 dump).

    Raises :class:`SpawnError` with the exit code to report: 127 when the program is
    not found, 126 when it cannot be executed, 125 when the server lacks resources.
    """
    if not argv or not argv[0]:
        # execvp("") fails with ENOENT; CPython refuses it with a ValueError first.
        raise SpawnError("the program name is empty: program not found", EXIT_NOT_FOUND)
    parent_ends, child_ends = _make_pipes()
    name = printable(path or argv[0])
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(child_ends)]
    actions += [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(extra_fds)]
    try:
        with identity or contextlib.nullcontext():
            pid = (os.posix_spawnp if path is None else os.posix_spawn)(
                argv[0] if path is None else path,
                list(argv),
                env,
                file_actions=actions,
                setpgroup=0,
                setsigmask=(),
                setsigdef=_DEFAULT_SIGNALS,
            )
    except BaseException as exc:
        # Whatever fails here, the server's pipe ends go: a refused request must not
        # cost three fds (a few thousand of them would exhaust the limit).
        for fd in parent_ends:
            os.close(fd)
        if isinstance(exc, OSError):
            if exc.errno in _NOT_FOUND_ERRNOS:
                raise SpawnError(f"{name}: program not found", EXIT_NOT_FOUND) from None
            if exc.errno in _RESOURCE_ERRNOS:
                raise SpawnError(f"{name}: cannot spawn: {exc.strerror}", EXIT_REFUSED) from None
            raise SpawnError(
                f"{name}: cannot execute: {exc.strerror}", EXIT_CANNOT_EXECUTE
            ) from None
        if isinstance(exc, ValueError):  # an argument or variable CPython refuses
            raise SpawnError(f"{name}: cannot spawn: {exc}", EXIT_REFUSED) from None
        raise
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
    program_fds = (parent_ends[0], parent_ends[1], parent_ends[2])
    return Program(pid, argv if program_argv is None else program_argv, program_fds)
