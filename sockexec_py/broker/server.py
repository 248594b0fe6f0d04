"""The broker: accepts clients on a Unix socket and runs one program per connection.

A connection goes through four phases, each bounded by the ``-t`` deadline counted
from accept: *request* (read argc and argv), *queued* (wait, FIFO, for one of the
``-m`` program slots), *running* (three pumps and a watcher under one nursery) and
*closing* (send the exit pair and close in the same step). Errors before the program
starts are answered in-band (``stderr`` line + ``exitcode`` 125/126/127).

Memory per connection is a constant plus the argv: the stdin pump reads the socket
only after the previous chunk reached the program, and the output pumps read a pipe
only after the previous pair left on the socket.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import functools
import itertools
import logging
import math
import os
import select
import signal
import socket
import struct
import sys
import termios
import time
from typing import TextIO

import trio

from sockexec_py.errors import EXIT_REFUSED, RemoteProtocolError
from sockexec_py.events import ArgvReady, InputEnded, OutputKind, StdinClosed, StdinData
from sockexec_py.policy import RLIMITS, Allowed, Denied, Policy, PolicyError, Rule, load_policy
from sockexec_py.protocol import (
    MAX_OUTPUT_CHUNK,
    NEED_DATA,
    ServerSession,
    encode_error_reply,
    encode_exit_pair,
    encode_output_pair,
    termsig_text,
)

from . import _io
from .admission import QueueFull, RuleGate
from .config import ServerConfig
from .hangup import HangupMonitor
from .spawn import ExecSpec, OrphanReaper, Program, SpawnError, Supervisor

log = logging.getLogger("sockexec_py")

# Read the client socket in chunks as large as an output pair: big enough for
# throughput, small enough to bound memory per connection.
_RECV_CHUNK = 256 * 1024
# The kernel send buffer of a client socket (Linux doubles it). The default (~208 KiB)
# holds barely three pairs, so a streaming program and its client ping-pong on it;
# this roughly doubles throughput. It is kernel memory, bounded per connection.
_SEND_BUFFER = 512 * 1024
# Pipe and socket reads go into pooled buffers of this size (see _io.BufferPool).
_BUFFERS = _io.BufferPool(_RECV_CHUNK)
# Bytes of an output pair besides its data ("6:stdout," "65536:" ","), rounded up.
_PAIR_OVERHEAD = 32
# The ioctl giving a socket's send queue in kernel memory (Linux: SIOCOUTQ).
_SIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None
_INT_ZERO = bytes(4)


def _footprint(data_length: int) -> int:
    """An upper bound of the kernel memory one output pair takes in a send queue:
    its bytes plus a quarter, plus the buffers' own overhead (a short pair costs ~1 KiB)."""
    return (data_length + _PAIR_OVERHEAD) * 5 // 4 + 2560


# At most this many reads of already-queued input before close (1 MiB); a client
# still sending past that gets its connection reset, as with any closed socket.
_DISCARD_RECVS = 4
# accept() errors that mean "overloaded": log, wait a little, try again.
_ACCEPT_RETRY_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_ACCEPT_RETRY_DELAY = 0.1
# How far the listen queue may be from its ideal size while admission slots are free.
_BACKLOG_SLACK = 16
_UCRED = struct.Struct("3i")


class Phase(enum.Enum):
    REQUEST = "request"
    QUEUED = "queued"
    RUNNING = "running"
    DRAINING = "draining"
    CLOSING = "closing"


