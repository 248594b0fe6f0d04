"""Readiness callbacks and deadlines, dispatched by one task (for :mod:`.oneshot`).

A session driven by tasks pays for them in scheduling rounds: a task started per pipe
and per connection, woken once per event, then waking the next. Here one epoll (level
triggered) holds the fds of every one-shot session, and one task waits on it: each
wake-up handles every fd that is ready, in the same round, by calling its callback.

Deadlines are FIFO queues of one delay each (the ``-t`` timeout, ``--drain-timeout``):
entries of one queue are added in the order they expire, so an ordered ``dict`` is
the whole timer (O(1) add, remove and first). The dispatcher's own cancel scope ends
its wait at the earliest one; moving a scope's deadline does not wake its task, so
adding a timer costs no scheduling round.
"""

from __future__ import annotations

import logging
import math
import select
from collections.abc import Callable, Hashable

import trio

log = logging.getLogger("sockexec_py")


class TimerQueue:
    """Callbacks due ``delay`` seconds after they were added (FIFO)."""

    def __init__(self, reactor: Reactor, delay: float) -> None:
        self._reactor = reactor
        self.delay = delay
        self._due: dict[Hashable, tuple[float, Callable[[], None]]] = {}

    def add(self, key: Hashable, callback: Callable[[], None]) -> None:
        deadline = trio.current_time() + self.delay
        self._due.pop(key, None)  # re-adding moves it to the end, where it now belongs
        self._due[key] = (deadline, callback)
        self._reactor.wake_at(deadline)

    def remove(self, key: Hashable) -> None:
        self._due.pop(key, None)

    def first(self) -> float:
        for deadline, _ in self._due.values():
            return deadline
        return math.inf

    def expire(self, now: float) -> None:
        while self._due:
            key = next(iter(self._due))
            deadline, callback = self._due[key]
            if deadline > now:
                return
            del self._due[key]
            _call(callback)


class Reactor:
    """One epoll of readiness callbacks and a few timer queues, dispatched by :meth:`run`.

    Resource handling: :meth:`remove_reader` before the fd is closed (fd numbers are
    reused); :meth:`close` once :meth:`run` has ended.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], None]] = {}
        self._queues: list[TimerQueue] = []
        self._scope: trio.CancelScope | None = None

    def timer_queue(self, delay: float) -> TimerQueue:
        queue = TimerQueue(self, delay)
        self._queues.append(queue)
        return queue

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``fd`` is readable (or at EOF, hang-up, error)."""
        if fd in self._readers:
            self._epoll.modify(fd, select.EPOLLIN)
        else:
            self._epoll.register(fd, select.EPOLLIN)
        self._readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def wake_at(self, deadline: float) -> None:
        scope = self._scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline

    def close(self) -> None:
        self._readers.clear()
        self._epoll.close()

    async def run(self) -> None:
        """Dispatch until cancelled."""
        epoll_fd = self._epoll.fileno()
        while True:
            first = min((queue.first() for queue in self._queues), default=math.inf)
            with trio.CancelScope(deadline=first) as self._scope:
                await trio.lowlevel.wait_readable(epoll_fd)
            self._scope = None
            for fd, _ in self._epoll.poll(0):
                callback = self._readers.get(fd)
                if callback is not None:
                    _call(callback)
            now = trio.current_time()
            for queue in self._queues:
                queue.expire(now)


def _call(callback: Callable[[], None]) -> None:
    """A failing callback is logged, never the end of the dispatcher (and of every
    session it drives)."""
    try:
        callback()
    except Exception:
        log.exception("internal error in a readiness or timer callback")
