"""The running phase's data movers: program output to the client, client stdin to the
program.

Memory per connection is a constant plus the argv: the stdin pump reads the socket
only after the previous chunk reached the program, and an output pump reads its pipe
only after the previous pair left on the socket.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from sockexec_py.errors import RemoteProtocolError
from sockexec_py.events import (
    InputEnded,
    OutputKind,
    StdinClosed,
    StdinData,
    TerminateRequested,
)
from sockexec_py.protocol import NEED_DATA, ServerSession

from . import _io
from .pairs import PairWriter
from .spawn import Program


class OutputPump:
    """Copies one of the program's output pipes to the client as pairs."""

    __slots__ = (  # many live at once: no __dict__ each
        "_read_scope", "_stopped", "done", "fd", "kind", "writer"
    )  # fmt: skip

    def __init__(self, writer: PairWriter, program: Program, kind: OutputKind) -> None:
        self.writer = writer
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
                    data, buffer = await _io.read_pooled(self.fd, _io.BUFFERS)
                if self._read_scope.cancelled_caught:
                    return
                try:
                    if not data:
                        return
                    await self.writer.send_output(self.kind, data)
                finally:
                    if buffer is not None:
                        _io.BUFFERS.give(buffer)
        finally:
            self.done.set()


class StdinPump:
    """Hands the client's stdin netstrings to the program, as fast as it takes them.

    Args:
        session: the connection's protocol state (past the argv).
        program: where stdin goes.
        receive: reads more from the client into ``session``; raises
            ``trio.ClosedResourceError`` once the session is over (socket closed).
        protocol_error: what to do when the client breaks the protocol after the
            program started (terminate it: SPEC §4).
        terminate: what to do when the client asks for the program's termination.
    """

    __slots__ = (  # many live at once: no __dict__ each
        "_client_done_event", "_program", "_protocol_error", "_receive", "_session",
        "_terminate", "client_done"
    )  # fmt: skip

    def __init__(
        self,
        session: ServerSession,
        program: Program,
        receive: Callable[[], Awaitable[None]],
        protocol_error: Callable[[RemoteProtocolError], None],
        terminate: Callable[[], None],
    ) -> None:
        self._session = session
        self._program = program
        self._receive = receive
        self._protocol_error = protocol_error
        self._terminate = terminate
        #: Whether the client has sent all it will send for stdin (``0:,``, a
        #: terminate request, the end of its input, or a protocol error).
        self.client_done = False
        self._client_done_event: trio.Event | None = None  # made only when waited for

    def _done(self) -> None:
        self.client_done = True
        if self._client_done_event is not None:
            self._client_done_event.set()

    async def wait_client_done(self) -> None:
        """Wait until :attr:`client_done`."""
        if not self.client_done:
            if self._client_done_event is None:
                self._client_done_event = trio.Event()
            await self._client_done_event.wait()

    def first_event(self) -> object:
        """Take what the client sent with its request (``0:,`` closes stdin at once).

        Returns the event :meth:`run` starts from: :data:`NEED_DATA` when the client
        sent nothing more yet (most clients send the request and ``0:,`` at once and
        then only read: the caller may wait for input before starting a task), or
        None after a protocol error (handled: nothing to run).
        """
        try:
            event = self._session.next_event()
            if isinstance(event, StdinClosed):
                self._program.close_stdin()
                self._done()
                event = self._session.next_event()
            if isinstance(event, TerminateRequested):
                self._terminate()  # the signal first: stdin stays as it is
                self._done()
                event = self._session.next_event()
        except RemoteProtocolError as exc:
            self._done()
            self._protocol_error(exc)
            return None
        return event

    async def run(self, event: object = NEED_DATA) -> None:
        """Pump from ``event`` on until the client's input ends or the session is over."""
        session, program = self._session, self._program
        try:
            while True:
                if event is NEED_DATA:
                    await self._receive()
                elif isinstance(event, StdinData):
                    # Every chunk already received goes to the program in one writev.
                    chunks = [event.data]
                    while isinstance(event := session.next_event(), StdinData):
                        chunks.append(event.data)  # a protocol error: terminated, unwritten
                    await program.write_stdin(chunks)
                    continue
                elif isinstance(event, StdinClosed):
                    program.close_stdin()
                    self._done()
                elif isinstance(event, TerminateRequested):
                    self._terminate()  # the signal first: stdin stays as it is
                    self._done()
                elif isinstance(event, InputEnded):
                    return
                event = session.next_event()
        except trio.ClosedResourceError:
            return  # the session is over: the exit pair was sent and the socket closed
        except RemoteProtocolError as exc:
            self._protocol_error(exc)
        finally:
            self._done()


#: How long a client still sending stdin after its program ended may pause between
#: two reads before the exit pair goes out anyway.
SENDING_GRACE = 0.05


def still_sending(stdin: StdinPump, last_input: float) -> bool:
    """Whether the client is in the middle of sending stdin: not done, and its last
    bytes (read at ``last_input``, trio's clock) came less than SENDING_GRACE ago."""
    return not stdin.client_done and trio.current_time() - last_input < SENDING_GRACE


async def let_the_client_finish(
    stdin: StdinPump, last_input: Callable[[], float], drain_timeout: float
) -> None:
    """A client still sending stdin when the program has ended gets to finish it
    (up to its ``0:,``; the pump drops what nobody reads) before the exit pair.

    Closing over a client in the middle of a send resets the connection, and
    nginx then drops the reply lua-resty-exec already has (a ``head -c 5`` fed
    4 MiB). Only a client that is sending (:func:`still_sending`) is waited for, as
    long as more keeps coming, within ``drain_timeout``: one that merely keeps stdin
    open (a duplex session waiting for the exit) gets its exit pair at once.
    """
    if not still_sending(stdin, last_input()):
        return  # the common case: no scope to enter
    with trio.move_on_after(drain_timeout):
        while not stdin.client_done:
            quiet = trio.current_time() - last_input()
            if quiet >= SENDING_GRACE:
                return
            with trio.move_on_after(SENDING_GRACE - quiet):
                await stdin.wait_client_done()