class Connection:
    """One client connection: its socket, its peer, its program, its counters."""

    def __init__(
        self, number: int, sock: socket.socket, deadline: float, hangups: HangupMonitor
    ) -> None:
        self.number = number
        self._hangups = hangups
        self.sock = sock
        self.fd = sock.fileno()
        self.deadline = deadline
        self.accepted = time.monotonic()
        self.peer_pid, self.peer_uid, self.peer_gid = _peer_credentials(sock)
        self.phase = Phase.REQUEST
        self.program: Program | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.hung_up = False
        self.closed = False
        #: Cancelled when the client hangs up during the request or queued phase.
        self.phase_scope: trio.CancelScope | None = None
        #: The connection's last-resort bound (moved when a rule sets its own timeout).
        self.hard_scope: trio.CancelScope | None = None
        #: Under a policy: the request, the rule that allowed it, how it ended.
        self.argv: tuple[bytes, ...] | None = None
        self.rule: Rule | None = None
        self.gate: RuleGate | None = None
        #: The rule's gate this connection is queued at (for the timeout message).
        self.waiting_at: RuleGate | None = None
        self.outcome = "client left"
        self._send_lock = trio.Lock()
        #: Polls the socket for room (POLLOUT) without a scheduling round.
        self._room_poll = select.poll()
        self._room_poll.register(self.fd, select.POLLOUT)
        #: SO_SNDBUF once read (see _chunk_limit); whether SIOCOUTQ works here.
        self._send_buffer = 0
        self._measurable = _SIOCOUTQ is not None

    @property
    def write_broken(self) -> bool:
        return self.hung_up or self.closed

    async def send_output(self, kind: OutputKind, data: bytes | memoryview) -> None:
        """Send ``data`` as output pairs of at most 64 KiB; dropped once the client is gone.

        Every pair leaves whole in one ``sendmsg`` (SPEC §3), several pairs in the same
        call when the socket is known to have room for all of them; the send lock keeps
        the two pumps' pairs from interleaving. A ``data`` that fits the socket now
        costs no scheduling round.
        """
        if self.write_broken:
            return
        lock = self._send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:  # the other pump is finishing its pairs
            await lock.acquire()
        try:
            await self._send_pairs(kind, data)
        except _io.BROKEN_ERRORS:
            self.hung_up = True
        finally:
            lock.release()

    async def _send_pairs(self, kind: OutputKind, data: bytes | memoryview) -> None:
        view = memoryview(data)
        total = len(view)
        offset = 0
        chunk = self._chunk_limit()
        while offset < total and not self.write_broken:
            room = self._room()
            batch: list[bytes | memoryview] = []
            start = offset
            while offset < total:
                end = min(offset + chunk, total)
                cost = _footprint(end - offset)
                if room is None:
                    # The queue cannot be measured here: one pair per POLLOUT, which
                    # guarantees it fits (at most 1/4 of the buffer is in use then).
                    if batch or not self._room_poll.poll(0):
                        break
                elif cost > room:
                    break
                else:
                    room -= cost
                batch += encode_output_pair(kind, view[offset:end])
                offset = end
            if not batch:
                # The reader has to make room first: POLLOUT once 3/4 of it is free.
                await trio.lowlevel.wait_writable(self.sock)
                end = min(offset + chunk, total)
                room = self._room()
                if room is not None and _footprint(end - offset) <= room:
                    continue
                # Unmeasured, or a buffer smaller than our pessimistic estimate wants:
                # one pair, which POLLOUT alone guarantees to fit.
                batch = list(encode_output_pair(kind, view[offset:end]))
                offset = end
            pending = _io.sendmsg_nowait(self.sock, batch)
            if pending:  # not expected: the room was measured
                await _io.sendmsg_all(self.sock, pending)
            self.bytes_out += offset - start

    def _room(self) -> int | None:
        """Kernel memory the socket's send queue may still grow by, or None if unknown.

        A Unix stream send takes a new buffer (at most ~36 KiB of data) only while the
        queue's kernel footprint (SIOCOUTQ, which counts whole buffers, so a short pair
        weighs far more than its bytes) is below SO_SNDBUF; a pair sent past that
        point is cut, and lua-resty-exec fails on a cut pair (SPEC §3). So every batch
        is measured against the queue as it is now.
        """
        request = _SIOCOUTQ
        if request is None or not self._measurable:
            return None
        try:
            queued = int.from_bytes(fcntl.ioctl(self.fd, request, _INT_ZERO), sys.byteorder)
        except OSError:
            self._measurable = False  # no SIOCOUTQ here: one pair per POLLOUT
            return None
        return self._send_buffer - queued - 1

    def _chunk_limit(self) -> int:
        """The most data per pair: 64 KiB, less where SO_SNDBUF is so small (under
        ~128 KiB, a tiny net.core.wmem_max) that a 64 KiB pair could be cut even from
        a queue at the POLLOUT mark. A pair within half of SO_SNDBUF never can."""
        if not self._send_buffer:
            try:
                self._send_buffer = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            except OSError:
                self._send_buffer = 4 * MAX_OUTPUT_CHUNK  # unknown: assume a usual one
        return max(min(MAX_OUTPUT_CHUNK, self._send_buffer // 2 - 64 - _PAIR_OVERHEAD), 512)

    async def send_final(self, data: bytes) -> None:
        """Send the last bytes of the session and close the socket in the same step.

        lua-resty-exec waits about 1 ms for the close after the exit pair, so there is
        no scheduling point between the last ``sendmsg`` and ``close``.
        """
        if not self.write_broken:
            lock = self._send_lock
            try:
                lock.acquire_nowait()  # `async with` would cost a scheduling round
            except trio.WouldBlock:
                await lock.acquire()
            try:
                await _io.sendmsg_all(self.sock, [data])
            except _io.BROKEN_ERRORS:
                self.hung_up = True
            else:
                self.bytes_out += len(data)
            finally:
                lock.release()
        self.close()

    def close(self) -> None:
        """Close the socket (idempotent); tasks blocked on it get ClosedResourceError."""
        if not self.closed:
            self.closed = True
            self._hangups.unwatch(self.fd)  # before close: fd numbers are reused
            self._discard_unread()
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    def _discard_unread(self) -> None:
        """Read away input already queued (stdin a program never took, bytes after a
        refused request): closing over unread data makes the kernel reset the
        connection, and the client then sees ECONNRESET after our reply, not EOF."""
        with contextlib.suppress(OSError):
            for _ in range(_DISCARD_RECVS):
                if not self.sock.recv(_RECV_CHUNK, socket.MSG_DONTWAIT):
                    return

    def describe(self) -> str:
        """One line for the SIGUSR1 dump."""
        program = self.program
        pid = program.pid if program else "-"
        argv0 = program.argv[0].decode("utf-8", "backslashreplace") if program else "-"
        return (
            f"conn={self.number} peer_pid={self.peer_pid} peer_uid={self.peer_uid} "
            f"pid={pid} argv0={argv0} age={time.monotonic() - self.accepted:.1f}s "
            f"in={self.bytes_in} out={self.bytes_out} state={self.phase.value}"
        )


def _peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer from SO_PEERCRED; -1s where unavailable."""
    so_peercred = getattr(socket, "SO_PEERCRED", None)
    if so_peercred is None:
        return -1, -1, -1
    try:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, so_peercred, _UCRED.size))
    except OSError:
        return -1, -1, -1
    return pid, uid, gid


class _OutputPump:
    """Copies one of the program's output pipes to the client as pairs."""

    def __init__(self, conn: Connection, program: Program, kind: OutputKind) -> None:
        self.conn = conn
        self.fd = program.stdout_fd if kind == "stdout" else program.stderr_fd
        self.kind: OutputKind = kind
        self.done = trio.Event()
        self._stopped = False
        self._read_scope: trio.CancelScope | None = None

    def stop(self) -> None:
        """Stop reading (a pair being sent is finished first)."""
        self._stopped = True
        if self._read_scope is not None:
            self._read_scope.cancel()

    async def run(self) -> None:
        try:
            assert self.fd is not None
            while not self._stopped:
                with trio.CancelScope() as self._read_scope:
                    data, buffer = await _io.read_pooled(self.fd, _BUFFERS)
                if self._read_scope.cancelled_caught:
                    return
                try:
                    if not data:
                        return
                    await self.conn.send_output(self.kind, data)
                finally:
                    if buffer is not None:
                        _BUFFERS.give(buffer)
        finally:
            self.done.set()


class Server:
    """The broker serving one listening socket.

    Args:
        config: the server's settings.
        listener: a bound, listening, non-blocking Unix stream socket. The server
            closes it when it stops accepting.
        unlink_path: the socket path to remove when stopping (None when the socket
            was handed over by systemd and is not ours to remove).
        reap_orphans: adopt and reap the programs' orphans (child subreaper); for
            the daemon process only, as it reaps every child of the process.

    Run with ``await server.serve()`` (or ``nursery.start(server.serve)``, which
    returns once the server accepts); :meth:`request_shutdown` stops it.
    """

    def __init__(
        self,
        config: ServerConfig,
        listener: socket.socket,
        *,
        unlink_path: str | None = None,
        dump_stream: TextIO | None = None,
        reap_orphans: bool = False,
        policy: Policy | None = None,
    ) -> None:
        self.config = config
        #: None: run anything the server's user can run (the reference's behaviour).
        self.policy = policy
        self._gates: dict[str, RuleGate] = {}
        self.listener = listener
        self.unlink_path = unlink_path
        self._reap_orphans = reap_orphans
        self._unlink_identity = _identity(unlink_path) if unlink_path else None
        self._limits = config.limits()
        self._dump_stream = dump_stream
        self.hangups = HangupMonitor()
        self.connections: dict[int, Connection] = {}
        self._numbers = itertools.count(1)
        self._admission = trio.Semaphore(config.max_connections + config.max_queued)
        self._shutdown = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._supervisor: Supervisor | None = None
        self._accept_backoff = False
        self._nursery: trio.Nursery | None = None
        self._backlog = -1

    @property
    def supervisor(self) -> Supervisor:
        assert self._supervisor is not None, "serve() is not running"
        return self._supervisor

    # -- lifecycle --------------------------------------------------------------------

    async def serve(
        self,
        *,
        handle_signals: bool = False,
        task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve clients until :meth:`request_shutdown` (or SIGTERM/SIGINT).

        On shutdown: stop accepting, remove the socket, terminate every program and
        return once all are reaped (within ``-k`` + 1 s).
        """
        async with trio.open_nursery() as supervisor_nursery:
            self._supervisor = Supervisor(
                supervisor_nursery, self.config.max_connections, self.config.kill_timeout
            )
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.hangups.run)
                    self._update_backlog()
                    if self._reap_orphans and OrphanReaper.enable():
                        await nursery.start(OrphanReaper(self.supervisor).run)
                    if handle_signals:
                        await nursery.start(self._handle_signals)
                    accept_scope = trio.CancelScope()
                    nursery.start_soon(self._accept_loop, nursery, accept_scope)
                    task_status.started(self)
                    await self._shutdown.wait()
                    accept_scope.cancel()
                    self._close_listener()
                    self._stop_connections()
                    with trio.move_on_after(self.config.kill_timeout + 1):
                        await self._idle.wait()
                    nursery.cancel_scope.cancel()
            finally:
                self._close_listener()
                self.hangups.close()
                for program in list(self.supervisor.running):
                    self.supervisor.terminate(program)
        log.debug("stopped")

    def request_shutdown(self) -> None:
        """Ask :meth:`serve` to stop (safe to call more than once)."""
        self._shutdown.set()

    def dump(self, stream: TextIO | None = None) -> None:
        """Write one line per active connection (the SIGUSR1 report)."""
        out = stream or self._dump_stream or sys.stderr
        lines = [f"sockexec-py: {c.describe()}\n" for c in list(self.connections.values())]
        lines.append(f"sockexec-py: {len(lines)} active connection(s)\n")
        out.write("".join(lines))
        out.flush()

    async def _handle_signals(self, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(
            signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP
        ) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    self.dump()
                elif signum == signal.SIGHUP:
                    self.reload_policy()
                else:
                    log.debug("signal %s: shutting down", signal.Signals(signum).name)
                    self.request_shutdown()

    def reload_policy(self) -> bool:
        """Re-read ``--policy`` (SIGHUP): all or nothing; a bad file keeps the old one."""
        path = self.config.policy_path
        if path is None:
            log.info("SIGHUP: no --policy to reload")
            return False
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            log.error("policy reload failed, keeping the previous policy: %s", exc)
            return False
        self.policy = policy
        self._resize_gates(policy)
        log.info("policy reloaded from %s: %d rule(s)", path, len(policy.rules))
        return True

    def _close_listener(self) -> None:
        if self.listener.fileno() < 0:
            return
        trio.lowlevel.notify_closing(self.listener)
        self.listener.close()
        path = self.unlink_path
        if path and _identity(path) == self._unlink_identity:
            try:
                os.unlink(path)
            except OSError as exc:
                log.warning("cannot remove %s: %s", path, exc.strerror)

    def _stop_connections(self) -> None:
        for conn in list(self.connections.values()):
            if conn.program is not None:
                self._terminate(conn, "shutdown")
            elif conn.phase_scope is not None:
                conn.phase_scope.cancel()

    # -- accepting ----------------------------------------------------------------------

    async def _accept_loop(self, nursery: trio.Nursery, scope: trio.CancelScope) -> None:
        """Accept connections until cancelled.

        Clients such as nginx connect without blocking, and a full backlog is an
        immediate error for them, so the backlog is drained eagerly: here, and again
        at the start of every handler (see :meth:`_drain_backlog`). Admission
        (``-m`` + ``--max-queued``) is the only limit that leaves connections in the
        kernel backlog.
        """
        self._nursery = nursery
        with scope:
            while True:
                self._drain_backlog()
                if self._admission.value == 0:
                    # -m programs run and --max-queued wait: leave the rest in the backlog.
                    await self._admission.acquire()
                    self._admission.release()
                elif self._accept_backoff:
                    self._accept_backoff = False
                    await trio.sleep(_ACCEPT_RETRY_DELAY)
                else:
                    await trio.lowlevel.wait_readable(self.listener)

    def _drain_backlog(self) -> None:
        """Accept every pending connection now, then start their handlers.

        Accepting is one cheap syscall per connection; handlers start only after the
        backlog is empty, so a burst of connects never waits behind task start-up.
        """
        if self._nursery is None or self._shutdown.is_set():
            return
        accepted = []
        while self._admission.value > 0:
            fd = self._accept_fd()
            if fd is None:
                break
            self._admission.acquire_nowait()
            accepted.append(fd)
        for fd in accepted:
            self._nursery.start_soon(self._handle, fd)
        if accepted:
            self._update_backlog()

    def _update_backlog(self) -> None:
        """Size the kernel's listen queue: ``-q`` plus the connections we would admit.

        Admitted connections (up to ``-m`` + ``--max-queued``) belong in our FIFO, but
        while the loop is busy (a spawn holds it for milliseconds under load) they can
        only wait in the kernel's queue; a queue of just ``-q`` would then overflow, and
        nginx gets EAGAIN for a server that is merely busy. Once admission is full the
        queue is ``-q`` exactly, the reference's meaning. Linux resizes a listening
        socket's queue on a second ``listen``. While slots are free it is resized only
        when it is off by :data:`_BACKLOG_SLACK` (not twice per connection).
        """
        free = self._admission.value
        backlog = self.config.backlog + free
        if free and abs(backlog - self._backlog) < _BACKLOG_SLACK:
            return
        if backlog != self._backlog and self.listener.fileno() >= 0:
            self.listener.listen(backlog)
            self._backlog = backlog

    def _accept_fd(self) -> int | None:
        """One non-blocking accept(); None when nothing is pending."""
        while True:
            try:
                # The bare fd, without building a socket object: the cheapest accept.
                fd, _ = self.listener._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return None
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                if exc.errno in _ACCEPT_RETRY_ERRNOS:
                    log.warning("accept: %s (retrying)", exc.strerror)
                    self._accept_backoff = True
                    return None
                raise
            return int(fd)

    # -- one connection -------------------------------------------------------------------

    async def _handle(self, fd: int) -> None:
        self._drain_backlog()  # between two handler starts, the backlog comes first
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # a tuning only (capped by net.core.wmem_max)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        deadline = (
            trio.current_time() + self.config.timeout if self.config.timeout > 0 else math.inf
        )
        conn = Connection(next(self._numbers), sock, deadline, self.hangups)
        self.connections[conn.number] = conn
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self.hangups.watch(conn.fd, functools.partial(self._on_hangup, conn))
        log.debug(
            "accept conn=%d peer_pid=%d peer_uid=%d peer_gid=%d",
            conn.number,
            conn.peer_pid,
            conn.peer_uid,
            conn.peer_gid,
        )
        # A hard bound: past it the connection is cut even if the client never reads.
        hard_deadline = deadline + self.config.kill_timeout + self.config.drain_timeout + 1
        try:
            with trio.move_on_at(hard_deadline) as conn.hard_scope:
                await self._serve_connection(conn)
        except Exception:
            log.exception("internal error on conn=%d", conn.number)
        finally:
            conn.close()
            if conn.gate is not None:  # admitted by its rule, but no program started
                conn.gate.release()
            if conn.argv is not None:
                self._audit(conn)
            if conn.program is not None:
                conn.program.close_fds()
                if conn.program.status is None:
                    self._terminate(conn, "connection ended")
            del self.connections[conn.number]
            self._admission.release()
            self._update_backlog()
            if not self.connections:
                self._idle.set()
            log.debug("close conn=%d in=%d out=%d", conn.number, conn.bytes_in, conn.bytes_out)

    def _on_hangup(self, conn: Connection) -> None:
        conn.hung_up = True
        log.debug("hangup conn=%d", conn.number)
        if conn.phase_scope is not None:
            conn.phase_scope.cancel()
        if conn.program is not None and conn.program.status is None:
            self._terminate(conn, "client hung up")

    def _terminate(self, conn: Connection, reason: str) -> None:
        program = conn.program
        assert program is not None
        if not program.terminating:
            log.debug("terminate conn=%d pid=%d reason=%s", conn.number, program.pid, reason)
            self.supervisor.terminate(program)

    async def _refuse(self, conn: Connection, reason: str, exitcode: int = EXIT_REFUSED) -> None:
        log.debug("refuse conn=%d exitcode=%d reason=%s", conn.number, exitcode, reason)
        conn.outcome = (
            reason if reason.startswith("denied: ") else f"exitcode={exitcode} ({reason})"
        )
        await conn.send_final(encode_error_reply(reason, exitcode))

    async def _serve_connection(self, conn: Connection) -> None:
        session = ServerSession(self._limits)
        with trio.move_on_at(conn.deadline) as conn.phase_scope:
            try:
                argv = await self._read_argv(conn, session)
            except RemoteProtocolError as exc:
                await self._refuse(conn, str(exc))
                return
        if conn.phase_scope.cancelled_caught:
            if not conn.hung_up:
                await self._refuse(conn, self._cut_reason("timed out waiting for the request"))
            return
        conn.phase_scope = None
        if argv is None:
            return
        conn.phase = Phase.QUEUED
        decision: Allowed | str | None = None
        with trio.move_on_at(conn.deadline) as conn.phase_scope:
            if self.policy is not None:
                conn.argv = argv
                decision = await self._pass_gate(conn, argv)
            if not isinstance(decision, str):
                await self.supervisor.acquire_slot()
        if isinstance(decision, str):  # denied, or the rule's queue is full
            await self._refuse(conn, decision)
            return
        if conn.phase_scope.cancelled_caught:
            if not conn.hung_up:
                gate = conn.waiting_at
                where = (
                    f"in the queue of {conn.rule.label} "
                    f"({gate.running} of {gate.max_running} running)"
                    if gate is not None and conn.rule is not None
                    else f"for a free slot ({self.config.max_connections} programs running)"
                )
                await self._refuse(conn, self._cut_reason(f"timed out waiting {where}"))
            return
        conn.phase_scope = None
        assert not isinstance(decision, str)
        if conn.hung_up or self._shutdown.is_set():
            self.supervisor.release_slot()
            if not conn.hung_up:
                await self._refuse(conn, "the server is shutting down")
            return
        self._drain_backlog()  # spawning is the costly step: let waiting clients in first
        try:
            if decision is None:
                program = self.supervisor.spawn(argv)
            else:
                program = await self._spawn_allowed(conn, decision)
        except SpawnError as exc:
            await self._refuse(conn, str(exc), exc.exitcode)
            return
        conn.program = program
        if log.isEnabledFor(logging.DEBUG):  # the argv list costs: build it only for -d
            log.debug(
                "spawn conn=%d pid=%d argv=%s",
                conn.number,
                program.pid,
                [a.decode("utf-8", "backslashreplace") for a in argv],
            )
        await self._run(conn, session, program)

    async def _pass_gate(self, conn: Connection, argv: tuple[bytes, ...]) -> Allowed | str:
        """Decide under the policy, then wait in the rule's queue if it has one.

        Returns the decision, or the reason to refuse (``denied: …``, queue full).
        A policy reloaded while the request waited is honoured: it is decided again.
        """
        while True:
            policy = self.policy
            assert policy is not None
            verdict = policy.decide(argv, conn.peer_uid, conn.peer_gid)
            if isinstance(verdict, Denied):
                return f"denied: {verdict.reason}"
            conn.rule = verdict.rule
            gate = self._gate(verdict.rule)
            if conn.gate is not None and conn.gate is not gate:
                conn.gate.release()  # a reload moved the request to another rule
                conn.gate = None
            if gate is None or conn.gate is gate:
                return verdict
            conn.waiting_at = gate
            try:
                await gate.acquire()
            except QueueFull as exc:
                return f"queue full for {verdict.rule.label} ({exc})"
            conn.waiting_at = None
            conn.gate = gate  # released when the connection ends, or at reap
            if self.policy is policy:
                return verdict

    def _gate(self, rule: Rule) -> RuleGate | None:
        if rule.max_running is None:
            return None
        gate = self._gates.get(rule.key)
        if gate is None:
            gate = self._gates[rule.key] = RuleGate(rule.max_running, rule.max_queue)
        return gate

    def _resize_gates(self, policy: Policy) -> None:
        """After a reload: new limits apply to the gates in place; gates of rules that
        lost their limit let their waiters through (to be decided again) and go."""
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

    async def _spawn_allowed(self, conn: Connection, decision: Allowed) -> Program:
        """Spawn what a policy rule allowed, with its settings; the gate frees at reap."""
        rule = decision.rule
        spec = ExecSpec(
            path=decision.path,
            argv=decision.argv,
            env=decision.env,
            uid=rule.uid,
            gid=rule.gid,
            groups=rule.groups,
            cwd=rule.cwd,
            umask=rule.umask,
            rlimits=tuple((name, RLIMITS[name], value) for name, value in rule.rlimits),
        )

        def started(program: Program) -> None:
            # From now on a hang-up or a shutdown terminates it, exec'd or not.
            conn.program = program
            if conn.hung_up or self._shutdown.is_set():
                self._terminate(conn, "client hung up" if conn.hung_up else "shutdown")

        try:
            with trio.move_on_at(conn.deadline) as scope:
                program = await self.supervisor.spawn_spec(spec, started)
            if scope.cancelled_caught:
                raise SpawnError("timed out starting the program", EXIT_REFUSED)
        except SpawnError:
            conn.program = None  # the helper is reaped: nothing of it is left to run
            raise
        if conn.gate is not None:
            gate, conn.gate = conn.gate, None
            assert self._nursery is not None
            self._nursery.start_soon(_release_at_exit, program, gate)
        if not rule.stdin:
            program.close_stdin()  # the program reads EOF; the client's stdin is dropped
        if rule.timeout is not None:
            conn.deadline = trio.current_time() + rule.timeout
            assert conn.hard_scope is not None
            conn.hard_scope.deadline = (
                conn.deadline + self.config.kill_timeout + self.config.drain_timeout + 1
            )
        return program

    def _audit(self, conn: Connection) -> None:
        """One info line per request under a policy: who, what, which rule, outcome."""
        assert conn.argv is not None
        program = conn.program
        if program is not None and program.status is not None:
            signum = program.termsig
            conn.outcome = (
                f"termsig={termsig_text(signum).decode()}"
                if signum is not None
                else f"exitcode={program.returncode}"
            )
        log.info(
            "audit conn=%d peer_uid=%d peer_pid=%d rule=%s argv=%s outcome=%s duration=%.3fs",
            conn.number,
            conn.peer_uid,
            conn.peer_pid,
            f"{conn.rule.kind}:{conn.rule.name}" if conn.rule else "-",
            [a.decode("utf-8", "backslashreplace") for a in conn.argv],
            conn.outcome,
            time.monotonic() - conn.accepted,
        )

    def _cut_reason(self, timeout_reason: str) -> str:
        """Why a connection was cut before its program started: shutdown or -t."""
        return "the server is shutting down" if self._shutdown.is_set() else timeout_reason

    async def _read_argv(
        self, conn: Connection, session: ServerSession
    ) -> tuple[bytes, ...] | None:
        """Read until the argv is complete; None if the client left before asking."""
        while True:
            event = session.next_event()
            if event is NEED_DATA:
                await self._receive(conn, session, running=False)
            elif isinstance(event, ArgvReady):
                return event.argv
            elif isinstance(event, InputEnded):
                return None
            else:  # pragma: no cover - the session never emits stdin events first
                raise AssertionError(event)

    async def _receive(
        self, conn: Connection, session: ServerSession, *, running: bool = True
    ) -> None:
        """Read what the client sent (a pooled buffer) and feed it to the session.

        Before the program runs (``running=False``) a read that found data goes on
        without a scheduling round: the request is bounded (--max-argv-bytes), and a
        round per read is what a one-shot session's latency is made of.
        """
        if conn.closed:  # the exit pair went out and the socket closed under this pump
            raise trio.ClosedResourceError
        try:
            data, buffer = await _io.read_pooled(conn.sock, _BUFFERS, reschedule=running)
        except ConnectionResetError:
            session.receive_data(b"")
            return
        except OSError:
            # Woken as readable, then the session ended (exit pair sent, socket
            # closed) before this task ran again: the read on the closed socket is EBADF.
            if conn.closed:
                raise trio.ClosedResourceError from None
            raise
        try:
            session.receive_data(data)
        finally:
            if buffer is not None:
                _BUFFERS.give(buffer)
        conn.bytes_in += len(data)

    async def _run(self, conn: Connection, session: ServerSession, program: Program) -> None:
        conn.phase = Phase.RUNNING
        pumps = [_OutputPump(conn, program, "stdout"), _OutputPump(conn, program, "stderr")]
        async with trio.open_nursery() as nursery:
            try:
                self._start_stdin(conn, session, program, nursery)
                for pump in pumps:
                    nursery.start_soon(pump.run)
                with trio.move_on_at(conn.deadline):
                    await program.exited.wait()
                if program.status is None:
                    self._terminate(conn, "timeout")
                    await program.exited.wait()
                conn.phase = Phase.DRAINING
                # Output still in the pipes belongs before the exit pair; a background
                # descendant holding them open gets --drain-timeout seconds, no more.
                if not all(pump.done.is_set() for pump in pumps):
                    with trio.move_on_after(self.config.drain_timeout):
                        for pump in pumps:
                            await pump.done.wait()
                    for pump in pumps:
                        pump.stop()
                    for pump in pumps:
                        await pump.done.wait()
                conn.phase = Phase.CLOSING
                self._log_exit(conn, program)
                await conn.send_final(self._exit_pair(program))
                nursery.cancel_scope.cancel()
            finally:
                # Before the nursery can close: a late input callback must not start a
                # task in a closed nursery (once closed, the socket has no watch left).
                if not conn.closed:
                    self.hangups.unwatch_input(conn.fd)

    def _exit_pair(self, program: Program) -> bytes:
        signum = program.termsig
        if signum is not None:
            return encode_exit_pair(termsig=termsig_text(signum, self.config.termsig_format))
        code = program.returncode
        assert code is not None
        return encode_exit_pair(exitcode=code)

    def _log_exit(self, conn: Connection, program: Program) -> None:
        if log.isEnabledFor(logging.DEBUG):
            signum = program.termsig
            how = (
                f"termsig={termsig_text(signum).decode()}"
                if signum
                else f"exitcode={program.returncode}"
            )
            log.debug("exit conn=%d pid=%d %s", conn.number, program.pid, how)

    def _start_stdin(
        self, conn: Connection, session: ServerSession, program: Program, nursery: trio.Nursery
    ) -> None:
        """Hand what the client already sent to the program, and start the stdin task
        once there is more to read. Most clients send the request and ``0:,`` at once
        and then only read: for them no task waits on the socket."""
        try:
            event = session.next_event()
            if isinstance(event, StdinClosed):
                program.close_stdin()
                event = session.next_event()
        except RemoteProtocolError as exc:
            self._stdin_protocol_error(conn, program, exc)
            return
        if event is NEED_DATA:

            def on_input() -> None:
                if not conn.closed:
                    nursery.start_soon(self._pump_stdin, conn, session, program)

            if self.hangups.watch_input(conn.fd, on_input):
                return
        nursery.start_soon(self._pump_stdin, conn, session, program, event)

    def _stdin_protocol_error(
        self, conn: Connection, program: Program, exc: RemoteProtocolError
    ) -> None:
        log.debug("protocol error conn=%d: %s", conn.number, exc)
        program.close_stdin()
        self._terminate(conn, "protocol error")

    async def _pump_stdin(
        self,
        conn: Connection,
        session: ServerSession,
        program: Program,
        event: object = NEED_DATA,
    ) -> None:
        try:
            while True:
                if event is NEED_DATA:
                    await self._receive(conn, session)
                elif isinstance(event, StdinData):
                    # Every chunk already received goes to the program in one writev.
                    chunks = [event.data]
                    while isinstance(event := session.next_event(), StdinData):
                        chunks.append(event.data)  # a protocol error: terminated, unwritten
                    await program.write_stdin(chunks)
                    continue
                elif isinstance(event, StdinClosed):
                    program.close_stdin()
                elif isinstance(event, InputEnded):
                    return
                event = session.next_event()
        except trio.ClosedResourceError:
            return  # the session is over: the exit pair was sent and the socket closed
        except RemoteProtocolError as exc:
            self._stdin_protocol_error(conn, program, exc)


async def _release_at_exit(program: Program, gate: RuleGate) -> None:
    """A rule's slot is the program's until it is reaped, however its client left."""
    try:
        await program.exited.wait()
    finally:
        gate.release()


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
