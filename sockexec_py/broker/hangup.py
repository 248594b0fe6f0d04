"""Noticing that a client hung up, even while nothing is read from or written to it.

A client that closes its socket while its program prints nothing must still have the
program terminated (SPEC §6), and a half-close (``shutdown(SHUT_WR)``, what ``socat``
does at the end of its input) must *not* count. Linux tells the two apart: a full
close raises ``EPOLLHUP`` on our end, a half-close only ``EPOLLRDHUP``. One epoll
instance with an empty event mask (HUP and ERR are always reported) watches every
client socket, and trio waits on that single fd.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Callable

import trio

_FALLBACK_POLL_INTERVAL = 0.25
log = logging.getLogger("sockexec_py")


class HangupMonitor:
    """Calls a callback once when a watched socket's peer has fully closed
    (and, on request, once when it has input: :meth:`watch_input`).

    Resource handling: :meth:`unwatch` must be called before the socket is closed
    (fd numbers are reused). :meth:`run` is the task that dispatches callbacks.
    """

    def __init__(self) -> None:
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._on_input: dict[int, Callable[[], None]] = {}
        self._epoll = select.epoll() if hasattr(select, "epoll") else None

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self._callbacks[fd] = callback
        if self._epoll is not None:
            self._epoll.register(fd, 0)

    def watch_input(self, fd: int, callback: Callable[[], None]) -> bool:
        """Also call ``callback`` once when a watched socket has input (or EOF).

        Lets a connection whose client sent everything it had start its stdin task
        only if more arrives, instead of keeping a task waiting on every socket.
        False where this cannot be done (no epoll): the caller waits itself.
        """
        if self._epoll is None or fd not in self._callbacks:
            return False
        self._on_input[fd] = callback
        self._epoll.modify(fd, select.EPOLLIN)
        return True

    def unwatch_input(self, fd: int) -> None:
        """Forget the input callback of :meth:`watch_input` (the hang-up watch stays)."""
        if self._on_input.pop(fd, None) is not None and self._epoll is not None:
            self._epoll.modify(fd, 0)

    def unwatch(self, fd: int) -> None:
        self._on_input.pop(fd, None)
        if self._callbacks.pop(fd, None) is not None and self._epoll is not None:
            self._epoll.unregister(fd)

    def close(self) -> None:
        self._callbacks.clear()
        if self._epoll is not None:
            self._epoll.close()

    async def run(self) -> None:
        """Dispatch hang-ups until cancelled."""
        if self._epoll is None:
            await self._run_portable()
            return
        while True:
            await trio.lowlevel.wait_readable(self._epoll.fileno())
            for fd, events in self._epoll.poll(0):
                if events & (select.EPOLLHUP | select.EPOLLERR):
                    self._fire(fd)
                elif (callback := self._on_input.pop(fd, None)) is not None:
                    self._epoll.modify(fd, 0)
                    _call(callback)

    def _fire(self, fd: int) -> None:
        callback = self._callbacks.get(fd)
        if callback is not None:
            self.unwatch(fd)
            _call(callback)

    async def _run_portable(self) -> None:
        # Without epoll, poll(2) reports POLLHUP the same way; check periodically.
        while True:
            await trio.sleep(_FALLBACK_POLL_INTERVAL)
            poller = select.poll()
            for fd in self._callbacks:
                poller.register(fd, 0)
            for fd, events in poller.poll(0):
                if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    self._fire(fd)


def _call(callback: Callable[[], None]) -> None:
    """Run a callback; a failing one is logged, never the end of the monitor (and of
    every connection it watches)."""
    try:
        callback()
    except Exception:
        log.exception("internal error in a hang-up or input callback")
