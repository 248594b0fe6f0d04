"""Non-blocking syscalls on raw fds and sockets, awaited the trio way.

The server drives plain file descriptors itself instead of trio's stream wrappers so
that it controls exactly when a syscall happens: one ``sendmsg`` per pair, and the
final pair followed by ``close`` with no scheduling point in between (SPEC §3).
Each helper tries the syscall first and only waits when the kernel says EAGAIN.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

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

    Raises BrokenPipeError when the reader has gone away.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        view = view[written:]
    await trio.lowlevel.cancel_shielded_checkpoint()


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


async def sendmsg_all(
    sock: socket.socket, buffers: Sequence[bytes], *, final: bool = False
) -> None:
    """Send ``buffers`` as one message with ``sendmsg``, finishing a partial send.

    With ``final=True`` there is no scheduling point after the last syscall, so the
    caller can close the socket in the same step.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    pending = [memoryview(b) for b in buffers if b]
    while pending:
        try:
            sent = sock.sendmsg(pending)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        while sent:
            head = pending[0]
            if sent >= len(head):
                sent -= len(head)
                pending.pop(0)
            else:
                pending[0] = head[sent:]
                sent = 0
    if not final:
        await trio.lowlevel.cancel_shielded_checkpoint()
