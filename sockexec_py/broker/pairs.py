"""Writing pairs to a client: each pair whole in one ``sendmsg``, the last one closing.

lua-resty-exec reads the netstring after a type with a 1 ms timeout and fails the
nginx request when a pair arrives in two pieces (SPEC §3). So before each batch of
pairs the send queue is measured (:mod:`.sendqueue`), and where it cannot be, one
pair goes per POLLOUT.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from sockexec_py.events import OutputKind
from sockexec_py.replies import encode_output_pair

from . import _io, sendqueue
from ._uring import Ring, open_ring
from .spool import Spool

# At most this many reads of already-queued input before close (1 MiB); a client
# still sending past that gets its connection reset, as with any closed socket.
_DISCARD_RECVS = 4
_DISCARD_CHUNK = 256 * 1024
# How long a client may leave the socket full before output goes to the spool: a
# client that reads (a stream, a duplex session) makes room within microseconds, and
# its output never touches the disk; lua-resty-exec, writing all of stdin first, does
# not read at all.
SPOOL_AFTER = 0.05


_RING: Ring | bool | None = False  # False: not opened yet


def final_ring() -> Ring | None:
    """The process's ring for the final send, opened at first use (None: no io_uring)."""
    global _RING
    if _RING is False:
        _RING = open_ring()
    return _RING if isinstance(_RING, Ring) else None


def _nothing() -> None:
    pass


_sched_yield = getattr(os, "sched_yield", _nothing)


