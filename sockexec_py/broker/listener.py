"""Creating the listening socket: stale-socket handling, atomic permissions, systemd
socket activation, and readiness notification."""

from __future__ import annotations

import contextlib
import os
import socket
import stat

# First fd passed by systemd socket activation (sd_listen_fds(3)).
_SD_LISTEN_FDS_START = 3


class ListenerError(Exception):
    """The socket cannot be set up; the message is one line for the operator."""


def systemd_listen_fd() -> int | None:
    """The socket fd handed over by systemd (``LISTEN_PID``/``LISTEN_FDS``), if any.

    The variables are removed from the environment so programs do not inherit them.
    """
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None:
        return None
    if pid != str(os.getpid()):
        return None
    try:
        n = int(count)
    except ValueError:
        raise ListenerError(f"LISTEN_FDS is not a number: {count!r}") from None
    if n < 1:
        return None
    if n > 1:
        raise ListenerError(f"systemd passed {n} sockets; exactly one is supported")
    fd = _SD_LISTEN_FDS_START
    problem = _listening_unix_stream_problem(fd)
    if problem:
        raise ListenerError(f"LISTEN_FDS=1 but fd {fd} {problem}")
    return fd


def _listening_unix_stream_problem(fd: int) -> str | None:
    """Why ``fd`` is not a listening Unix stream socket (None when it is one).

    Checked before anything else opens fds: a stale ``LISTEN_FDS`` with nothing on fd 3
    would otherwise let the broker adopt whatever it opens next (its own epoll or
    wake-up socket) and serve nothing, silently.
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return "is not open"
    if not stat.S_ISSOCK(mode):
        return "is not a socket"
    probe = socket.socket(fileno=os.dup(fd))
    try:
        if probe.family != socket.AF_UNIX or probe.type != socket.SOCK_STREAM:
            return "is not a Unix stream socket"
        if not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "is not listening"
    except OSError as exc:
        return f"cannot be checked: {exc.strerror}"
    finally:
        probe.close()
    return None


def open_listener(
    path: str, *, mode: int, backlog: int, inherited: int | None = None
) -> tuple[socket.socket, str | None]:
    """Return a non-blocking listening socket and the path to unlink when done.

    With systemd socket activation the inherited socket (``inherited``, as checked by
    :func:`systemd_listen_fd`) is used as it is (systemd owns its path: nothing to
    unlink). Otherwise ``path`` is created with exactly
    ``mode`` permission bits, set through the umask at ``bind`` time so the socket
    never exists with looser ones.

    Error handling: raises :class:`ListenerError` when a live server already answers
    on ``path``, when ``path`` is not a socket, or when binding fails.
    """
    fd = inherited if inherited is not None else systemd_listen_fd()
    if fd is not None:
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        sock.setblocking(False)
        return sock, None

    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot listen on {path}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock, path


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenerError(f"cannot check {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: a stale socket from a previous run
        return
    except FileNotFoundError:
        return
    except TimeoutError:
        raise ListenerError(f"a server is already listening on {path} (busy)") from None
    except OSError as exc:
        raise ListenerError(f"cannot check {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ListenerError(f"a server is already listening on {path}")


def notify_ready(notify_fd: int | None) -> None:
    """Tell the supervisor we accept connections.

    s6 style: a newline on ``notify_fd`` (then closed); systemd style: ``READY=1`` to
    ``$NOTIFY_SOCKET``. Both are optional.
    """
    if notify_fd is not None:
        with contextlib.suppress(OSError):
            os.write(notify_fd, b"\n")
        with contextlib.suppress(OSError):
            os.close(notify_fd)
    address = os.environ.get("NOTIFY_SOCKET")
    if address:
        if address.startswith("@"):
            address = "\0" + address[1:]
        with (
            contextlib.suppress(OSError),
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
        ):
            notify.sendto(b"READY=1", address)
