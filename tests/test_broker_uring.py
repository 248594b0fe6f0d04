"""The io_uring send-and-close alone, on socketpairs."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from sockexec_py.broker._uring import Ring, open_ring


@pytest.fixture(scope="module")
def ring() -> Ring:
    found = open_ring()
    if found is None:  # a kernel feature (io_uring), not a tool: the broker falls back
        pytest.skip("io_uring is not available on this kernel")
    return found


def test_sends_then_closes_in_one_call(ring: Ring) -> None:
    for _ in range(10):  # the ring is reused call after call
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        fd = ours.detach()
        assert ring.send_and_close(fd, b"8:exitcode,1:0,") == (15, 0)
        with pytest.raises(OSError):
            os.fstat(fd)
        assert theirs.recv(100) == b"8:exitcode,1:0,"
        assert theirs.recv(100) == b""
        theirs.close()


def test_a_failed_send_leaves_the_fd_to_the_caller(ring: Ring) -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    ours.setblocking(False)
    fd = ours.detach()
    assert ring.send_and_close(fd, b"x") == (-errno.EPIPE, -errno.ECANCELED)
    os.fstat(fd)  # still open: not closed behind the caller's back
    os.close(fd)


def test_no_ring_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOCKEXEC_NO_URING", "1")
    assert open_ring() is None
