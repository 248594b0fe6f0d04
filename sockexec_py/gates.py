"""Per-rule admission: at most ``max_running`` programs of a rule, a bounded queue.

A gate sits in front of the server's global slots (``-m``): a request first passes its
rule's gate, in arrival order, then waits for a global slot. Gates are kept per rule
object; a policy reload makes new rules, so requests admitted under the old policy
finish against the old gates while new requests use the new ones.
"""

from __future__ import annotations

import trio


class QueueFull(Exception):
    """The rule already has ``max_running`` programs and ``max_queue`` waiting."""


class RuleGate:
    """Bounds one rule's running programs (FIFO) and the queue in front of them."""

    def __init__(self, max_running: int, max_queue: int | None) -> None:
        self.max_running = max_running
        self.max_queue = max_queue
        # trio's semaphore hands a released slot to the longest waiter: FIFO.
        self._slots = trio.Semaphore(max_running)
        self.waiting = 0

    @property
    def running(self) -> int:
        return self.max_running - self._slots.value

    async def acquire(self) -> None:
        """Take a slot, waiting in order; QueueFull at once when the queue is full."""
        try:
            self._slots.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        if self.max_queue is not None and self.waiting >= self.max_queue:
            raise QueueFull(f"{self.running} running, {self.waiting} waiting")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self._slots.release()
