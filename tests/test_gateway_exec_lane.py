"""The front door's exec lane (gateway/exec_lane.py), through a real gateway and
broker: every answer it gives is the one Hypercorn's path gives (the same request
sent on a connection that began with another request, which the lane never sees);
what it does not take goes to Hypercorn with every byte, on the same connection;
pipelined requests, a client that leaves, the gateway's stop. And its head parser
against h11's, with hypothesis."""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sockexec_py.gateway.exec_lane import MAX_HEAD, parse_head

from conftest import Broker, GatewayProcess, wait_until

TOKEN = "lane-full-token"
SCOPED = "lane-status-token"  # may not exec
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
LANE_METRIC = "sockexec_gateway_exec_lane_requests_total"

Answer = tuple[int, list[tuple[str, str]], bytes]


def post(
    body: bytes | str | dict[str, object],
    *,
    query: str = "",
    headers: tuple[str, ...] = ("Content-Type: application/json",),
    token: str | None = TOKEN,
) -> bytes:
    """A ``POST /v1/exec`` as the lane takes it (Host, Content-Length, ``headers``)."""
    if isinstance(body, dict):
        body = json.dumps(body)
    data = body.encode() if isinstance(body, str) else body
    lines = [f"POST /v1/exec{'?' + query if query else ''} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [*headers, f"Content-Length: {len(data)}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


class Client:
    """One raw connection: requests sent as given, answers read by their length."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buffer = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _more(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def answer(self) -> Answer:
        """The next answer (status, headers as sent, body)."""
        while b"\r\n\r\n" not in self.buffer:
            assert self._more(), f"closed before an answer: {bytes(self.buffer)!r}"
        head, _, _ = bytes(self.buffer).partition(b"\r\n\r\n")
        del self.buffer[: len(head) + 4]
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
        if ("Transfer-Encoding", "chunked") in headers:  # as h11 writes it
            body = b""
            while chunk := self._take(int(self._line(), 16)):
                body += chunk
                self._line()
            self._line()
        else:
            body = self._take(int(dict(headers).get("content-length", "0")))
        return status, headers, body  # type: ignore[return-value]

    def _take(self, length: int) -> bytes:
        while len(self.buffer) < length:
            assert self._more(), "closed inside an answer"
        data = bytes(self.buffer[:length])
        del self.buffer[:length]
        return data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            assert self._more(), "closed inside an answer"
        line, _, _ = bytes(self.buffer).partition(b"\r\n")
        del self.buffer[: len(line) + 2]
        return line

    def ask(self, request: bytes) -> Answer:
        self.sock.sendall(request)
        return self.answer()

    def closed(self) -> bool:
        """Whether the gateway closes the connection (with nothing more to read)."""
        return not self._more() and not self.buffer


def comparable(answer: Answer) -> tuple[int, list[tuple[str, str]], object]:
    """An answer without what differs between two runs: the date, the duration."""
    status, headers, body = answer
    kept = [(name, value) for name, value in headers if name != "date"]
    try:
        document = json.loads(body)
    except ValueError:
        return status, kept, body
    if isinstance(document, dict):
        document.pop("duration_ms", None)
        if "content-length" in dict(kept):  # the duration's digits change the length
            kept = [(n, "*" if n == "content-length" else v) for n, v in kept]
    return status, kept, document


def lane_count(gateway: GatewayProcess) -> float:
    text = gateway.request("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})[2]
    found = re.search(rf"^{LANE_METRIC} (\S+)$", text.decode(), re.MULTILINE)
    assert found is not None
    return float(found[1])


@pytest.fixture
def lane(broker: Broker, tmp_path: Path) -> Iterator[GatewayProcess]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n{SCOPED} actions=status\n")
    process = GatewayProcess(
        broker.path, "--token-file", str(tokens), "--max-output", "2000", "--max-body", "4096"
    )
    process.log_until("listening")
    yield process
    process.stop()
    assert "Traceback" not in "".join(process.lines)


REQUESTS = {
    "ok": post({"argv": ["sh", "-c", "echo out; echo err >&2; exit 3"]}),
    "stdin": post({"argv": ["cat"], "stdin": "héllo\n"}),
    "stdin_b64": post({"argv": ["cat"], "stdin_b64": "AAEC/w=="}, query="encoding=base64"),
    "charset": post(
        {"argv": ["echo", "x"]}, headers=("Content-Type: application/json; charset=utf-8",)
    ),
    "signal": post({"argv": ["sh", "-c", "kill -TERM $$"]}),
    "no_program": post({"argv": ["/nonexistent/program"]}),
    "bad_json": post("{"),
    "not_object": post("[1]"),
    "unknown_field": post({"argv": ["true"], "bogus": 1}),
    "bad_timeout": post({"argv": ["true"], "timeout": -1}),
    "both_stdins": post({"argv": ["cat"], "stdin": "a", "stdin_b64": "YQ=="}),
    "empty_body": post(""),
    "wrong_type": post({"argv": ["true"]}, headers=("Content-Type: text/plain",)),
    "no_type": post({"argv": ["true"]}, headers=()),
    "no_token": post({"argv": ["true"]}, token=None),
    "wrong_token": post({"argv": ["true"]}, token="nope"),
    "scope": post({"argv": ["true"]}, token=SCOPED),
    "origin": post(
        {"argv": ["true"]}, headers=("Content-Type: application/json", "Origin: http://x")
    ),
    "too_much_output": post({"argv": ["head", "-c", "5000", "/dev/zero"]}),
    "timeout": post({"argv": ["sleep", "30"], "timeout": 0.3}),
    "bad_query": post({"argv": ["true"]}, query="encoding=rot13"),
    "keep_alive": post(
        {"argv": ["true"]}, headers=("Content-Type: application/json", "Connection: keep-alive")
    ),
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_the_lane_answers_as_hypercorn_does(lane: GatewayProcess, name: str) -> None:
    """The same request on a fresh connection (the lane) and after a first request
    (Hypercorn's, for the connection's life): the same status, headers and body,
    but for the date and the duration; the lane's counter says which served."""
    request = REQUESTS[name]
    before = lane_count(lane)
    fresh = Client(lane.port)
    try:
        by_lane = fresh.ask(request)
        again = fresh.ask(request)  # keep-alive: the lane's second request
    finally:
        fresh.close()
    assert lane_count(lane) == before + 2
    other = Client(lane.port)
    try:
        assert other.ask(HEALTH)[0] == 200
        by_hypercorn = other.ask(request)
    finally:
        other.close()
    assert lane_count(lane) == before + 2
    assert comparable(by_lane) == comparable(by_hypercorn) == comparable(again)
    assert 200 <= by_lane[0] < 600


NOT_OURS = {
    "expect": post({"argv": ["echo", "x"]}, headers=("Content-Type: application/json",)).replace(
        b"Host:", b"Expect: 100-continue\r\nHost:", 1
    ),
    "chunked": b"POST /v1/exec HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    + f"Authorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    + b"16\r\n"
    + b'{"argv": ["echo", "x"]}'[:22]
    + b"\r\n1\r\n}\r\n0\r\n\r\n",
    "ndjson": post(
        {"argv": ["echo", "x"]},
        headers=("Content-Type: application/json", "Accept: application/x-ndjson"),
    ),
    "get": f"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode(),
    "bare_lf": post({"argv": ["echo", "x"]}).replace(b"\r\n", b"\n"),
    "no_host": post({"argv": ["echo", "x"]}).replace(b"Host: 127.0.0.1\r\n", b""),
    "too_large": post({"argv": ["echo", "x" * 5000]}),
    "folded": post({"argv": ["echo", "x"]}).replace(b"Host: 127.0.0.1", b"Host:\r\n 127.0.0.1"),
    "close": post(
        {"argv": ["echo", "x"]}, headers=("Content-Type: application/json", "Connection: close")
    ),
}


@pytest.mark.parametrize("name", sorted(NOT_OURS))
def test_what_the_lane_does_not_take_goes_to_hypercorn_on_the_same_connection(
    lane: GatewayProcess, name: str
) -> None:
    """After one request served by the lane, a request it does not take (and the
    ones after it) get on that connection what Hypercorn answers them elsewhere."""
    request = NOT_OURS[name]
    count = 2 if name == "expect" else 1  # Hypercorn's "100 Continue" first
    before = lane_count(lane)
    elsewhere = Client(lane.port)
    try:
        assert elsewhere.ask(HEALTH)[0] == 200
        expected = [elsewhere.ask(request)] + [elsewhere.answer() for _ in range(count - 1)]
    finally:
        elsewhere.close()
    client = Client(lane.port)
    try:
        assert client.ask(REQUESTS["ok"])[0] == 200
        got = [client.ask(request)] + [client.answer() for _ in range(count - 1)]
        assert [comparable(a) for a in got] == [comparable(a) for a in expected]
        if name not in ("close", "no_host", "bare_lf"):  # and the connection goes on
            assert client.ask(REQUESTS["ok"])[0] == 200
    finally:
        client.close()
    assert lane_count(lane) == before + 1  # only the first


def test_pipelined_requests_are_answered_in_order(lane: GatewayProcess) -> None:
    """Three requests in one write, the last one for Hypercorn: three answers, in
    order, the first two by the lane."""
    before = lane_count(lane)
    requests = [
        post({"argv": ["echo", "one"]}),
        post({"argv": ["echo", "two"]}),
        HEALTH,
    ]
    client = Client(lane.port)
    try:
        client.sock.sendall(b"".join(requests))
        answers = [client.answer() for _ in requests]
    finally:
        client.close()
    assert [json.loads(a[2]).get("stdout") for a in answers[:2]] == ["one\n", "two\n"]
    assert json.loads(answers[2][2]) == {"status": "ok"}
    assert lane_count(lane) == before + 2


def test_a_body_sent_in_pieces_is_read_whole(lane: GatewayProcess) -> None:
    request = post({"argv": ["cat"], "stdin": "x" * 1000})
    client = Client(lane.port)
    try:
        for start in range(0, len(request), 97):
            client.sock.sendall(request[start : start + 97])
        status, _, body = client.answer()
    finally:
        client.close()
    assert (status, json.loads(body)["stdout"]) == (200, "x" * 1000)


def test_an_answer_before_the_whole_body_skips_the_rest(lane: GatewayProcess) -> None:
    """A wrong content type is refused before the body is read: the lane drops the
    rest of the body as it comes, and the next request on the connection is served."""
    request = post({"argv": ["cat"], "stdin": "y" * 3000}, headers=("Content-Type: text/plain",))
    head, _, body = request.partition(b"\r\n\r\n")
    client = Client(lane.port)
    try:
        client.sock.sendall(head + b"\r\n\r\n" + body[:10])
        assert client.answer()[0] == 415
        client.sock.sendall(body[10:])
        assert client.ask(post({"argv": ["echo", "next"]}))[0] == 200
    finally:
        client.close()


def test_a_client_that_leaves_ends_its_program_and_counts_499(
    lane: GatewayProcess, tmp_path: Path
) -> None:
    """Leaving while the program runs (or in the middle of the body) ends the
    broker session, as on Hypercorn's path: 499 in the metrics, the program gone."""
    pid_file = tmp_path / "pid"
    script = f"echo $$ > {pid_file}.new; mv {pid_file}.new {pid_file}; exec sleep 30"
    client = Client(lane.port)
    client.sock.sendall(post({"argv": ["sh", "-c", script]}))
    wait_until(pid_file.exists, 10, "the program to start")
    pid = int(pid_file.read_text())
    client.close()
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, "the program to end")
    partial = Client(lane.port)
    partial.sock.sendall(post({"argv": ["true"]})[:-3])
    partial.close()
    left = 'sockexec_gateway_requests_total{mode="oneshot",status="499"} 2.0'

    def counted() -> bool:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        return left in lane.request("GET", "/metrics", headers=headers)[2].decode()

    wait_until(counted, 10, left)


