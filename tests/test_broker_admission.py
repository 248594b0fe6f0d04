"""Admission alone: decisions, rule gates (FIFO, bounded queue), the -m slots, tickets
released once, and reloads that resize gates and decide waiting requests again."""

from __future__ import annotations

import tomllib

import pytest
import trio
import trio.testing

from sockexec_py.broker.admission import Admission, QueueFull, RuleGate, Ticket
from sockexec_py.policy import ALLOW_ALL, Allowed, Denied, Policy, parse_policy

LIMITED = '[[allow]]\nname = "sh"\nprogram = "sh"\nmax_running = 1\nmax_queue = 1\n'


def policy(text: str) -> Policy:
    return parse_policy(tomllib.loads(text), source="p.toml", euid=0, base_env={})


async def test_gate_admits_in_order_and_refuses_past_its_queue() -> None:
    gate = RuleGate(max_running=1, max_queue=2)
    await gate.acquire()
    order: list[int] = []

    async def wait(n: int) -> None:
        await gate.acquire()
        order.append(n)

    async with trio.open_nursery() as nursery:
        for n in (1, 2):
            nursery.start_soon(wait, n)
            await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(QueueFull, match="1 running, 2 waiting"):
            await gate.acquire()
        gate.release()
        await trio.testing.wait_all_tasks_blocked()
        assert order == [1] and gate.running == 1
        gate.release()
    assert order == [1, 2]
    gate.release()
    assert gate.idle


async def test_allow_all_admits_at_once_within_the_slots() -> None:
    admission = Admission(max_running=1, policy=ALLOW_ALL)
    first = admission.ticket()
    verdict = await admission.admit(first, (b"true",), 1000, 1000)
    assert isinstance(verdict, Allowed)
    assert verdict.spec.path is None and verdict.spec.argv == (b"true",)
    second = admission.ticket()
    verdicts: list[Allowed | Denied] = []

    async def admit_second() -> None:
        verdicts.append(await admission.admit(second, (b"true",), 1000, 1000))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(admit_second)
        await trio.testing.wait_all_tasks_blocked()
        assert verdicts == []  # -m 1 is taken: it waits
        assert admission.waiting_for(second) == "for a free slot (1 programs running)"
        first.release()
        first.release()  # once only: a second release gives nothing back
    assert isinstance(verdicts[0], Allowed) and second.slot
    third = admission.ticket()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(admission.admit, third, (b"true",), 1000, 1000)
        await trio.testing.wait_all_tasks_blocked()
        assert not third.slot  # the double release did not make a second slot
        nursery.cancel_scope.cancel()


async def test_a_full_rule_queue_is_a_denial_that_is_not_the_policys() -> None:
    admission = Admission(max_running=10, policy=policy(LIMITED))
    running, waiting = admission.ticket(), admission.ticket()
    assert isinstance(await admission.admit(running, (b"sh",), 0, 0), Allowed)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(admission.admit, waiting, (b"sh",), 0, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert admission.waiting_for(waiting).startswith("in the queue of allow 'sh'")
        verdict = await admission.admit(admission.ticket(), (b"sh",), 0, 0)
        assert isinstance(verdict, Denied) and not verdict.by_policy
        assert verdict.message == "queue full for allow 'sh' (1 running, 1 waiting)"
        running.release()
    waiting.release()
    denied = await admission.admit(admission.ticket(), (b"rm",), 0, 0)
    assert isinstance(denied, Denied) and denied.message.startswith("denied: ")


async def test_reload_decides_waiting_requests_again() -> None:
    admission = Admission(max_running=10, policy=policy(LIMITED))
    running, waiting = admission.ticket(), admission.ticket()
    await admission.admit(running, (b"sh",), 0, 0)
    verdicts: list[Allowed | Denied] = []

    async def wait() -> None:
        verdicts.append(await admission.admit(waiting, (b"sh",), 0, 0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        admission.reload(policy('[[allow]]\nprogram = "echo"\n'))  # sh is no longer allowed
    (verdict,) = verdicts
    assert isinstance(verdict, Denied) and "sh" in verdict.reason
    waiting.release()
    running.release()


def test_ticket_release_gives_back_what_it_holds() -> None:
    slots = trio.Semaphore(1)
    gate = RuleGate(1, None)
    gate.running = 1
    ticket = Ticket(slots)
    slots.acquire_nowait()
    ticket.slot, ticket.gate = True, gate
    ticket.release()
    assert (slots.value, gate.running) == (1, 0)
    ticket.release()
    assert (slots.value, gate.running) == (1, 0)
