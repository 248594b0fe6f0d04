"""The broker: accepts clients on a Unix socket and serves one connection each.

The server owns the listening socket, the accept loop and the kernel's listen queue,
the process-wide pieces every connection uses (:class:`~.supervisor.Supervisor`,
:class:`~.admission.Admission`, :class:`~.hangup.HangupMonitor`), and the daemon's
signals (SIGTERM/SIGINT stop it, SIGUSR1 dumps the connections, SIGHUP reloads the
policy). What happens on one connection is :mod:`.connection`'s.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import math
import os
import signal
import socket
import sys
from typing import TextIO

import trio

from sockexec_py.policy import ALLOW_ALL, AllowAll, Policy, PolicyError, load_policy
from sockexec_py.protocol import ServerSession

from ._reactor import Reactor
from .admission import Admission
from .config import ServerConfig
from .connection import Connection
from .hangup import HangupMonitor
from .oneshot import OneShot
from .oneshot_services import OneShotServices
from .pairs import final_ring
from .report import dump_line
from .services import Services
from .spool import SpoolBudget
from .supervisor import OrphanReaper, Supervisor

log = logging.getLogger("sockexec_py")

# The kernel send buffer of a client socket (Linux doubles it). The default (~208 KiB)
# holds barely three pairs, so a streaming program and its client ping-pong on it;
# this roughly doubles throughput. It is kernel memory, bounded per connection.
SEND_BUFFER = 512 * 1024
# accept() errors that mean "overloaded": log, wait a little, try again.
_ACCEPT_RETRY_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_ACCEPT_RETRY_DELAY = 0.1
# How far the listen queue may be from its ideal size while admission slots are free.
_BACKLOG_SLACK = 16


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
        policy: Policy | AllowAll = ALLOW_ALL,
    ) -> None:
        self.config = config
        self.admission = Admission(config.max_connections, policy)
        self.listener = listener
        self.unlink_path = unlink_path
        self._reap_orphans = reap_orphans
        self._unlink_identity = _identity(unlink_path) if unlink_path else None
        self._dump_stream = dump_stream
        self.hangups = HangupMonitor()
        self.reactor = Reactor()
        #: Callback-driven one-shots (:mod:`.oneshot`); SOCKEXEC_PY_ONESHOT=0: tasks only.
        self._oneshot = os.environ.get("SOCKEXEC_PY_ONESHOT", "1") != "0"
        self._oneshot_services: OneShotServices | None = None
        self._oneshots: dict[int, OneShot] = {}
        self.connections: dict[int, Connection] = {}
        self._numbers = itertools.count(1)
        # Connections accepted at once: -m running plus --max-queued waiting.
        self._accepting = trio.Semaphore(config.max_connections + config.max_queued)
        self._shutdown = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._supervisor: Supervisor | None = None
        self._accept_backoff = False
        self._nursery: trio.Nursery | None = None
        self._backlog = -1
        self._services_value: Services | None = None
        self._spool_budget = SpoolBudget(config.spool_dir, config.max_spool, config.max_spool_total)

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
            # The reactor reaps programs too: shielded, it runs until all are reaped.
            reactor_scope = trio.CancelScope(shield=True)
            supervisor_nursery.start_soon(self._run_reactor, reactor_scope)
            self._supervisor = Supervisor(
                supervisor_nursery, self.config.kill_timeout, self.reactor
            )
            try:
                async with trio.open_nursery() as nursery:
                    final_ring()  # opened now: no first-session cost, a stable fd count
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
                # First: whatever fails below, the reactor stops once all are reaped.
                self.supervisor.stop_when_reaped(reactor_scope.cancel)
                self._close_listener()
                for oneshot in list(self._oneshots.values()):
                    oneshot.close()
                self.hangups.close()
                for program in list(self.supervisor.running):
                    self.supervisor.terminate(program)
        self.reactor.close()
        log.debug("stopped")

    async def _run_reactor(self, scope: trio.CancelScope) -> None:
        with scope:
            await self.reactor.run()

    def request_shutdown(self) -> None:
        """Ask :meth:`serve` to stop (safe to call more than once)."""
        self._shutdown.set()

    def dump(self, stream: TextIO | None = None) -> None:
        """Write one line per active connection (the SIGUSR1 report)."""
        out = stream or self._dump_stream or sys.stderr
        lines = [f"sockexec-py: {dump_line(c)}\n" for c in list(self.connections.values())]
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
        self.admission.reload(policy)
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
            conn.abandon("shutdown")

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
        self._oneshot_services = OneShotServices.of(
            self.reactor, self.config, nursery, self._serve, self._close
        )
        with scope:
            while True:
                self._drain_backlog()
                if self._accepting.value == 0:
                    # -m programs run and --max-queued wait: leave the rest in the backlog.
                    await self._accepting.acquire()
                    self._accepting.release()
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
        while self._accepting.value > 0:
            fd = self._accept_fd()
            if fd is None:
                break
            self._accepting.acquire_nowait()
            accepted.append(fd)
        for fd in accepted:
            self._start(fd)
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
        free = self._accepting.value
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

    def _start(self, fd: int) -> None:
        """Serve a connection just accepted: by callbacks (:mod:`.oneshot`) or a task."""
        if not self._oneshot:
            assert self._nursery is not None
            self._nursery.start_soon(self._handle, fd)
            return
        conn = self._open(fd)
        assert self._oneshot_services is not None
        oneshot = OneShot(conn, self._oneshot_services, conn.deadline + self.config.grace)
        self._oneshots[conn.number] = oneshot
        try:
            oneshot.start()
        except Exception:
            log.exception("internal error on conn=%d", conn.number)
            oneshot.close()

    async def _handle(self, fd: int) -> None:
        self._drain_backlog()  # between two handler starts, the backlog comes first
        await self._serve(self._open(fd))

    def _open(self, fd: int) -> Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # a tuning only (capped by net.core.wmem_max)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        config = self.config
        deadline = trio.current_time() + config.timeout if config.timeout > 0 else math.inf
        conn = Connection(next(self._numbers), sock, deadline, self._services())
        self.connections[conn.number] = conn
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self.hangups.watch(
            conn.fd, functools.partial(conn.abandon, "client hung up", client_gone=True)
        )
        log.debug(
            "accept conn=%d peer_pid=%d peer_uid=%d peer_gid=%d",
            conn.number,
            conn.peer_pid,
            conn.peer_uid,
            conn.peer_gid,
        )
        return conn

    async def _serve(
        self,
        conn: Connection,
        session: ServerSession | None = None,
        argv: tuple[bytes, ...] | None = None,
    ) -> None:
        try:
            with trio.move_on_at(conn.deadline + self.config.grace) as conn.hard_scope:
                await conn.serve(session, argv)
            if conn.hard_scope.cancelled_caught:
                conn.log_cut()
        except Exception:
            log.exception("internal error on conn=%d", conn.number)
        finally:
            self._close(conn)

    def _close(self, conn: Connection) -> None:
        conn.finish()
        del self.connections[conn.number]
        self._oneshots.pop(conn.number, None)
        self._accepting.release()
        self._update_backlog()
        if not self.connections:
            self._idle.set()

    def _services(self) -> Services:
        if self._services_value is None:
            self._services_value = Services(
                config=self.config,
                admission=self.admission,
                supervisor=self.supervisor,
                hangups=self.hangups,
                spool_budget=self._spool_budget,
                shutting_down=self._shutdown.is_set,
            )
        return self._services_value


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
