"""Admission: the decision, then a place among the programs allowed to run.

A request is decided by the policy (or :data:`~sockexec_py.policy.ALLOW_ALL`), then
waits, in arrival order, at its rule's gate (``max_running``, with a bounded queue:
past it the request is :class:`Denied`), then for one of the server's ``-m`` slots.
What it holds is its :class:`Ticket`, released exactly once: when its program is
reaped, or when its connection ends without a program.

Gates are kept by rule key (kind and name) across policy reloads, and a reload
resizes them, so a reloaded limit counts the programs already running under the old
policy; a request still waiting is decided again under the new one.
"""

from __future__ import annotations

import trio

from sockexec_py.policy import AllowAll, Allowed, Denied, Policy, Rule


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


class Ticket:
    """What one request holds: its rule's gate slot (if the rule has one) and a
    server slot. :meth:`release` gives back whatever was taken, once."""

    __slots__ = (  # many live at once: no __dict__ each
        "_slots", "gate", "slot", "waiting_at"
    )  # fmt: skip

    def __init__(self, slots: trio.Semaphore) -> None:
        self._slots = slots
        self.gate: RuleGate | None = None
        self.slot = False
        #: Where it waits now (for the message when the deadline passes).
        self.waiting_at: tuple[Rule, RuleGate] | None = None

    def release(self) -> None:
        if self.gate is not None:
            gate, self.gate = self.gate, None
            gate.release()
        if self.slot:
            self.slot = False
            self._slots.release()


class Admission:
    """Decides requests and holds them until they may run (see the module docstring).

    Args:
        max_running: the server's ``-m``: programs running at once.
        policy: the policy file's rules, or :data:`~sockexec_py.policy.ALLOW_ALL`.
    """

    def __init__(self, max_running: int, policy: Policy | AllowAll) -> None:
        self.max_running = max_running
        self.policy = policy
        self._slots = trio.Semaphore(max_running)
        self._gates: dict[str, RuleGate] = {}

    def ticket(self) -> Ticket:
        return Ticket(self._slots)

    async def admit(
        self, ticket: Ticket, argv: tuple[bytes, ...], peer_uid: int, peer_gid: int
    ) -> Allowed | Denied:
        """Decide ``argv`` for this peer, then wait for a place to run (FIFO).

        Returns the decision; an :class:`Allowed` once ``ticket`` holds its places.
        A request waiting in its rule's queue when the policy is reloaded is decided
        again under the new policy. Cancellation (the ``-t`` deadline, a hang-up)
        leaves ``ticket`` holding what it took so far: release it.
        """
        verdict = await self._pass_gate(ticket, argv, peer_uid, peer_gid)
        if isinstance(verdict, Denied):
            return verdict
        try:
            self._slots.acquire_nowait()  # the common case: no scheduling round
        except trio.WouldBlock:
            await self._slots.acquire()
        ticket.slot = True
        return verdict

    def admit_nowait(
        self, ticket: Ticket, argv: tuple[bytes, ...], peer_uid: int, peer_gid: int
    ) -> Allowed | None:
        """:meth:`admit` when it needs no wait and allows: the common request (no
        rule limit, a free slot). None, with nothing taken, for anything else: the
        caller goes the usual way (and :meth:`admit` decides again)."""
        verdict = self.policy.decide(argv, peer_uid, peer_gid)
        if not isinstance(verdict, Allowed) or verdict.rule.max_running is not None:
            return None
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return None
        ticket.slot = True
        return verdict

    async def _pass_gate(
        self, ticket: Ticket, argv: tuple[bytes, ...], peer_uid: int, peer_gid: int
    ) -> Allowed | Denied:
        while True:
            policy = self.policy
            verdict = policy.decide(argv, peer_uid, peer_gid)
            if isinstance(verdict, Denied):
                return verdict
            gate = self._gate(verdict.rule)
            if ticket.gate is not None and ticket.gate is not gate:
                ticket.gate.release()  # a reload moved the request to another rule
                ticket.gate = None
            if gate is None or ticket.gate is gate:
                return verdict
            ticket.waiting_at = (verdict.rule, gate)
            try:
                await gate.acquire()
            except QueueFull as exc:
                return Denied(f"queue full for {verdict.rule.label} ({exc})", by_policy=False)
            ticket.waiting_at = None
            ticket.gate = gate
            if self.policy is policy:
                return verdict

    def waiting_for(self, ticket: Ticket) -> str:
        """What a request still waits for, in words: its rule's queue or a slot."""
        if ticket.waiting_at is not None:
            rule, gate = ticket.waiting_at
            return f"in the queue of {rule.label} ({gate.running} of {gate.max_running} running)"
        return f"for a free slot ({self.max_running} programs running)"

    def _gate(self, rule: Rule) -> RuleGate | None:
        if rule.max_running is None:
            return None
        gate = self._gates.get(rule.key)
        if gate is None:
            gate = self._gates[rule.key] = RuleGate(rule.max_running, rule.max_queue)
        return gate

    def reload(self, policy: Policy) -> None:
        """A new policy: new limits apply to the gates in place; gates of rules that lost
        their limit let their waiters through (to be decided again) and go."""
        self.policy = policy
        limited = {r.key: r for r in policy.rules if r.max_running is not None}
        for key, gate in list(self._gates.items()):
            rule = limited.get(key)
            if rule is not None:
                assert rule.max_running is not None
                gate.resize(rule.max_running, rule.max_queue)
            else:
                gate.resize(gate.running + gate.waiting, None)
                if gate.idle:
                    del self._gates[key]
