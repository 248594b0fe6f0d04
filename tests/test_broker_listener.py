"""The listening socket alone: atomic permissions, stale sockets, live servers and
paths that are not sockets, systemd's inherited socket, readiness."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from sockexec_py.broker.listener import ListenerError, notify_ready, open_listener


def test_socket_is_created_with_exactly_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    old = os.umask(0)
    try:
        sock, unlink = open_listener(str(path), mode=0o640, backlog=5)
    finally:
        os.umask(old)
    with sock:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        assert unlink == str(path) and not sock.getblocking()
        assert os.umask(old) == old  # the umask is restored
        assert not sock.get_inheritable()


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # bound, never listening: nobody answers there
    sock, _ = open_listener(str(path), mode=0o660, backlog=5)
    with sock, pytest.raises(ListenerError, match="already listening"):
        open_listener(str(path), mode=0o660, backlog=5)


def test_a_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("precious")
    with pytest.raises(ListenerError, match="is not a socket; refusing to replace it"):
        open_listener(str(path), mode=0o660, backlog=5)
    assert path.read_text() == "precious"


def test_an_unusable_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ListenerError, match=r"cannot listen on .*: No such file or directory"):
        open_listener(str(tmp_path / "missing" / "s.sock"), mode=0o660, backlog=5)


def test_readiness_newline_on_the_notify_fd() -> None:
    read_end, write_end = os.pipe()
    notify_ready(write_end)
    assert os.read(read_end, 10) == b"\n"
    assert os.read(read_end, 10) == b""  # and the fd is closed
    os.close(read_end)