def test_the_gateways_stop_closes_an_idle_lane_connection_at_once(
    broker: Broker, tmp_path: Path
) -> None:
    """An idle keep-alive connection of the lane does not hold up a stop (Hypercorn
    closes its idle ones at once, the running ones get graceful_timeout)."""
    gateway = GatewayProcess(broker.path)
    client = Client(gateway.port)
    try:
        assert client.ask(post({"argv": ["true"]}, token=None))[0] == 200
        started = time.monotonic()
        gateway.proc.send_signal(signal.SIGTERM)
        assert client.closed()
        assert gateway.proc.wait(20) == 0
        assert time.monotonic() - started < 4  # graceful_timeout is 5 s
    finally:
        client.close()
        gateway.stop()


def test_without_the_lane_hypercorn_answers_everything(broker: Broker) -> None:
    gateway = GatewayProcess(broker.path, "--no-exec-lane")
    try:
        assert gateway.request("POST", "/v1/exec", body={"argv": ["true"]})[0] == 200
        text = gateway.request("GET", "/metrics")[2].decode()
        assert f"{LANE_METRIC} 0.0" in text
    finally:
        gateway.stop()


# -- the head parser against h11 ---------------------------------------------------

_NAMES = st.sampled_from(
    ["Host", "host", "Content-Type", "Content-Length", "Accept", "Connection", "Expect",
     "Transfer-Encoding", "Authorization", "X-Thing", "Bad Name", "Upgrade", ""]
)  # fmt: skip
_VALUES = st.one_of(
    st.sampled_from(
        ["127.0.0.1", "application/json", "12", "012", "+1", "-1", " 3 ", "keep-alive",
         "close", "chunked", "100-continue", "application/x-ndjson", "*/*", "", "a\tb"]
    ),
    st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=8),
)  # fmt: skip
_LINES = st.sampled_from(
    ["POST /v1/exec HTTP/1.1", "POST /v1/exec?encoding=base64 HTTP/1.1",
     "POST /v1/exec HTTP/1.0", "POST /v1/exec?a b HTTP/1.1", "POST /v1/exec?x#y HTTP/1.1",
     "POST /v1/exec  HTTP/1.1", "post /v1/exec HTTP/1.1", "POST /v1/exec?%zz HTTP/1.1"]
)  # fmt: skip


