"""Run-as rules: a program started as a policy rule's user, groups, directory,
umask and limits.

``posix_spawn`` applies the first four when the broker takes them on itself for the
moment of the spawn (:func:`spawn_as`: a child inherits its parent's credentials,
directory and umask); rlimits take one exec step through util-linux's ``prlimit``,
which sets them on itself and execs the program. Only what neither can do goes
through the exec helper (``_exec_helper.py``, a Python start-up): a limit above the
broker's own hard limit (raising one needs privileges the program must not have),
or a system without ``prlimit``.
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import os
import resource
import shutil
import socket
import sys
from collections.abc import Iterator, Sequence

from sockexec_py.errors import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_REFUSED
from sockexec_py.policy import ExecSpec
from sockexec_py.replies import printable

from . import _io
from .spawn import Program, SpawnError, spawn

log = logging.getLogger("sockexec_py")


def runs_as(spec: ExecSpec) -> bool:
    """Whether ``spec`` sets anything a plain ``posix_spawn`` cannot."""
    return (
        spec.uid is not None
        or spec.gid is not None
        or spec.groups is not None
        or spec.cwd is not None
        or spec.umask is not None
        or bool(spec.rlimits)
    )


_PRLIMIT = shutil.which("prlimit", path="/usr/bin:/bin:/usr/sbin:/sbin")


def needs_helper(spec: ExecSpec) -> bool:
    """Whether only the (slow) exec helper can start ``spec``: a limit above the
    broker's own hard limit, which ``prlimit``, run as the program's user, could not
    raise; or no ``prlimit`` on this system."""
    if not spec.rlimits:
        return False
    if _PRLIMIT is None:
        return True
    for _, number, value in spec.rlimits:
        hard = resource.getrlimit(number)[1]
        if hard != resource.RLIM_INFINITY and (value == resource.RLIM_INFINITY or value > hard):
            return True
    return False


def spawn_as(spec: ExecSpec) -> Program:
    """Start ``spec`` with its user, groups, directory, umask and limits, through
    ``posix_spawn`` (see the module docstring).

    For the moment of the spawn the broker itself takes the program's groups, gid and
    uid (keeping root as its saved ids, to come back), enters the directory as that
    user, and sets the umask; the child inherits all of it, and ``execve`` makes the
    ids final. Everything is restored before this returns; if it cannot be, the
    broker stops at once rather than go on with another identity.

    Error handling: :class:`SpawnError` as :func:`spawn`, and 125 when the directory
    cannot be entered (``changing directory to DIR: reason``).
    """
    path = spec.path
    assert path is not None, "rules that set these always name the program's path"
    argv: Sequence[bytes] = spec.argv
    exec_path = path
    if spec.rlimits:
        assert _PRLIMIT is not None
        limits = [
            f"--{name}={_limit(value)}:{_limit(value)}".encode() for name, _, value in spec.rlimits
        ]
        # prlimit sets them on itself and execs the program by its path (which
        # becomes the program's argv[0]).
        argv = [os.fsencode(_PRLIMIT), *limits, b"--", path, *spec.argv[1:]]
        exec_path = os.fsencode(_PRLIMIT)
    return spawn(
        argv,
        spec.env,
        path=exec_path,
        # With an exec step, a program that cannot run would be found out late.
        identity=_identity_of(spec, check=bool(spec.rlimits)),
        program_argv=spec.argv if spec.rlimits else None,
    )


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def _check_executable(path: bytes) -> None:
    """As the program's user (``access`` checks the real ids, which are theirs now)."""
    name = printable(path)
    if not os.path.exists(path):
        raise SpawnError(f"{name}: program not found", EXIT_NOT_FOUND)
    if not os.access(path, os.X_OK) or os.path.isdir(path):
        raise SpawnError(f"{name}: cannot execute: Permission denied", EXIT_CANNOT_EXECUTE)


_ORIGINAL_CWD = os.getcwd()


@contextlib.contextmanager
def _identity_of(spec: ExecSpec, check: bool) -> Iterator[None]:
    """Take on ``spec``'s groups, gid, uid, directory and umask (and with ``check``,
    make sure its program can be executed as that user); give them back after."""
    uids, gids = os.getresuid(), os.getresgid()
    groups = os.getgroups() if spec.groups is not None else None
    umask = os.umask(spec.umask) if spec.umask is not None else None
    try:
        if spec.groups is not None:
            os.setgroups(spec.groups)
        if spec.gid is not None:
            os.setresgid(spec.gid, spec.gid, -1)
        if spec.uid is not None:
            os.setresuid(spec.uid, spec.uid, -1)
        if spec.cwd is not None:
            try:
                os.chdir(spec.cwd)
            except OSError as exc:
                raise SpawnError(
                    f"changing directory to {spec.cwd}: {exc.strerror}", EXIT_REFUSED
                ) from None
        if check:
            _check_executable(spec.path or b"")
        yield
    finally:
        try:
            os.setresuid(*uids)
            os.setresgid(*gids)
            if groups is not None:
                os.setgroups(groups)
            if spec.cwd is not None:
                os.chdir(_ORIGINAL_CWD)
            if umask is not None:
                os.umask(umask)
        except OSError as exc:  # pragma: no cover - root can always come back
            log.critical("cannot restore the broker's identity (%s): stopping", exc)
            os._exit(111)


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
                "env": dict(spec.env),
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
