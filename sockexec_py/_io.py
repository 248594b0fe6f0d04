"""Non-blocking syscalls on raw fds and sockets, awaited the trio way.

The server drives plain file descriptors itself instead of trio's stream wrappers so
that it controls exactly when a syscall happens: one ``sendmsg`` per pair, and the
final pair followed by ``close`` with no scheduling point in between (SPEC §3).
Each helper tries the syscall first and only waits when the kernel says EAGAIN.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Sequence

import trio

# Errors meaning the other end is gone: the write side is broken for good.
BROKEN_ERRORS = (BrokenPipeError, ConnectionResetError)


async def read_fd(fd: int, size: int) -> bytes:
    """Read up to ``size`` bytes from a non-blocking fd; ``b""`` at EOF."""
    await trio.lowlevel.checkpoint_if_cancelled()
    while True:
        try:
            data = os.read(fd, size)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            continue
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data


async def write_fd_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to a non-blocking fd, waiting while the pipe is full.

    Not a checkpoint when the pipe takes everything at once: the caller's read loop
    yields already, and one scheduling round per chunk is what throughput costs.
    Raises BrokenPipeError when the reader has gone away.
    """
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        view = view[written:]


async def recv(sock: socket.socket, size: int) -> bytes:
    """Receive up to ``size`` bytes from a non-blocking socket; ``b""`` at EOF."""
    await trio.lowlevel.checkpoint_if_cancelled()
    while True:
        try:
            data = sock.recv(size)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data


def sendmsg_nowait(sock: socket.socket, buffers: Sequence[bytes | memoryview]) -> list[memoryview]:
    """Send as much of ``buffers`` as the socket takes now, as one message.

    Returns what is left (empty when all went out). Raises what ``sendmsg`` raises
    besides EAGAIN (BrokenPipeError, ConnectionResetError when the peer is gone).
    """
    pending = [memoryview(b) for b in buffers if b]
    while pending:
        try:
            sent = sock.sendmsg(pending)
        except BlockingIOError:
            break
        while sent:
            head = pending[0]
            if sent >= len(head):
                sent -= len(head)
                pending.pop(0)
            else:
                pending[0] = head[sent:]
                sent = 0
    return pending


async def sendmsg_all(sock: socket.socket, buffers: Sequence[bytes | memoryview]) -> None:
    """Send all of ``buffers`` with ``sendmsg``, waiting while the socket is full.

    Not a checkpoint when the socket takes everything at once, so a caller can close
    the socket right after the last byte left, with no scheduling point between.
    """
    pending = sendmsg_nowait(sock, buffers)
    while pending:
        await trio.lowlevel.wait_writable(sock)
        pending = sendmsg_nowait(sock, pending)


@contextlib.contextmanager
def single_errors() -> Iterator[None]:
    """Re-raise a nursery's lone exception as itself, not in an ExceptionGroup.

    trio wraps every error that leaves a nursery in a group; callers of our APIs
    expect ``except ProtocolError`` (or HTTPError, Timeout…) to work. A group of
    several errors is left as it is.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group
        raise
