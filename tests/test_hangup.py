"""The hang-up monitor: one epoll for every client socket (SPEC §6)."""

from __future__ import annotations

import socket

import trio
import trio.testing

from sockexec_py.broker.hangup import HangupMonitor


async def test_full_close_fires_half_close_does_not_and_input_fires_once() -> None:
    monitor = HangupMonitor()
    ours, theirs = socket.socketpair()
    fired: list[str] = []
    monitor.watch(ours.fileno(), lambda: fired.append("hangup"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(monitor.run)
        assert monitor.watch_input(ours.fileno(), lambda: fired.append("input"))
        theirs.send(b"1:x,")
        await trio.testing.wait_all_tasks_blocked()
        theirs.send(b"more")  # once only: a task reads from now on
        theirs.shutdown(socket.SHUT_WR)  # a half-close is not a hang-up
        await trio.testing.wait_all_tasks_blocked()
        assert fired == ["input"]
        theirs.close()
        with trio.fail_after(10):
            while fired == ["input"]:
                await trio.testing.wait_all_tasks_blocked()
                await trio.sleep(0)
        assert fired == ["input", "hangup"]
        nursery.cancel_scope.cancel()
    monitor.close()
    ours.close()


async def test_a_failing_callback_does_not_stop_the_monitor() -> None:
    """A callback that raises (say, a nursery closed under it) is logged; the other
    sockets stay watched."""
    monitor = HangupMonitor()
    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    fired: list[str] = []

    def broken() -> None:
        raise RuntimeError("Nursery is closed to new arrivals")

    monitor.watch(first.fileno(), lambda: None)
    monitor.watch(second.fileno(), lambda: fired.append("second hung up"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(monitor.run)
        monitor.watch_input(first.fileno(), broken)
        first_peer.send(b"x")
        await trio.testing.wait_all_tasks_blocked()
        second_peer.close()
        with trio.fail_after(10):
            while not fired:
                await trio.testing.wait_all_tasks_blocked()
                await trio.sleep(0)
        nursery.cancel_scope.cancel()
    assert fired == ["second hung up"]
    monitor.close()
    for sock in (first, first_peer, second):
        sock.close()
