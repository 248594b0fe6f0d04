"""Hypothesis stateful test of the protocol against a live broker: many interleaved
connections receive valid pieces, garbage, truncations, half-closes and closes in
any order; the broker never crashes and an unrelated session keeps working."""

from __future__ import annotations

import contextlib
import socket

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)

from sockexec_py.protocol import encode_request

from conftest import Broker, connect, parse_reply

SESSION = encode_request(["cat"], [b"hello", b"x" * 300]) + b"0:,"


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0
        self.garbled = False
        self.broken = False

    def send(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            self.sock.sendall(data)
        except OSError:
            self.broken = True  # the broker refused and closed: allowed


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the broker sent; a reset (it closed over our unread garbage) ends
    the reply like EOF, after the data queued before it."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while data := sock.recv(1 << 20):
            chunks.append(data)
    return b"".join(chunks)


class LiveBroker(RuleBasedStateMachine):
    broker: Broker

    clients = Bundle("clients")

    def __init__(self) -> None:
        super().__init__()
        self.open: list[Client] = []
        self.witness = connect(self.broker.path, timeout=10)
        self.witness.sendall(encode_request(["cat"], [b"w"]))
        assert self.witness.recv(100) == b"6:stdout,1:w,"

    @rule(target=clients)
    def connect(self) -> Client:
        client = Client(connect(self.broker.path, timeout=10))
        self.open.append(client)
        return client

    @rule(client=clients, size=st.integers(min_value=1, max_value=len(SESSION)))
    def send_valid(self, client: Client, size: int) -> None:
        piece = SESSION[client.sent : client.sent + size]
        client.sent += len(piece)
        client.send(piece)

    @rule(client=clients, garbage=st.binary(min_size=1, max_size=40))
    def send_garbage(self, client: Client, garbage: bytes) -> None:
        client.garbled = True
        client.send(garbage)

    @rule(client=consumes(clients))
    def hang_up(self, client: Client) -> None:
        client.sock.close()
        self.open.remove(client)

    @rule(client=consumes(clients))
    def half_close_and_read(self, client: Client) -> None:
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_WR)
        reply = _read_until_closed(client.sock)
        client.sock.close()
        self.open.remove(client)
        if not reply:
            # Only a client that left before sending a byte gets no reply at all.
            assert client.sent == 0 and not client.garbled
            return
        result = parse_reply(reply)
        if client.sent == len(SESSION) and not client.garbled:
            assert result.exitcode == 0
            assert result.stdout == b"hello" + b"x" * 300
        else:
            assert result.exitcode in (0, 125) or result.termsig == "TERM", reply

    @invariant()
    def unrelated_session_still_works(self) -> None:
        self.witness.sendall(b"2:ok,")
        assert self.witness.recv(100) == b"6:stdout,2:ok,"

    def teardown(self) -> None:
        for client in self.open:
            client.sock.close()
        self.witness.close()


@pytest.mark.slow
def test_live_broker_survives_any_interleaving(broker: Broker) -> None:
    LiveBroker.broker = broker
    run_state_machine_as_test(
        LiveBroker,
        settings=settings(
            max_examples=40,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
    broker.wait_idle()
