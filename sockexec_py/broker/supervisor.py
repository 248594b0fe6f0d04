"""Owning programs from spawn to reap: termination, reaping, orphans.

The :class:`Supervisor` owns every program from spawn to reap: its watcher task reaps
the program however its connection ended, and termination (TERM to the group, KILL
``kill_timeout`` seconds later if anything is still alive) runs there too, so a
connection can close at once while the escalation goes on.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Callable

import trio

from sockexec_py.errors import EXIT_REFUSED
from sockexec_py.policy import ExecSpec

from ._reactor import Reactor
from .runas import finish_helper, needs_helper, runs_as, spawn_as, spawn_helper
from .spawn import Program, SpawnError, spawn

_HAS_PIDFD = hasattr(os, "pidfd_open")
# How often to check whether a terminated group still has members.
_GROUP_POLL_INTERVAL = 0.05
# The least time between two scans for orphans to reap.
_ORPHAN_SCAN_INTERVAL = 0.05


class Supervisor:
    """Owns programs from spawn to reap.

    Resource handling: each program gets a watcher task in the supervisor's nursery
    that reaps it (then runs the program's exit callbacks: its admission slot is
    freed there, not when its connection closes); :meth:`terminate` starts the
    TERM→KILL escalation in the same nursery. The nursery's owner waits for both, so
    no program outlives the server unreaped.
    """

    def __init__(
        self, nursery: trio.Nursery, kill_timeout: float, reactor: Reactor | None = None
    ) -> None:
        self._nursery = nursery
        self.kill_timeout = kill_timeout
        self.running: set[Program] = set()
        #: Where programs are reaped by a callback on their pidfd instead of a task
        #: each; it must run until :meth:`stop_when_reaped` says all are reaped.
        self._reactor = reactor
        self._on_all_reaped: Callable[[], None] | None = None

    async def spawn(
        self, spec: ExecSpec, started: Callable[[Program], None], deadline: float = math.inf
    ) -> Program:
        """Start ``spec``; ``started`` is called as soon as the process exists.

        ``started`` runs before the exec helper (if ``spec`` needs one) has exec'd the
        program, so a client leaving meanwhile can have it terminated, and whatever
        the process holds can be tied to its exit (:meth:`Program.on_exit`).

        Error handling: :class:`SpawnError` (125/126/127) when the program could not
        be started; after an exec helper failed, only once the helper is reaped; 125
        when an exec helper has not started the program by ``deadline``.
        """
        if not needs_helper(spec):
            return self.spawn_nowait(spec, started)
        program, status = spawn_helper(spec)
        self._track(program)
        started(program)
        try:
            with trio.move_on_at(deadline) as scope:
                await finish_helper(spec, status)
        except SpawnError:
            program.close_fds()
            with trio.CancelScope(shield=True):
                await program.exited.wait()  # it exits right after saying why
            raise
        except BaseException:
            program.close_fds()
            self.terminate(program)
            raise
        if scope.cancelled_caught:
            program.close_fds()
            self.terminate(program)
            raise SpawnError("timed out starting the program", EXIT_REFUSED)
        return program

    def spawn_nowait(self, spec: ExecSpec, started: Callable[[Program], None]) -> Program:
        """:meth:`spawn` for a ``spec`` that needs no exec helper (not awaited)."""
        assert not needs_helper(spec)
        program = spawn_as(spec) if runs_as(spec) else spawn(spec.argv, spec.env, path=spec.path)
        self._track(program)
        started(program)
        return program

    def _track(self, program: Program) -> None:
        self.running.add(program)
        if self._reactor is not None and _HAS_PIDFD:
            try:
                pidfd = os.pidfd_open(program.pid)
            except OSError:
                pass
            else:
                self._reactor.add_reader(pidfd, lambda: self._reap_now(program, pidfd))
                return
        self._nursery.start_soon(self._reap, program)

    def _reap_now(self, program: Program, pidfd: int) -> None:
        """The reactor's reaping: ``pidfd`` is readable once the program exited."""
        try:
            reaped, status = os.waitpid(program.pid, os.WNOHANG)
        except ChildProcessError:  # not expected: ours to reap (a bug elsewhere)
            reaped, status = program.pid, None
        if not reaped:
            return
        assert self._reactor is not None
        self._reactor.remove_reader(pidfd)
        os.close(pidfd)
        self._forget(program, status)

    def stop_when_reaped(self, stop: Callable[[], None]) -> None:
        """Call ``stop`` once no program is left to reap (now if none is)."""
        self._on_all_reaped = stop
        if not self.running:
            stop()

    def _forget(self, program: Program, status: int | None) -> None:
        self.running.discard(program)
        try:
            program.reaped(status)
        finally:
            if not self.running and self._on_all_reaped is not None:
                self._on_all_reaped()

    def terminate(self, program: Program) -> None:
        """Terminate the program's group: TERM now, KILL after ``kill_timeout``.

        Idempotent, returns at once; the escalation runs in the supervisor's nursery.
        """
        if program.terminating or program.exited.is_set():
            return  # a reaped leader's group number may already be someone else's
        program.terminating = True
        self._nursery.start_soon(self._escalate, program)

    async def _escalate(self, program: Program) -> None:
        program.signal_group(signal.SIGTERM)
        program.signal_group(signal.SIGCONT)  # a stopped program must see its TERM
        with trio.move_on_after(self.kill_timeout):
            await program.exited.wait()
            # The leader is gone; wait for the rest of its group, if any, to follow.
            while program.signal_group(0):
                await trio.sleep(_GROUP_POLL_INTERVAL)
            return
        program.signal_group(signal.SIGKILL)

    async def _reap(self, program: Program) -> None:
        # Shielded: even when the server is cancelled, every child gets reaped.
        status: int | None = None  # stays None only if waiting failed (a bug)
        with trio.CancelScope(shield=True):
            try:
                status = await _wait_for_exit(program.pid)
            finally:
                self._forget(program, status)


