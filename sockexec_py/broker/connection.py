"""One client connection, from accept to close: request → queue → spawn → run.

Each phase is bounded by the ``-t`` deadline counted from accept (a rule's own
``timeout`` replaces it once its program starts):

* *request* — read argc and the argv;
* *queued* — the decision, then wait (FIFO) for a place to run (:mod:`.admission`);
* *running* — the program's output pumps, its stdin pump and the wait for its exit;
* *draining* — output still in the pipes goes out (``--drain-timeout`` at most);
* *closing* — the exit pair, and the socket closed in the same step.

Errors before the program runs are answered in-band (``stderr`` line + ``exitcode``
125/126/127). A connection is cut short in one way only, :meth:`Connection.abandon`:
the client left (hang-up, a failed send) or the server shuts down.
"""

from __future__ import annotations

import logging
import math
import socket
import time

import trio

from sockexec_py.errors import EXIT_REFUSED, RemoteProtocolError
from sockexec_py.events import ArgvReady, Exited, InputEnded
from sockexec_py.policy import Allowed, Denied, Rule
from sockexec_py.protocol import NEED_DATA, ServerSession
from sockexec_py.replies import encode_error_reply, encode_exit, exit_event

from . import _io
from .pairs import PairWriter
from .pumps import OutputPump, StdinPump, let_the_client_finish
from .report import audit_line
from .services import Cancellable, Phase, Services
from .spawn import Program, SpawnError
from .spool import Spool

log = logging.getLogger("sockexec_py")