class PairWriter:
    """The sending side of one client socket.

    Args:
        sock: the connected, non-blocking client socket; the writer closes it.
        before_close: called right before the socket is closed (to drop it from an
            epoll set while its fd number is still ours).
        on_broken: called once when the client turns out to be gone (see below).
        spool: where output goes while the client leaves the socket full (see
            :mod:`.spool`); it is used once :meth:`attach` gave the writer a nursery
            for the task that sends it on.

    Error handling: once a send fails because the client is gone (EPIPE, ECONNRESET)
    :attr:`broken` is set, ``on_broken`` runs once, and further output is dropped.
    Resource handling: :meth:`close` closes the socket and lets go of both callbacks.
    """

    __slots__ = (  # many live at once: no __dict__ each
        "_before_close", "_closing", "_drained", "_on_broken", "_start_soon", "_turn",
        "broken", "bytes_out", "closed", "fd", "room_meter", "sock", "spool"
    )  # fmt: skip

    def __init__(
        self,
        sock: socket.socket,
        *,
        before_close: Callable[[], None] = _nothing,
        on_broken: Callable[[], None] = _nothing,
        spool: Spool | None = None,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.bytes_out = 0
        self.broken = False
        self.closed = False
        self._before_close = before_close
        self._on_broken = on_broken
        #: One sender at a time. A semaphore, not a lock: a task may give back the turn
        #: a callback took (see :meth:`send_output_nowait`).
        self._turn = trio.Semaphore(1, max_value=1)  # a double release raises
        self.room_meter = sendqueue.RoomMeter(sock)
        self._closing = False
        self.spool = spool
        self._start_soon: Callable[[Callable[[], Awaitable[Any]]], None] | None = None
        #: Set once what is spooled has gone out; None while nothing ever was.
        self._drained: trio.Event | None = None

    def attach(self, start_soon: Callable[[Callable[[], Awaitable[Any]]], None]) -> None:
        """Allow spooling; the task that sends the spool on starts with ``start_soon``."""
        self._start_soon = start_soon

    @property
    def usable(self) -> bool:
        return not (self.broken or self.closed)

    async def send_output(self, kind: OutputKind, data: bytes | memoryview) -> None:
        """Send ``data`` as output pairs of at most 64 KiB; dropped once unusable.

        Every pair leaves whole in one ``sendmsg``, several pairs in the same call when
        the socket is known to have room for all of them; the turn keeps two callers'
        pairs from interleaving. A ``data`` that fits the socket now costs no
        scheduling round.
        """
        if not self.usable:
            return
        await self._acquire()
        try:
            await self._send_pairs(kind, data)
        except _io.BROKEN_ERRORS:
            self._broke()
        finally:
            self._turn.release()

    async def send_final(self, data: bytes) -> None:
        """Send the last bytes of the session and close the socket in the same step.

        lua-resty-exec waits about 1 ms for the close after the exit pair (a later
        close is its fatal ``timeout``). The send wakes the client, which takes the
        CPU as soon as the broker returns to user space on a busy machine, and
        whatever stands between the send and ``close(2)`` then waits for
        milliseconds. So everything closing does is done first, room for the bytes
        is made sure of, the CPU is offered to what is runnable (``sched_yield``:
        the broker is next in line after it), and then the send and the close happen
        in one system call (an io_uring SEND linked to a CLOSE, :mod:`._uring`) —
        or, where io_uring is not available, ``sendmsg`` and ``close(2)`` back to
        back. Measured with lua-resty-exec through nginx (issue 18), 10,000 requests
        each: 0.40% late closes with the ring alone, 0.14 to 0.18% with the yield alone,
        0.07% with both.
        """
        if self.usable:
            drained = self._drained
            if drained is not None and not drained.is_set():
                await drained.wait()  # what was spooled goes out before the end
            await self._acquire()
            try:
                if self.usable:  # (closed meanwhile: a cut; nothing more goes out)
                    if not self.room_meter.fits(len(data)):  # POLLOUT: a short pair fits
                        await trio.lowlevel.wait_writable(self.sock)
                    self._send_final_now(data)
            except trio.ClosedResourceError:
                pass  # closed while it waited for room: the same
            finally:
                self._turn.release()
        self.close()

    def send_final_nowait(self, data: bytes) -> bool:
        """:meth:`send_final` if it can be done without waiting (nothing spooled or
        being sent, room for ``data``); False, with nothing done, if not."""
        if self.usable:
            drained = self._drained
            busy = (drained is not None and not drained.is_set()) or self._turn.value == 0
            if busy or not self.room_meter.fits(len(data)):
                return False
            self._send_final_now(data)
        self.close()
        return True

    def _send_final_now(self, data: bytes) -> None:
        try:
            self._prepare_close()
            _sched_yield()
            ring = final_ring()
            if ring is not None:
                self._send_and_close(ring, data)
            else:
                sendqueue.send_rest(self.fd, _io.sendmsg_nowait(self.sock, [data]))
        except (*_io.BROKEN_ERRORS, TimeoutError):  # (TimeoutError: stalled, as if gone)
            self._broke()
        else:
            self.bytes_out += len(data)

    def send_output_nowait(self, kind: OutputKind, data: bytes | memoryview) -> bool:
        """:meth:`send_output` if the socket has room for all of ``data`` now and
        nothing else is being sent or spooled; False, with nothing sent, if not."""
        if not self.usable:
            return True  # dropped, as send_output would
        start_soon = self._start_soon
        if (
            start_soon is None
            or self._turn.value == 0
            or (self.spool is not None and self.spool.pending)
        ):
            return False
        room = self.room_meter.room()
        batch = (
            None
            if room is None
            else sendqueue.pairs_within(kind, data, self.room_meter.chunk_limit(), room)
        )
        if batch is None:
            return False
        try:
            pending = _io.sendmsg_nowait(self.sock, batch)
        except _io.BROKEN_ERRORS:
            self._broke()
            return True
        self.bytes_out += len(data)
        if pending:  # not expected (the room was measured): a task sends the rest in turn
            self._turn.acquire_nowait()
            start_soon(functools.partial(self._send_rest, pending))
        return True

    async def _send_rest(self, pending: list[memoryview]) -> None:
        """Send what :meth:`send_output_nowait` could not, then give back its turn."""
        try:
            if self.usable:
                await _io.sendmsg_all(self.sock, pending)
        except (trio.ClosedResourceError, OSError):  # (a task of the server: never raises)
            if not self.closed:  # closed meanwhile: the session ended; else gone
                self._broke()
        finally:
            self._turn.release()

    def _send_and_close(self, ring: Ring, data: bytes) -> None:
        """The io_uring way (see :meth:`send_final`); raises what ``sendmsg`` would."""
        self.closed = True
        fd = self.sock.detach()
        sent, closed = ring.send_and_close(fd, data)
        if closed == 0:
            return
        # The link broke (not expected: the room was made sure of); the fd is ours.
        try:
            if sent < 0:
                raise OSError(-sent, os.strerror(-sent))
            sendqueue.send_rest(fd, [memoryview(data)[sent:]])
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the socket (idempotent); tasks blocked on it get ClosedResourceError.

        The owner's callbacks are let go of: they refer back to the owner (the
        connection holds this writer), and a cycle left behind by every session made
        the collector run every ~15 sessions (about 0.2 ms each, in the round trip).
        """
        if not self.closed:
            self._prepare_close()
            self.closed = True
            self.sock.close()
        self._before_close = self._on_broken = _nothing

    def _prepare_close(self) -> None:
        """All that closing does besides ``close(2)`` (once)."""
        if self._closing:
            return
        self._closing = True
        self._before_close()
        if self.spool is not None:
            self.spool.close()
        self._discard_unread()
        trio.lowlevel.notify_closing(self.sock)

    async def _acquire(self) -> None:
        try:
            self._turn.acquire_nowait()  # `async with` would cost a scheduling round
        except trio.WouldBlock:  # the other pump is finishing its pairs
            await self._turn.acquire()

    def _broke(self) -> None:
        if not self.broken:
            self.broken = True
            self._on_broken()

    async def _send_pairs(self, kind: OutputKind, data: bytes | memoryview) -> None:
        view = memoryview(data)
        total = len(view)
        offset = 0
        chunk = self.room_meter.chunk_limit()
        while offset < total and self.usable:
            spool = self.spool if self._start_soon is not None else None
            if spool is not None and spool.pending:
                # Behind what is spooled already: order is kept.
                if self._spill(spool, kind, view[offset:], chunk):
                    return
                await self._wait_drained()  # past the caps: as without a spool
                continue
            room = self.room_meter.room()
            batch: list[bytes | memoryview] = []
            start = offset
            while offset < total:
                end = min(offset + chunk, total)
                cost = sendqueue.footprint(end - offset)
                if room is None:
                    # The queue cannot be measured here: one pair per POLLOUT, which
                    # guarantees it fits (at most 1/4 of the buffer is in use then).
                    if batch or not self.room_meter.writable():
                        break
                elif cost > room:
                    break
                else:
                    room -= cost
                batch += encode_output_pair(kind, view[offset:end])
                offset = end
            if not batch:
                if spool is not None and not spool.failed:
                    with trio.move_on_after(SPOOL_AFTER) as waited:
                        await trio.lowlevel.wait_writable(self.sock)
                    if not waited.cancelled_caught:
                        continue  # the client made room in time
                    if self._spill(spool, kind, view[offset:], chunk):
                        return
                # The reader has to make room first: POLLOUT once 3/4 of it is free.
                await trio.lowlevel.wait_writable(self.sock)
                end = min(offset + chunk, total)
                room = self.room_meter.room()
                if room is not None and sendqueue.footprint(end - offset) <= room:
                    continue
                # Unmeasured, or a buffer smaller than our pessimistic estimate wants:
                # one pair, which POLLOUT alone guarantees to fit.
                batch = list(encode_output_pair(kind, view[offset:end]))
                offset = end
            pending = _io.sendmsg_nowait(self.sock, batch)
            if pending:  # not expected: the room was measured
                await _io.sendmsg_all(self.sock, pending)
            self.bytes_out += offset - start

    def _spill(self, spool: Spool, kind: OutputKind, view: memoryview, chunk: int) -> bool:
        """Append ``view`` to the spool as pairs; start sending the spool on if needed."""
        pairs: list[bytes | memoryview] = []
        for offset in range(0, len(view), chunk):
            pairs += encode_output_pair(kind, view[offset : offset + chunk])
        if not spool.append(pairs):
            return False
        self.bytes_out += len(view)
        if self._drained is None or self._drained.is_set():
            self._drained = trio.Event()
            assert self._start_soon is not None
            self._start_soon(self._drain)
        return True

    async def _wait_drained(self) -> None:
        """Wait, without the turn, for the spool to be sent on (the drain task needs
        no turn: nothing else sends while the spool holds data). The turn is taken
        back even when cancelled, for the caller gives it back: while the spool holds
        data, whoever has it only spills or waits here, so it comes back at once."""
        self._turn.release()
        try:
            if self._drained is not None:
                await self._drained.wait()
        finally:
            with trio.CancelScope(shield=True):
                await self._acquire()

    async def _drain(self) -> None:
        """Send the spool on, whole pairs at a time, as the client makes room."""
        spool = self.spool
        assert spool is not None
        buffer = _io.BUFFERS.take()
        try:
            while spool.pending and self.usable:
                await trio.lowlevel.wait_writable(self.sock)
                data = spool.read_into(buffer)
                size = sendqueue.whole_pairs(data, self.room_meter.room())
                assert size, "the spool is read from a pair boundary, in whole pairs"
                pending = _io.sendmsg_nowait(self.sock, [data[:size]])
                if pending:  # not expected: the room was measured
                    await _io.sendmsg_all(self.sock, pending)
                spool.consume(size)
        except _io.BROKEN_ERRORS:
            self._broke()
        finally:
            _io.BUFFERS.give(buffer)
            assert self._drained is not None
            self._drained.set()

    def _discard_unread(self) -> None:
        """Read away input already queued (stdin a program never took, bytes after a
        refused request): closing over unread data makes the kernel reset the
        connection, and the client then sees ECONNRESET after our reply, not EOF."""
        with contextlib.suppress(OSError):
            for _ in range(_DISCARD_RECVS):
                if not self.sock.recv(_DISCARD_CHUNK, socket.MSG_DONTWAIT):
                    return
