"""The client's sans-IO session states, one per transport, without sockets: the
broker's netstrings and the gateway's WebSocket, behind the same interface."""

from __future__ import annotations

import json
import random

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from sockexec_py.client import BrokerUnavailable, ProtocolError
from sockexec_py.client._common import STDIN_CHUNK, stdin_netstrings
from sockexec_py.client._state import UnixSessionState
from sockexec_py.client._websocket import GatewayAddress, WebSocketSessionState
from sockexec_py.client.wire import GatewayRefused
from sockexec_py.events import Exited, Output
from sockexec_py.netstring import Decoder, encode
from sockexec_py.protocol import encode_request


@pytest.mark.parametrize("size", [0, 1, STDIN_CHUNK - 1, STDIN_CHUNK, STDIN_CHUNK + 1, 200_003])
def test_stdin_netstrings_are_bounded_and_exact(size: int) -> None:
    data = random.Random(size).randbytes(size)
    state = UnixSessionState(["cat"])
    request = [state.opening(), *state.stdin(data), state.close_stdin()]
    assert request[0] == encode_request(["cat"]) and request[-1] == b"0:,"
    decoder = Decoder(STDIN_CHUNK)  # refuses any longer netstring
    decoder.feed(b"".join(request[1:]))
    frames = []
    while isinstance(frame := decoder.next_frame(), bytes):
        frames.append(frame)
    assert frames[-1] == b"" and b"".join(frames) == data
    assert len(frames) == 1 + -(-size // STDIN_CHUNK)  # no empty netstring before the close
    assert list(stdin_netstrings(data)) == request[1:-1]


def test_session_state_drops_stdin_after_the_close_or_the_brokers_end() -> None:
    state = UnixSessionState(["cat"])
    pieces = state.stdin(bytes(3 * STDIN_CHUNK))
    assert next(pieces) == encode(bytes(STDIN_CHUNK))
    state.stdin_gone()  # the broker closed: what is left of the chunk is dropped
    assert list(pieces) == []
    assert state.close_stdin() == b""
    fresh = UnixSessionState(["cat"])
    assert (fresh.close_stdin(), fresh.close_stdin()) == (b"0:,", b"")
    assert list(fresh.stdin(b"late")) == []


def test_session_state_frames_callbacks_and_exit() -> None:
    out: list[bytes] = []
    state = UnixSessionState(["cat"], on_stdout=out.append)
    reply = b"6:stdout,2:hi,6:stderr,3:err,8:exitcode,1:0,"
    frames: list[object] = []
    for byte in reply:  # fed byte by byte
        state.receive_data(bytes([byte]))
        while (frame := state.next_frame()) is not None:
            frames.append(frame)
    assert frames == [Output("stdout", b"hi"), Output("stderr", b"err"), Exited(exitcode=0)]
    assert (out, state.exited) == ([b"hi"], Exited(exitcode=0))


def _gateway_side(state: WebSocketSessionState) -> tuple[WSConnection, list[object]]:
    """A gateway's end of the WebSocket, fed the client's opening."""
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(state.opening())
    events = list(server.events())
    assert isinstance(events[0], Request) and events[0].target.startswith("/v1/exec/ws")
    return server, events


def _open(state: WebSocketSessionState) -> WSConnection:
    server, _ = _gateway_side(state)
    assert not state.ready
    state.receive_data(server.send(AcceptConnection()))
    assert state.ready
    server.receive_data(state.data_to_send())
    (request,) = list(server.events())
    assert isinstance(request, TextMessage) and json.loads(request.data) == {"argv": ["cat"]}
    return server


def test_websocket_state_opens_then_sends_the_request() -> None:
    state = WebSocketSessionState(GatewayAddress("ws://127.0.0.1:9/"), ["cat"], "tok")
    _, events = _gateway_side(state)
    assert (b"authorization", b"Bearer tok") in events[0].extra_headers  # type: ignore[attr-defined]
    _open(WebSocketSessionState(GatewayAddress("ws://127.0.0.1:9/"), ["cat"]))


def test_websocket_stdin_goes_out_in_bounded_messages() -> None:
    state = WebSocketSessionState(GatewayAddress("http://127.0.0.1:9"), ["cat"])
    server = _open(state)
    data = random.Random(3).randbytes(3 * STDIN_CHUNK + 5)
    pieces = list(state.stdin(data))
    assert len(pieces) == 4
    server.receive_data(b"".join(pieces) + state.close_stdin())
    messages = list(server.events())
    chunks = [m.data for m in messages if isinstance(m, BytesMessage)]
    assert all(len(c) <= STDIN_CHUNK for c in chunks) and b"".join(chunks) == data
    assert isinstance(messages[-1], TextMessage)
    assert json.loads(messages[-1].data) == {"type": "close_stdin"}
    assert state.close_stdin() == b"" and list(state.stdin(b"late")) == []


def test_websocket_frames_callbacks_and_exit() -> None:
    out: list[bytes] = []
    state = WebSocketSessionState(GatewayAddress("ws://h:1"), ["cat"], on_stdout=out.append)
    server = _open(state)
    wire = server.send(TextMessage(data=json.dumps({"type": "stdout", "data_b64": "aGk="})))
    wire += server.send(
        TextMessage(data=json.dumps({"type": "exit", "exitcode": 3, "termsig": None}))
    )
    for byte in wire:
        state.receive_data(bytes([byte]))
    assert state.next_frame() == Output("stdout", b"hi")
    assert state.next_frame() == Exited(exitcode=3)
    assert (out, state.exited) == ([b"hi"], Exited(exitcode=3))


@pytest.mark.parametrize(
    ("status", "error"),
    [(401, GatewayRefused), (421, GatewayRefused), (503, BrokerUnavailable), (502, ProtocolError)],
)
def test_a_refused_upgrade_raises_the_typed_error(status: int, error: type[Exception]) -> None:
    state = WebSocketSessionState(GatewayAddress("ws://h:1"), ["cat"])
    server, _ = _gateway_side(state)
    body = json.dumps({"error": "nope", "detail": "because"}).encode()
    wire = server.send(
        RejectConnection(
            status_code=status,
            headers=[(b"content-length", str(len(body)).encode())],
            has_body=True,
        )
    )
    state.receive_data(wire)
    with pytest.raises(error, match="because"):
        state.receive_data(server.send(RejectData(data=body)))


def test_a_close_before_the_exit_is_a_protocol_error() -> None:
    state = WebSocketSessionState(GatewayAddress("ws://h:1"), ["cat"])
    server = _open(state)
    state.receive_data(server.send(CloseConnection(code=1011)))
    with pytest.raises(ProtocolError, match="closed the session before the exit"):
        state.next_frame()


def test_an_error_frame_raises_the_typed_error() -> None:
    state = WebSocketSessionState(GatewayAddress("ws://h:1"), ["cat"])
    server = _open(state)
    frame = {"type": "error", "error": "timeout", "detail": "too slow", "status": 504}
    with pytest.raises(Exception, match="too slow") as caught:
        state.receive_data(server.send(TextMessage(data=json.dumps(frame))))
    assert type(caught.value).__name__ == "Timeout"
