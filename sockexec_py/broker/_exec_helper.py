"""Exec helper: set up what ``posix_spawn`` cannot, then exec the program.

Run by the broker as ``python -I -S _exec_helper.py`` (no site, no environment
influence, builtin modules only) for policy rules that need rlimits, a umask, another
user or group, or a working directory. The broker spawns it in the program's new
process group with default signals and pipes on 0/1/2, and a socket on fd 3 over
which it sends the spec (a ``marshal`` dict, then EOF). Right before ``execve`` the
helper writes ``X``; fd 3 then closes at exec (close-on-exec). On failure it writes
``"<exitcode> <reason>"`` there and exits with that code, so the broker reports it like
a failed spawn; a helper that dies without writing ``X`` failed too.

Order matters: rlimits other than the address space first (raising a hard limit needs
root), then umask, groups, gid, uid, the directory (entered as the new user), and the
address-space limit last, as the helper itself still allocates until exec.
"""

import errno
import marshal
import os
import resource
import signal
import sys

_STATUS_FD = 3
_NOT_FOUND = (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP)


def _fail(code: int, reason: str) -> None:
    try:
        os.write(_STATUS_FD, f"{code} {reason}".encode("utf-8", "backslashreplace"))
    finally:
        os._exit(code)


def _read_spec() -> dict:  # type: ignore[type-arg]
    chunks = []
    while chunk := os.read(_STATUS_FD, 1 << 16):
        chunks.append(chunk)
    spec = marshal.loads(b"".join(chunks))
    assert isinstance(spec, dict)
    return spec


def main() -> None:
    os.set_inheritable(_STATUS_FD, False)
    spec = _read_spec()
    step = "setting up"
    try:
        late_limits = []
        for name, number, value in spec["rlimits"]:
            step = f"setting rlimit {name}"
            if number == resource.RLIMIT_AS:
                late_limits.append((number, value))
            else:
                resource.setrlimit(number, (value, value))
        if spec["umask"] is not None:
            os.umask(spec["umask"])
        if spec["groups"] is not None:
            step = "setting supplementary groups"
            os.setgroups(spec["groups"])
        if spec["gid"] is not None:
            step = f"switching to gid {spec['gid']}"
            os.setresgid(spec["gid"], spec["gid"], spec["gid"])
        if spec["uid"] is not None:
            step = f"switching to uid {spec['uid']}"
            os.setresuid(spec["uid"], spec["uid"], spec["uid"])
        if spec["cwd"] is not None:
            step = f"changing directory to {spec['cwd']}"
            os.chdir(spec["cwd"])
        # Python ignores these at startup; an ignored signal stays ignored across exec.
        for signum in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(signum, signal.SIG_DFL)
        for number, value in late_limits:
            step = "setting rlimit as"
            resource.setrlimit(number, (value, value))
    except BaseException as exc:
        _fail(125, f"{step}: {exc.strerror if isinstance(exc, OSError) else repr(exc)}")
    name = spec["path"].decode("utf-8", "backslashreplace")
    try:
        os.write(_STATUS_FD, b"X")
        os.execve(spec["path"], spec["argv"], spec["env"])
    except OSError as exc:
        if exc.errno in _NOT_FOUND:
            _fail(127, f"{name}: program not found")
        _fail(126, f"{name}: cannot execute: {exc.strerror}")
    except BaseException as exc:
        _fail(126, f"{name}: cannot execute: {exc!r}")


if __name__ == "__main__":
    main()
    sys.exit(0)  # pragma: no cover - main() either execs or exits
