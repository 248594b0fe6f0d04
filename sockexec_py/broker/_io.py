"""Non-blocking syscalls on raw fds and sockets, awaited the trio way.

The server drives plain file descriptors itself instead of trio's stream wrappers so
that it controls exactly when a syscall happens: whole pairs in each ``sendmsg``, and
the final pair followed by ``close`` with no scheduling point in between (SPEC §3).
Each helper tries the syscall first and only waits when the kernel says EAGAIN.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence

import trio

_UCRED = struct.Struct("3i")

# Errors meaning the other end is gone: the write side is broken for good.
BROKEN_ERRORS = (BrokenPipeError, ConnectionResetError)
# At most this many buffers per writev/sendmsg (Linux's IOV_MAX is 1024).
_IOV_MAX = 1024
#: Reads smaller than this are copied out of the pool's buffer (see read_pooled).
COPY_BELOW = 32 * 1024


class BufferPool:
    """Reusable read buffers, so a stream of large reads allocates nothing.

    A fresh 256 KiB ``bytes`` per read costs an allocation (often an ``mmap``), its
    page faults and a free. Buffers are taken for one read-and-send and given back;
    at most ``keep`` idle buffers stay, so memory follows the connections that are
    actually moving data.
    """

    def __init__(self, size: int, keep: int = 8) -> None:
        self.size = size
        self._keep = keep
        self._idle: list[bytearray] = []

    def take(self) -> bytearray:
        return self._idle.pop() if self._idle else bytearray(self.size)

    def give(self, buffer: bytearray) -> None:
        if len(self._idle) < self._keep:
            self._idle.append(buffer)


#: Pipe and socket reads of every connection go into buffers of this shared pool:
#: as large as an output pair's data times four, for throughput; held only while a
#: large read is being sent on (see :func:`read_pooled`).
BUFFERS = BufferPool(256 * 1024)


async def read_pooled(
    source: int | socket.socket, pool: BufferPool, *, reschedule: bool = True
) -> tuple[bytes | memoryview, bytearray | None]:
    """Read from a non-blocking pipe fd or socket, into a buffer of ``pool``.

    Returns the data (empty at EOF) and the buffer it lies in, which the caller gives
    back once done with the data; or None when the read was small and was copied out
    (the buffer went back at once). So a buffer is held only by a read of at least
    :data:`COPY_BELOW` bytes, never while waiting, and a thousand connections each
    reading a line hold no pool buffer.

    A checkpoint, like any read: a stream that is always ready still lets others run.
    Except at EOF (the reader stops there anyway) and with ``reschedule=False``, where
    data found at once costs no scheduling round (cancellation is still checked).
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    while (read := read_nowait(source, pool)) is None:
        await trio.lowlevel.wait_readable(source)
    if read[0] and reschedule:
        await trio.lowlevel.cancel_shielded_checkpoint()
    return read


def read_nowait(
    source: int | socket.socket, pool: BufferPool
) -> tuple[bytes | memoryview, bytearray | None] | None:
    """:func:`read_pooled` without waiting: None when nothing is there to read yet."""
    buffer = pool.take()
    try:
        # (a closed socket object fails with EBADF, where a bare fd could be reused)
        count = os.readv(source, (buffer,)) if isinstance(source, int) else source.recv_into(buffer)
    except BlockingIOError:
        pool.give(buffer)
        return None
    except BaseException:
        pool.give(buffer)
        raise
    if count < COPY_BELOW:
        with memoryview(buffer) as view:
            data = view[:count].tobytes()
        pool.give(buffer)
        return data, None
    return memoryview(buffer)[:count], buffer


async def write_fd_all(fd: int, chunks: Sequence[bytes | memoryview]) -> None:
    """Write all of ``chunks`` to a non-blocking fd (``writev``), waiting while full.

    Not a checkpoint when the pipe takes everything at once: the caller's read loop
    yields already, and one scheduling round per chunk is what throughput costs.
    Raises BrokenPipeError when the reader has gone away.
    """
    pending = [memoryview(c) for c in chunks if c]
    while pending:
        try:
            written = os.writev(fd, pending[:_IOV_MAX])
        except BlockingIOError:
            written = -1  # (waited for below, not in the except block)
        if written < 0:
            await trio.lowlevel.wait_writable(fd)
            continue
        advance(pending, written)


async def recv(sock: socket.socket, size: int) -> bytes:
    """Receive up to ``size`` bytes from a non-blocking socket; ``b""`` at EOF."""
    await trio.lowlevel.checkpoint_if_cancelled()
    while True:
        try:
            data = sock.recv(size)
        except BlockingIOError:
            data = None  # (waited for below, not in the except block)
        if data is None:
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
            sent = sock.sendmsg(pending[:_IOV_MAX])
        except BlockingIOError:
            break
        advance(pending, sent)
    return pending


def advance(pending: list[memoryview], count: int) -> None:
    """Drop ``count`` bytes from the front of ``pending``, in place."""
    done = 0
    for view in pending:
        if count < len(view):
            break
        count -= len(view)
        done += 1
    del pending[:done]
    if count:
        pending[0] = pending[0][count:]


async def sendmsg_all(sock: socket.socket, buffers: Sequence[bytes | memoryview]) -> None:
    """Send all of ``buffers`` with ``sendmsg``, waiting while the socket is full.

    Not a checkpoint when the socket takes everything at once, so a caller can close
    the socket right after the last byte left, with no scheduling point between.
    """
    pending = sendmsg_nowait(sock, buffers)
    while pending:
        await trio.lowlevel.wait_writable(sock)
        pending = sendmsg_nowait(sock, pending)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer from SO_PEERCRED; -1s where unavailable."""
    so_peercred = getattr(socket, "SO_PEERCRED", None)
    if so_peercred is None:
        return -1, -1, -1
    try:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, so_peercred, _UCRED.size))
    except OSError:
        return -1, -1, -1
    return pid, uid, gid