async def _wait_for_exit(pid: int) -> int:
    """Wait for ``pid`` to exit and reap it; returns the raw wait status.

    A pidfd where the kernel has them (Linux 5.3+, and not refused by a seccomp
    profile); else a thread per program, without trio's default cap of 40 threads,
    which would leave the 41st program unreaped.
    """
    pidfd = -1
    if _HAS_PIDFD:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = -1
    if pidfd >= 0:
        try:
            while True:
                reaped, status = os.waitpid(pid, os.WNOHANG)
                if reaped:
                    return status
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
    _, status = await trio.to_thread.run_sync(
        os.waitpid, pid, 0, abandon_on_cancel=False, limiter=_UNLIMITED_THREADS
    )
    return status


_UNLIMITED_THREADS = trio.CapacityLimiter(math.inf)


class OrphanReaper:
    """Adopts and reaps the orphans of our programs (Linux child subreaper).

    A program's background children outlive it; reparented to init they may linger
    as zombies (containers often have no reaping init) and keep a terminated group
    "alive" for the whole ``-k`` delay. As a subreaper the broker adopts them and
    reaps them itself. Only for the daemon process: in a process that has other
    children (a test runner) it would reap those too.
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    @staticmethod
    def enable() -> bool:
        """Become a child subreaper; False where the platform cannot.

        Orphans are found through ``/proc/self/task/*/children`` (a kernel built with
        CONFIG_PROC_CHILDREN): without it adopted orphans could not be told from our
        programs, so the broker does not adopt them at all.
        """
        if not os.path.exists(f"/proc/self/task/{os.getpid()}/children"):
            return False
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_child_subreaper = 36
            return bool(libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0)
        except (OSError, AttributeError):
            return False

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            task_status.started()
            self.reap_orphans()
            async for _ in signals:
                self.reap_orphans()
                # Every program's exit is a SIGCHLD too: scanning /proc for each would
                # cost more than the rest of a short session. SIGCHLDs arriving during
                # the pause are coalesced into one more scan; an orphan waits that long.
                await trio.sleep(_ORPHAN_SCAN_INTERVAL)

    def reap_orphans(self) -> None:
        """Reap every exited child that is not a program the supervisor tracks."""
        tracked = {program.pid for program in self._supervisor.running}
        for pid in _children() - tracked:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _children() -> set[int]:
    pids: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            continue
    return pids
