"""The common session, driven by readiness callbacks instead of tasks.

Most sessions are one-shot: the request (argv, then ``0:,``) arrives whole, the program
runs and writes a little, the exit pair goes out and the socket closes. Driven by
tasks (:meth:`.connection.Connection.serve`), such a session costs a task for the
connection and one per output pipe, and a scheduling round for each step from one to
the next. Here the same steps are callbacks of the server's :class:`~._reactor.Reactor`:

* accept → request → spawn: the accept loop reads the request and spawns the program
  in the round it accepted the connection (or, when the request is not there yet,
  the round in which the socket becomes readable);
* exit → EOF → exit pair → close: the pipes' EOF and the program's reap are handled
  as the kernel reports them, and whichever comes last sends the exit pair and closes.

Whatever has to wait goes to a task running the task-driven code from that point, so
there is one implementation of each rule: a request the admission must queue or
refuse, an exec helper, a rule's own timeout (:meth:`Connection.serve`), output the
socket has no room for (:meth:`PairWriter.send_output`, spool included), stdin after
the request (:class:`StdinPump`), a client still sending stdin when the program ended,
an exit pair that does not fit (:meth:`PairWriter.send_final`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from sockexec_py.errors import RemoteProtocolError
from sockexec_py.events import ArgvReady, InputEnded, OutputKind
from sockexec_py.protocol import NEED_DATA, ServerSession

from . import _io
from .connection import Connection
from .oneshot_services import OneShotServices
from .pumps import OutputPump, StdinPump, let_the_client_finish, still_sending
from .runas import needs_helper
from .services import Phase
from .spawn import Program, SpawnError

log = logging.getLogger("sockexec_py")

#: Output past which a session is a stream, not a one-shot: its pipes go on by tasks.
STREAM_AFTER = 256 * 1024


class OneShot:
    """Drives one connection by callbacks from accept to close (see the module docstring).

    Resource handling: the connection is closed (:meth:`close`, through the server's
    ``closed``) once the exit pair or a refusal went out, by the last callback or task
    of the session; or handed over whole to the task-driven path.
    """

    __slots__ = (  # many live at once: no __dict__ each
        "_closed", "_draining", "_finishing", "_hard_deadline", "_open_pipes", "_pumps",
        "_reading", "_sending", "_services", "conn", "program", "session", "stdin"
    )  # fmt: skip

    def __init__(self, conn: Connection, services: OneShotServices, hard_deadline: float) -> None:
        self.conn = conn
        self._services = services
        self._hard_deadline = hard_deadline
        self.session = ServerSession(conn.services.config.limits())
        self.program: Program | None = None
        self.stdin: StdinPump | None = None
        self._reading = False  # the socket is in the reactor (request phase)
        self._open_pipes: dict[OutputKind, int] = {}
        self._sending = 0  # output streams gone on by a task (:meth:`_pump_in_task`)
        self._pumps: dict[OutputKind, OutputPump] = {}
        self._draining = False
        self._finishing = False  # a task sends the last bytes
        self._closed = False

    # -- request → spawn ------------------------------------------------------------

    def start(self) -> None:
        """Read the request if it is there, else wait for it (in the reactor)."""
        conn = self.conn
        conn.phase_scope = self  # a hang-up or shutdown in the request phase: cancel()
        services = self._services
        if services.deadlines is not None:
            services.deadlines.add(conn, self._guard(self._deadline_passed))
        if services.hard is not None:
            services.hard.add(conn, self._guard(self._cut))
        self._request_readable()

    def _request_readable(self) -> None:
        conn, session = self.conn, self.session
        try:
            read = _io.read_nowait(conn.sock, _io.BUFFERS)
        except ConnectionResetError:
            read = (b"", None)
        except OSError:
            self._hand_over(None)  # the task-driven path meets it again, and says so
            return
        if read is None:
            self._watch_request()
            return
        conn.took(session, *read)
        try:
            event = session.next_event()
        except RemoteProtocolError:
            self._hand_over(None)  # the session raises it again there: a 125 refusal
            return
        if event is NEED_DATA:
            self._watch_request()
        elif isinstance(event, InputEnded):
            self.close()  # the client left without asking anything
        else:
            assert isinstance(event, ArgvReady)
            self._stop_reading()
            self._admit(event.argv)

    def _watch_request(self) -> None:
        if not self._reading:
            self._reading = True
            self._services.reactor.add_reader(self.conn.fd, self._guard(self._request_readable))

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._services.reactor.remove_reader(self.conn.fd)

    def _hand_over(self, argv: tuple[bytes, ...] | None) -> None:
        """Go on as a task-driven connection (which owns the deadlines from now on)."""
        self._stop_reading()
        self._forget_timers()
        self.conn.phase_scope = None
        self._services.serve(self.conn, self.session, argv)
        self._closed = True  # closing is the task's now

    def _admit(self, argv: tuple[bytes, ...]) -> None:
        conn = self.conn
        services = conn.services
        conn.phase = Phase.QUEUED
        conn.argv = argv
        if conn.abandoned is not None or services.shutting_down():
            self._hand_over(argv)  # the refusal is the task-driven path's
            return
        verdict = services.admission.admit_nowait(conn.ticket, argv, conn.peer_uid, conn.peer_gid)
        if verdict is None:
            self._hand_over(argv)  # a refusal, a queue, no free slot
            return
        if needs_helper(verdict.spec) or verdict.rule.timeout is not None:
            conn.ticket.release()  # taken again there, in turn
            self._hand_over(argv)
            return
        conn.phase_scope = None
        conn.rule = verdict.rule
        try:
            program = conn.spawn_nowait(verdict)
        except SpawnError as exc:
            self._final(conn.refusal(str(exc), exc.exitcode))
            return
        conn.log_spawn(program)
        self._run(program)

    # -- running --------------------------------------------------------------------

    def _run(self, program: Program) -> None:
        conn, services = self.conn, self._services
        self.program = program
        conn.phase = Phase.RUNNING
        writer = conn.writer
        writer.attach(services.start_soon)  # the spool's sending task, if it comes to that
        session = self.session
        stdin = self.stdin = StdinPump(
            session,
            program,
            lambda: conn.receive(session),
            conn.stdin_protocol_error,
            lambda: conn.terminate("the client asked"),
        )
        event = stdin.first_event()
        if event is NEED_DATA and conn.services.hangups.watch_input(
            conn.fd, self._guard(self._on_input)
        ):
            pass  # the stdin task starts only if the client sends more than its request
        elif event is not None:
            self._start_stdin(event)
        pipes: tuple[tuple[OutputKind, int | None], ...] = (
            ("stdout", program.stdout_fd),
            ("stderr", program.stderr_fd),
        )
        for kind, fd in pipes:
            assert fd is not None
            self._open_pipes[kind] = fd
            services.reactor.add_reader(fd, self._guard(self._output_readable, kind))
        program.on_exit(self._guard(self._maybe_finish))

    def _on_input(self) -> None:
        if not self.conn.writer.closed:
            self._start_stdin(NEED_DATA)

    def _start_stdin(self, event: object) -> None:
        assert self.stdin is not None
        self._services.start_soon(self._guarded, self.stdin.run, event)

    def _output_readable(self, kind: OutputKind) -> None:
        fd = self._open_pipes.get(kind)
        if fd is None:
            return
        read = _io.read_nowait(fd, _io.BUFFERS)
        if read is None:
            return
        data, buffer = read
        if not data:
            self._pipe_done(kind)
            return
        writer = self.conn.writer
        if writer.bytes_out < STREAM_AFTER and writer.send_output_nowait(kind, data):
            if buffer is not None:
                _io.BUFFERS.give(buffer)
            return
        # No room, or a stream: the pipe goes on by a task (it leaves the reactor),
        # which waits for room and then pumps the pipe to its end (:class:`OutputPump`).
        # A client slower than its program would otherwise cost a task and two epoll
        # changes per chunk, and a stream a second epoll's round per chunk.
        self._services.reactor.remove_reader(fd)
        self._sending += 1
        assert self.program is not None
        # Made now, so that a drain timeout or a close before the task runs stops it.
        pump = self._pumps[kind] = OutputPump(writer, self.program, kind)
        self._services.start_soon(self._pump_in_task, pump, data, buffer)

    async def _pump_in_task(
        self, pump: OutputPump, data: bytes | memoryview, buffer: bytearray | None
    ) -> None:
        kind = pump.kind
        cut = True
        try:
            with trio.move_on_at(self._hard_deadline):
                try:
                    await self.conn.writer.send_output(kind, data)
                finally:
                    if buffer is not None:
                        _io.BUFFERS.give(buffer)
                await pump.run()  # at once if the drain timeout or a close stopped it
                cut = False
        except trio.ClosedResourceError:
            if not self._closed:  # (closed under it: the end of the session, not an error)
                log.exception("internal error on conn=%d", self.conn.number)
        except Exception:
            log.exception("internal error on conn=%d", self.conn.number)
        finally:
            self._sending -= 1
            del self._pumps[kind]
        if cut:  # the last-resort bound: the client never made room, or the program
            self._cut()  # cannot be killed
        else:
            self._guard(self._pipe_done)(kind)

    def _pipe_done(self, kind: OutputKind) -> None:
        fd = self._open_pipes.pop(kind, None)
        if fd is not None:
            self._services.reactor.remove_reader(fd)
        self._maybe_finish()

    def _drain_expired(self) -> None:
        """--drain-timeout after the exit: a background descendant holds a pipe open."""
        for pump in self._pumps.values():
            pump.stop()  # its task ends the pipe (a pair being sent is finished first)
        for kind in list(self._open_pipes):
            if kind not in self._pumps:
                self._pipe_done(kind)

    def _deadline_passed(self) -> None:
        if self.conn.phase is Phase.REQUEST:
            self.cancel()
        else:
            self.conn.terminate("timeout")

    def _cut(self) -> None:
        """The last-resort bound, with the program still not reaped (in uninterruptible
        sleep, where even SIGKILL waits): the connection is closed without its exit
        pair, as the task-driven path's ``hard_scope`` does; the program holds its
        slot until it is reaped."""
        self.conn.log_cut()
        self.close()

    def cancel(self) -> None:
        """The request phase cut short: the ``-t`` deadline, a hang-up, a shutdown."""
        if self._closed or self._finishing or self.conn.phase is not Phase.REQUEST:
            return
        self._stop_reading()
        self._forget_timers()
        conn = self.conn
        self._finish_in_task(lambda: conn.refuse_cut("timed out waiting for the request"))

    # -- the end --------------------------------------------------------------------

    def _maybe_finish(self) -> None:
        """Send the exit pair once the program is reaped and both pipes reached EOF."""
        program = self.program
        if self._closed or self._finishing or program is None or program.status is None:
            return
        conn = self.conn
        if self._open_pipes:
            if not self._draining:
                self._draining = True
                conn.phase = Phase.DRAINING
                self._services.drains.add(conn, self._guard(self._drain_expired))
            return
        if self._sending:
            return  # the task sending output comes back here
        self._forget_timers()
        stdin = self.stdin
        assert stdin is not None
        if still_sending(stdin, conn.last_input):
            self._finish_in_task(self._finish_after_stdin)
            return
        conn.phase = Phase.CLOSING
        self._final(conn.exit_pair())

    async def _finish_after_stdin(self) -> None:
        assert self.stdin is not None
        conn = self.conn
        await let_the_client_finish(
            self.stdin, lambda: conn.last_input, conn.services.config.drain_timeout
        )
        conn.phase = Phase.CLOSING
        await conn.writer.send_final(conn.exit_pair())

    def _final(self, data: bytes) -> None:
        """The last bytes, and the socket closed in the same step."""
        writer = self.conn.writer
        if writer.send_final_nowait(data):
            self.close()
        else:
            self._finish_in_task(lambda: writer.send_final(data))

    def _finish_in_task(self, send: Callable[[], Awaitable[None]]) -> None:
        self._finishing = True
        self._services.start_soon(self._finish_task, send)

    async def _finish_task(self, send: Callable[[], Awaitable[None]]) -> None:
        try:
            with trio.move_on_at(self._hard_deadline) as bound:
                await send()
            if bound.cancelled_caught:
                self.conn.log_cut()
        except Exception:
            log.exception("internal error on conn=%d", self.conn.number)
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection (once): the reactor forgets its fds first."""
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        for pump in self._pumps.values():
            pump.stop()
        reactor = self._services.reactor
        for fd in self._open_pipes.values():
            reactor.remove_reader(fd)
        self._open_pipes.clear()
        self._forget_timers()
        self._services.closed(self.conn)

    def _forget_timers(self) -> None:
        services = self._services
        for queue in (services.deadlines, services.hard, services.drains):
            if queue is not None:
                queue.remove(self.conn)

    def _guard(self, callback: Callable[..., None], *bound: object) -> Callable[..., None]:
        """``callback`` (with ``bound`` first) as a callback of the reactor, a timer,
        the hang-up monitor or the program's exit: an exception (a bug) is logged and
        ends this session (its program terminated), rather than leave it open or reach
        the caller."""

        def guarded(*args: object) -> None:
            try:
                callback(*bound, *args)
            except Exception:
                log.exception("internal error on conn=%d", self.conn.number)
                self.close()

        return guarded

    async def _guarded(self, run: Callable[..., Awaitable[Any]], *args: object) -> None:
        """:meth:`_guard` for a task of the session (its stdin pump)."""
        try:
            await run(*args)
        except Exception:
            log.exception("internal error on conn=%d", self.conn.number)
            self.close()
