"""Sending the last bytes of a session and closing its socket in ONE system call, through
a tiny io_uring (Linux): a SEND linked to a CLOSE, submitted and awaited by the same
``io_uring_enter``.

Why: the ``sendmsg`` of the exit pair wakes the client, and on a busy machine the
woken process takes the CPU when the broker returns to user space, before its
``close(2)``: lua-resty-exec waits only about 1 ms for that close (SPEC §3). Inside
one system call the close is done before the return to user space, where the
scheduler would switch. ctypes only; where io_uring is missing or refused (seccomp,
``kernel.io_uring_disabled``, an old kernel) :func:`open_ring` returns None and the
caller sends and closes as usual.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct

_SYS = {"x86_64": (425, 426), "aarch64": (425, 426)}  # io_uring_setup, io_uring_enter
_IORING_OFF_SQ_RING = 0
_IORING_OFF_SQES = 0x10000000
_IORING_FEAT_SINGLE_MMAP = 1 << 0
_IORING_ENTER_GETEVENTS = 1 << 0
_IORING_OP_SEND = 26
_IORING_OP_CLOSE = 19
_IOSQE_IO_LINK = 1 << 2
_MAP_POPULATE = 0x8000
_MSG_DONTWAIT = 0x40
_MSG_NOSIGNAL = 0x4000
_ENTRIES = 4
_SQE = struct.Struct("=BBHiQQIIQHHiQQ")  # 64 bytes
_CQE = struct.Struct("=QiI")  # 16 bytes
_U32 = struct.Struct("=I")  # the rings' head and tail fields and the SQ index array


class _Params(ctypes.Structure):
    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", ctypes.c_uint32 * 10),  # head tail mask entries flags dropped array ...
        ("cq_off", ctypes.c_uint32 * 10),  # head tail mask entries overflow cqes flags ...
    ]


class Ring:
    """One ring of the broker, used from the trio thread only (one call at a time)."""

    def __init__(self, fd: int, params: _Params, libc: ctypes.CDLL, enter: int) -> None:
        self._fd = fd
        self._libc = libc
        self._enter = enter
        sq_off, cq_off = list(params.sq_off), list(params.cq_off)
        ring_size = max(
            sq_off[6] + params.sq_entries * 4,  # the SQ index array
            cq_off[5] + params.cq_entries * _CQE.size,  # the CQEs
        )
        self._ring = _map(libc, fd, ring_size, _IORING_OFF_SQ_RING)
        self._sqes = _map(libc, fd, params.sq_entries * _SQE.size, _IORING_OFF_SQES)
        self._sq = sq_off
        self._cq = cq_off
        self._sq_mask = params.sq_entries - 1
        self._cq_mask = params.cq_entries - 1

    def send_and_close(self, fd: int, data: bytes) -> tuple[int, int]:
        """Send ``data`` on socket ``fd``, then close ``fd``, in one system call.

        Returns the results: bytes sent (or -errno) and 0 (or -errno) for the close;
        a close that was not done (the send fell short: the link is broken) is
        ``-ECANCELED``, and the caller still owns ``fd`` then. The kernel reads
        ``data``'s own buffer (no copy): the call holds it until the send is done.
        """
        ring, sqes, sq, mask = self._ring, self._sqes, self._sq, self._sq_mask
        address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
        tail = _U32.unpack_from(ring, sq[1])[0]
        send, close = tail & mask, (tail + 1) & mask
        flags = _MSG_DONTWAIT | _MSG_NOSIGNAL
        _SQE.pack_into(
            sqes, send * _SQE.size, _IORING_OP_SEND, _IOSQE_IO_LINK, 0, fd, 0, address,
            len(data), flags, 1, 0, 0, 0, 0, 0,
        )  # fmt: skip
        _SQE.pack_into(
            sqes, close * _SQE.size, _IORING_OP_CLOSE, 0, 0, fd, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0
        )
        _U32.pack_into(ring, sq[6] + send * 4, send)
        _U32.pack_into(ring, sq[6] + close * 4, close)
        _U32.pack_into(ring, sq[1], tail + 2)  # publish both at once
        done = self._libc.syscall(self._enter, self._fd, 2, 2, _IORING_ENTER_GETEVENTS, None, 0)
        if done < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        results = [0, -125, -125]  # by user_data; -ECANCELED unless completed
        cq = self._cq
        head = _U32.unpack_from(ring, cq[0])[0]
        cq_tail = _U32.unpack_from(ring, cq[1])[0]
        while head != cq_tail:
            user_data, res, _ = _CQE.unpack_from(ring, cq[5] + (head & self._cq_mask) * _CQE.size)
            if 0 < user_data < 3:
                results[user_data] = res
            head += 1
        _U32.pack_into(ring, cq[0], head)
        return results[1], results[2]


def _map(libc: ctypes.CDLL, fd: int, size: int, offset: int) -> memoryview:
    """Map part of the ring (libc's mmap: Python's mmap module keeps a dup of the fd)."""
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    address = libc.mmap(
        None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_POPULATE, fd, offset
    )
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "cannot map the io_uring")
    return memoryview((ctypes.c_char * size).from_address(address)).cast("B")


def open_ring() -> Ring | None:
    """A ring for :meth:`Ring.send_and_close`, or None where io_uring cannot be used."""
    numbers = _SYS.get(platform.machine())
    if numbers is None or os.environ.get("SOCKEXEC_NO_URING"):
        return None
    setup, enter = numbers
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        params = _Params()
        fd = libc.syscall(setup, _ENTRIES, ctypes.byref(params))
        if fd < 0:
            return None
        os.set_inheritable(fd, False)
        if not params.features & _IORING_FEAT_SINGLE_MMAP:
            os.close(fd)
            return None
        try:
            return Ring(fd, params, libc, enter)
        except OSError:
            os.close(fd)
            return None
    except (OSError, AttributeError, ValueError):
        return None