class Connection:
    """One client connection: its socket, its peer, its program, how it ended.

    Resource handling: :meth:`serve` runs the phases; :meth:`finish` (always, in the
    server's ``finally``) closes the socket, gives back the admission ticket if no
    program took it over, and terminates a program still running.
    """

    __slots__ = (  # many live at once: no __dict__ each
        "_exited", "abandoned", "accepted", "argv", "bytes_in", "client_gone",
        "deadline", "fd", "hard_scope", "last_input", "number", "outcome", "peer_gid",
        "peer_pid", "peer_uid", "phase", "phase_scope", "program", "rule", "services", "sock",
        "ticket", "writer"
    )  # fmt: skip

    def __init__(
        self, number: int, sock: socket.socket, deadline: float, services: Services
    ) -> None:
        self.number = number
        self.sock = sock
        self.fd = sock.fileno()
        self.deadline = deadline
        self.accepted = time.monotonic()
        self.peer_pid, self.peer_uid, self.peer_gid = _io.peer_credentials(sock)
        self.services = services
        budget = services.spool_budget
        self.writer = PairWriter(
            sock,
            before_close=lambda: services.hangups.unwatch(self.fd),
            on_broken=lambda: self.abandon("client hung up", client_gone=True),
            spool=Spool(budget, number) if budget.enabled else None,
        )
        self.phase = Phase.REQUEST
        self.program: Program | None = None
        self.bytes_in = 0
        #: When the client's last bytes were read (trio's clock).
        self.last_input = -math.inf
        #: Why the connection was cut short (client gone, shutdown), once it was.
        self.abandoned: str | None = None
        self.client_gone = False
        #: Cancelled when the connection is abandoned in the request or queued phase.
        self.phase_scope: Cancellable | None = None
        #: The connection's last-resort bound (moved when a rule sets its own timeout).
        self.hard_scope: trio.CancelScope | None = None
        self.ticket = services.admission.ticket()
        #: The request and the rule that allowed it, once known.
        self.argv: tuple[bytes, ...] | None = None
        self.rule: Rule | None = None
        #: How it ended, for the audit line: the exit, a refusal, or the client leaving.
        self.outcome = "client left"
        self._exited: Exited | None = None

    # -- cutting short -------------------------------------------------------------

    def abandon(self, reason: str, *, client_gone: bool = False) -> None:
        """The one way to cut a connection short: the client left, or the server stops.

        Stops waiting for the request or a slot, and terminates the program if one
        runs (or as soon as one exists). Without ``client_gone`` the client still gets
        an answer: a refusal, or the exit pair of the terminated program.
        """
        if client_gone and not self.client_gone:
            self.client_gone = True
            self.writer.broken = True  # nothing can reach the client: drop what is left
            log.debug("hangup conn=%d", self.number)
        if self.abandoned is None:
            self.abandoned = reason
        if self.phase_scope is not None:
            self.phase_scope.cancel()
        self.terminate(reason)

    def terminate(self, reason: str) -> None:
        """Terminate the program if one runs (TERM, then KILL after ``-k``)."""
        program = self.program
        if program is not None and program.status is None and not program.terminating:
            log.debug("terminate conn=%d pid=%d reason=%s", self.number, program.pid, reason)
            self.services.supervisor.terminate(program)

    # -- the phases ----------------------------------------------------------------

    async def serve(
        self, session: ServerSession | None = None, argv: tuple[bytes, ...] | None = None
    ) -> None:
        """Request → queue → spawn → run; every answer, refusals included, is sent.

        ``session`` and ``argv``: where :mod:`.oneshot` got to before handing over.
        """
        services = self.services
        if session is None:
            session = ServerSession(services.config.limits())
        verdict: Allowed | Denied | None = None
        # One scope for both waits (the request, then a place to run): the deadline
        # and a hang-up cut either, and the phase says which one was cut.
        with trio.move_on_at(self.deadline) as phase_scope:
            self.phase_scope = phase_scope
            if self.abandoned is not None:  # abandoned while handed over (:mod:`.oneshot`)
                phase_scope.cancel()
            if argv is None:
                try:
                    argv = await self._read_argv(session)
                except RemoteProtocolError as exc:
                    await self._refuse(str(exc))
                    return
                if argv is None:
                    return  # the client left without asking anything
            self.phase = Phase.QUEUED
            self.argv = argv
            verdict = await services.admission.admit(
                self.ticket, argv, self.peer_uid, self.peer_gid
            )
        if phase_scope.cancelled_caught:
            if self.phase is Phase.REQUEST:
                await self.refuse_cut("timed out waiting for the request")
            else:
                waiting = services.admission.waiting_for(self.ticket)
                await self.refuse_cut(f"timed out waiting {waiting}")
            return
        assert verdict is not None and argv is not None
        self.phase_scope = None
        if not isinstance(verdict, Allowed):
            await self._refuse(verdict.message, denied=verdict.by_policy)
            return
        self.rule = verdict.rule
        if self.abandoned is not None or services.shutting_down():
            await self.refuse_cut("")
            return
        try:
            program = await self._spawn(verdict)
        except SpawnError as exc:
            await self._refuse(str(exc), exitcode=exc.exitcode)
            return
        self.log_spawn(program)
        await self._run(session, program)

    def log_spawn(self, program: Program) -> None:
        if log.isEnabledFor(logging.DEBUG):  # the argv list costs: build it only for -d
            assert self.argv is not None
            log.debug(
                "spawn conn=%d pid=%d argv=%s",
                self.number,
                program.pid,
                [a.decode("utf-8", "backslashreplace") for a in self.argv],
            )

    async def _read_argv(self, session: ServerSession) -> tuple[bytes, ...] | None:
        """Read until the argv is complete; None if the client left before asking."""
        while True:
            event = session.next_event()
            if event is NEED_DATA:
                await self.receive(session, running=False)
            elif isinstance(event, ArgvReady):
                return event.argv
            elif isinstance(event, InputEnded):
                return None
            else:  # pragma: no cover - the session never emits stdin events first
                raise AssertionError(event)

    async def receive(self, session: ServerSession, *, running: bool = True) -> None:
        """Read what the client sent (a pooled buffer) and feed it to the session.

        Before the program runs (``running=False``) a read that found data goes on
        without a scheduling round: the request is bounded (--max-argv-bytes), and a
        round per read is what a one-shot session's latency is made of.
        """
        if self.writer.closed:  # the exit pair went out and the socket closed
            raise trio.ClosedResourceError
        try:
            data, buffer = await _io.read_pooled(self.sock, _io.BUFFERS, reschedule=running)
        except ConnectionResetError:
            session.receive_data(b"")
            return
        except OSError:
            # Woken as readable, then the session ended (exit pair sent, socket
            # closed) before this task ran again: the read on the closed socket is EBADF.
            if self.writer.closed:
                raise trio.ClosedResourceError from None
            raise
        self.took(session, data, buffer)

    def took(
        self, session: ServerSession, data: bytes | memoryview, buffer: bytearray | None
    ) -> None:
        """``data`` read from the client (in ``buffer`` of the pool, if not None) goes
        to ``session`` and is counted; the buffer goes back to the pool."""
        try:
            session.receive_data(data)
        finally:
            if buffer is not None:
                _io.BUFFERS.give(buffer)
        if data:
            self.bytes_in += len(data)
            self.last_input = trio.current_time()

    async def _spawn(self, verdict: Allowed) -> Program:
        """Start what was allowed; from the moment the process exists, it holds the
        admission ticket and an abandon terminates it."""
        services = self.services
        try:
            program = await services.supervisor.spawn(verdict.spec, self._started, self.deadline)
        except SpawnError:
            self.program = None  # the exec helper is reaped: nothing of it is left to run
            raise
        rule = verdict.rule
        if not rule.stdin:
            program.close_stdin()  # the program reads EOF; the client's stdin is dropped
        if rule.timeout is not None:
            self.deadline = trio.current_time() + rule.timeout
            assert self.hard_scope is not None
            self.hard_scope.deadline = self.deadline + services.config.grace
        return program

    def spawn_nowait(self, verdict: Allowed) -> Program:
        """:meth:`_spawn` for a rule that needs no exec helper and sets no timeout."""
        assert verdict.rule.timeout is None
        try:
            program = self.services.supervisor.spawn_nowait(verdict.spec, self._started)
        except SpawnError:
            self.program = None
            raise
        if not verdict.rule.stdin:
            program.close_stdin()  # the program reads EOF; the client's stdin is dropped
        return program

    def _started(self, program: Program) -> None:
        self.program = program
        program.on_exit(self.ticket.release)  # freed at reap, however the client left
        if self.abandoned is not None:
            self.terminate(self.abandoned)

    async def _run(self, session: ServerSession, program: Program) -> None:
        self.phase = Phase.RUNNING
        hangups = self.services.hangups
        writer = self.writer
        pumps = [OutputPump(writer, program, "stdout"), OutputPump(writer, program, "stderr")]
        stdin = StdinPump(
            session,
            program,
            lambda: self.receive(session),
            self.stdin_protocol_error,
            lambda: self.terminate("the client asked"),
        )
        async with trio.open_nursery() as nursery:
            writer.attach(nursery.start_soon)

            def on_input() -> None:
                if not writer.closed:
                    nursery.start_soon(stdin.run)

            try:
                event = stdin.first_event()
                # The stdin task starts only if the client sends more than its request.
                lazy = event is NEED_DATA and hangups.watch_input(self.fd, on_input)
                if event is not None and not lazy:
                    nursery.start_soon(stdin.run, event)
                for pump in pumps:
                    nursery.start_soon(pump.run)
                with trio.move_on_at(self.deadline):
                    await program.exited.wait()
                if program.status is None:
                    self.terminate("timeout")
                    await program.exited.wait()
                self.phase = Phase.DRAINING
                # Output still in the pipes belongs before the exit pair; a background
                # descendant holding them open gets --drain-timeout seconds, no more.
                if not all(pump.done.is_set() for pump in pumps):
                    with trio.move_on_after(self.services.config.drain_timeout):
                        for pump in pumps:
                            await pump.done.wait()
                    for pump in pumps:
                        pump.stop()
                    for pump in pumps:
                        await pump.done.wait()
                await let_the_client_finish(
                    stdin, lambda: self.last_input, self.services.config.drain_timeout
                )
                self.phase = Phase.CLOSING
                await self._send_exit(program)
                nursery.cancel_scope.cancel()
            finally:
                # Before the nursery can close: a late input callback must not start a
                # task in a closed nursery (once closed, the socket has no watch left).
                if not self.writer.closed:
                    hangups.unwatch_input(self.fd)

    def stdin_protocol_error(self, exc: RemoteProtocolError) -> None:
        log.debug("protocol error conn=%d: %s", self.number, exc)
        if self.program is not None:
            self.program.close_stdin()
        self.terminate("protocol error")

    def exited(self) -> Exited | None:
        """How the program ended, once it was reaped: the one value the exit pair, the
        ``-d`` log line and the audit line are rendered from."""
        program = self.program
        if self._exited is None and program is not None and program.status is not None:
            self._exited = exit_event(program.status, self.services.config.termsig_format)
            self.outcome = self._exited.describe()
        return self._exited

    async def _send_exit(self, program: Program) -> None:
        await self.writer.send_final(self.exit_pair())

    async def _refuse(
        self, message: str, exitcode: int = EXIT_REFUSED, *, denied: bool = False
    ) -> None:
        """Answer in-band: a ``stderr`` line with ``message``, then ``exitcode``."""
        await self.writer.send_final(self.refusal(message, exitcode, denied=denied))

    def refusal(self, message: str, exitcode: int = EXIT_REFUSED, *, denied: bool = False) -> bytes:
        """The bytes of :meth:`_refuse`'s answer (logged and recorded as the outcome)."""
        log.debug("refuse conn=%d exitcode=%d reason=%s", self.number, exitcode, message)
        self.outcome = message if denied else f"exitcode={exitcode} ({message})"
        return encode_error_reply(message, exitcode)

    def exit_pair(self) -> bytes:
        """The exit pair of the reaped program (and the ``-d`` line saying how it ended)."""
        exited = self.exited()
        assert exited is not None and self.program is not None
        log.debug("exit conn=%d pid=%d %s", self.number, self.program.pid, self.outcome)
        return encode_exit(exited)

    async def refuse_cut(self, timeout_reason: str) -> None:
        """A connection cut before its program started: tell the client why, unless it
        is gone (shutdown, or the ``-t`` deadline)."""
        if self.client_gone:
            return
        shutting = self.services.shutting_down() or self.abandoned is not None
        await self._refuse("the server is shutting down" if shutting else timeout_reason)

    # -- the end ---------------------------------------------------------------------

    def log_cut(self) -> None:
        """The last-resort bound passed: a warning if an unkillable program is why."""
        program = self.program
        if program is not None and program.status is None:
            log.warning(
                "conn=%d cut at the last-resort bound: pid=%d not ended after SIGKILL",
                self.number,
                program.pid,
            )

    def finish(self) -> None:
        """Close everything the connection holds (always called, once)."""
        self.writer.close()
        self.ticket.release()  # a no-op once a program took it over (freed at reap)
        program = self.program
        if program is not None:
            program.close_fds()
            if program.status is None:
                self.terminate("connection ended")
        if self.argv is not None and self.services.admission.policy.audited:
            self.exited()  # the outcome is the program's exit, once it is known
            log.info("audit %s", audit_line(self))
        log.debug("close conn=%d in=%d out=%d", self.number, self.bytes_in, self.writer.bytes_out)
