"""Per-rule admission: at most ``max_running`` programs of a rule, a bounded queue.

A gate sits in front of the server's global slots (``-m``): a request first passes its
rule's gate, in arrival order, then waits for a global slot. Gates are kept by rule
key (kind and name) across policy reloads, and a reload resizes them, so a reloaded
limit counts the programs already running under the old policy.
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
        self.running = 0
        # A released slot is handed to the longest waiter, never grabbed by a newcomer.
        self._waiters = trio.lowlevel.ParkingLot()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def idle(self) -> bool:
        return self.running == 0 and not self._waiters

    async def acquire(self) -> None:
        """Take a slot, waiting in order; QueueFull at once when the queue is full."""
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return
        if self.max_queue is not None and self.waiting >= self.max_queue:
            raise QueueFull(f"{self.running} running, {self.waiting} waiting")
        await self._waiters.park()  # the releaser counted our slot before waking us

    def release(self) -> None:
        self.running -= 1
        self._admit()

    def resize(self, max_running: int, max_queue: int | None) -> None:
        """New limits (a policy reload); waiters are admitted if there is room now."""
        self.max_running, self.max_queue = max_running, max_queue
        self._admit()

    def _admit(self) -> None:
        while self._waiters and self.running < self.max_running:
            self.running += 1
            self._waiters.unpark()
