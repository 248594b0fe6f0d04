"""One sans-IO session state per transport, all with the same interface, so the
blocking and the trio drivers (:mod:`._blocking`, :mod:`._trio`) drive either.

The interface (:class:`SessionState`): :meth:`~SessionState.opening` gives the first
bytes to send; :meth:`~SessionState.receive_data` takes the peer's bytes (``b""`` when
it closed); :meth:`~SessionState.data_to_send` gives what the transport owes the peer
in return (the WebSocket's request after its handshake, pongs); :attr:`ready` says
that the session is open (stdin may go out, frames come). Stdin: :meth:`stdin`
yields the bytes that send a chunk, bounded pieces however large the chunk (none
after the close or once the peer is gone), :meth:`close_stdin` the bytes that close
it, once; :meth:`terminate` the bytes that ask for the program's termination (the
exit still comes, with its signal); :meth:`stdin_gone` records that the peer no
longer takes any. Output:
:meth:`next_frame` gives the next frame or None until more bytes arrive; ``exited`` is
set with the last one, and ``on_stdout``/``on_stderr`` are called with each output
frame as it is taken.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from sockexec_py.events import Exited, Output
from sockexec_py.protocol import CLOSE_STDIN, NEED_DATA, TERMINATE, ClientSession, encode_request

from ._common import STDIN_CHUNK, Frame, OutputCallback, stdin_netstrings


class SessionState(Protocol):
    """What a driver needs of a transport's session state (see the module docstring)."""

    exited: Exited | None

    @property
    def ready(self) -> bool: ...
    def opening(self) -> bytes: ...
    def receive_data(self, data: bytes) -> None: ...
    def data_to_send(self) -> bytes: ...
    def next_frame(self) -> Frame | None: ...
    def stdin(self, data: bytes) -> Iterator[bytes]: ...
    def close_stdin(self) -> bytes: ...
    def terminate(self) -> bytes: ...
    def stdin_gone(self) -> None: ...


class FrameDelivery:
    """What every state does with a frame as it is taken: callbacks and ``exited``."""

    def __init__(self, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None) -> None:
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self._stdin_closed = False
        self._terminate_sent = False
        #: How the program ended, once the last frame was taken.
        self.exited: Exited | None = None

    def deliver(self, frame: Frame) -> Frame:
        if isinstance(frame, Exited):
            self.exited = frame
        elif (callback := self._callbacks[frame.kind]) is not None:
            callback(frame.data)
        return frame

    def stdin_gone(self) -> None:
        """The peer no longer takes stdin (the program ended: its exit is on the way)."""
        self._stdin_closed = True


class UnixSessionState(FrameDelivery):
    """A session over the broker's socket: the netstring protocol (SPEC §2-3).

    Stdin goes out in netstrings of at most 64 KiB (:func:`stdin_netstrings`), so a
    broker's ``--max-frame`` never refuses it.
    """

    ready = True

    def __init__(
        self,
        argv: Sequence[str | bytes],
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        *,
        stdin: bytes | None = None,
    ) -> None:
        """``stdin``: all of the program's stdin, sent with the request and closed, in
        the opening (at most :data:`STDIN_CHUNK` bytes: a larger one must be sent
        while the output is read)."""
        super().__init__(on_stdout, on_stderr)
        request = encode_request(argv)  # a bad argv raises before connecting
        if stdin is not None:
            if len(stdin) > STDIN_CHUNK:
                raise ValueError(f"a stdin sent with the request is at most {STDIN_CHUNK} bytes")
            request += b"".join(stdin_netstrings(stdin)) + self.close_stdin()
        self._request = request
        self._parser = ClientSession()

    def opening(self) -> bytes:
        return self._request

    def data_to_send(self) -> bytes:
        return b""

    def stdin(self, data: bytes) -> Iterator[bytes]:
        for netstring in stdin_netstrings(data):
            if self._stdin_closed:
                return
            yield netstring

    def close_stdin(self) -> bytes:
        if self._stdin_closed:
            return b""
        self._stdin_closed = True
        return CLOSE_STDIN

    def terminate(self) -> bytes:
        """``!`` between frames (the last thing sent: no stdin after it)."""
        if self._terminate_sent:
            return b""
        self._terminate_sent = self._stdin_closed = True
        return TERMINATE

    def receive_data(self, data: bytes) -> None:
        self._parser.receive_data(data)

    def next_frame(self) -> Frame | None:
        """Error handling: :class:`ProtocolError` when the broker broke the protocol or
        closed before the exit pair."""
        event = self._parser.next_event()
        if event is NEED_DATA:
            return None
        assert isinstance(event, Output | Exited)
        return self.deliver(event)