_FIELDS = st.tuples(_NAMES, _VALUES, st.sampled_from([": ", ":", " : ", ":  ", ": \t"]))


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(st.just("POST /v1/exec HTTP/1.1"), _LINES),
    st.one_of(st.just("127.0.0.1"), st.sampled_from(["localhost:8080", "", "a b", "x\x7f"])),
    st.one_of(st.just("12"), st.sampled_from(["0", "012", "4097", "1" * 13, "+1", " 5 ", "1,1"])),
    st.lists(_FIELDS, max_size=3),
    st.randoms(use_true_random=False),
    st.one_of(st.just("\r\n"), st.just("\n")),
)
@example("POST /v1/exec HTTP/1.1", "x", "3", [("Accept", "*/*", ": ")], random.Random(1), "\r\n")
def test_a_head_the_lane_takes_is_one_h11_reads_alike(
    line: str,
    host: str,
    length: str,
    extra: list[tuple[str, str, str]],
    order: random.Random,
    newline: str,
) -> None:
    """Whatever head the parser accepts, h11 (Hypercorn's parser) accepts too, with
    the same target, headers and body length: the lane never serves a request
    Hypercorn would have refused or read otherwise."""
    fields = [("Host", host, ": "), ("Content-Length", length, ": "), *extra]
    order.shuffle(fields)
    text = line + "\r\n" + "".join(f"{n}{sep}{v}{newline}" for n, v, sep in fields) + "\r\n"
    raw = text.encode("latin-1")
    if b"\r\n\r\n" not in raw:
        return
    taken = parse_head(raw, 4096)
    if taken is None:
        return
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(raw)
    event = connection.next_event()
    assert isinstance(event, h11.Request), (raw, event)
    assert event.method == b"POST"
    assert event.target == b"/v1/exec" + (b"?" + taken.query if taken.query else b"")
    assert [(n, v) for n, v in event.headers] == taken.headers
    lengths = [v for n, v in event.headers if n == b"content-length"]
    assert [int(v) for v in lengths] == [taken.length]
    assert taken.start == raw.index(b"\r\n\r\n") + 4 <= MAX_HEAD
