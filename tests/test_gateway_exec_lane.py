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
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h11
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sockexec_py.gateway.exec_head import MAX_HEAD, answer_head, parse_head

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
        self.asked = 0  # requests sent with ask()

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
        self.asked += 1
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


@pytest.fixture(scope="module")
def lane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One broker and gateway for the module's tests (each compares counts, not
    totals); neither may log a traceback."""
    work = tmp_path_factory.mktemp("lane")
    tokens = work / "tokens"
    tokens.write_text(f"{TOKEN}\n{SCOPED} actions=status\n")
    broker = Broker(work / "broker.sock", ())
    try:
        process = GatewayProcess(
            broker.path, "--token-file", str(tokens), "--max-output", "2000", "--max-body", "4096"
        )
        process.log_until("listening")
        yield process
        process.stop()
        assert "Traceback" not in "".join(process.lines)
    finally:
        code = broker.stop()
    log = broker.log()
    assert code == 0 and "internal error" not in log and "Traceback" not in log, log


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


def both_ways(port: int, steps: Callable[[Client], list[object]]) -> list[object]:
    """``steps`` run on a lane connection and on a Hypercorn one (after a first GET),
    at once; what they saw, which must be the same."""
    results: list[list[object] | BaseException | None] = [None, None]

    def run(index: int) -> None:
        client = Client(port)
        try:
            if index:
                assert client.ask(HEALTH)[0] == 200
            results[index] = steps(client)
        except BaseException as exc:  # raised again below, in the test's thread
            results[index] = exc
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    assert results[0] is not None and results[0] == results[1], results
    return results[0]  # type: ignore[return-value]


def test_an_answer_before_the_whole_body_ends_the_connection(lane: GatewayProcess) -> None:
    """A wrong content type is refused before the body is read: if the rest of the
    body has not come, the connection ends (it cannot be told from the next
    request); if it came, the next request is served."""
    request = post({"argv": ["cat"], "stdin": "y" * 3000}, headers=("Content-Type: text/plain",))
    head, _, body = request.partition(b"\r\n\r\n")

    def early(client: Client) -> list[object]:
        client.sock.sendall(head + b"\r\n\r\n" + body[:10])
        answer = comparable(client.answer())
        client.sock.settimeout(3)  # at once, not at the keep-alive timeout (5 s)
        return [answer, client.closed()]

    def whole(client: Client) -> list[object]:
        client.sock.sendall(request + post({"argv": ["echo", "next"]}))
        return [comparable(client.answer()), comparable(client.answer())]

    assert both_ways(lane.port, early)[1] is True
    assert [answer[0] for answer in both_ways(lane.port, whole)] == [415, 200]  # type: ignore[index]


HALF_CLOSED = {
    "pipelined": post({"argv": ["echo", "one"]}) + post({"argv": ["echo", "two"]}),
    "one": post({"argv": ["echo", "one"]}),
    "body_cut": post({"argv": ["echo", "one"]})[:-3],
    "head_cut": post({"argv": ["echo", "one"]})[:40],
}


@pytest.mark.parametrize("name", sorted(HALF_CLOSED))
def test_a_client_that_half_closes_gets_what_hypercorn_gives(
    lane: GatewayProcess, name: str
) -> None:
    """Its requests, then EOF (shutdown of its sending side): every answer until
    the gateway closes, the same both ways (a pipelined request waits for the
    answer before it, as in h11, so the first program runs to its end)."""

    def half_close(client: Client) -> list[object]:
        client.sock.sendall(HALF_CLOSED[name])
        client.sock.shutdown(socket.SHUT_WR)
        answers: list[object] = []
        while not client.closed():
            answers.append(comparable(client.answer()))
        return answers

    answers = both_ways(lane.port, half_close)
    statuses = [answer[0] for answer in answers]  # type: ignore[index]
    assert statuses == {"pipelined": [200, 499], "one": [499]}.get(name, [400])


def test_a_connection_ends_after_the_keep_alive_request_limit(lane: GatewayProcess) -> None:
    """Hypercorn's ``keep_alive_max_requests`` (1000, the first GET included on
    its side): the last answer says ``connection: close`` and the connection ends,
    here as there."""
    refused = post("{")  # 400 once the body is read: no broker session each

    def many(client: Client) -> list[object]:
        count = 999 if client.asked else 1000
        sender = threading.Thread(target=client.sock.sendall, args=(refused * count,))
        sender.start()
        answers = [client.answer() for _ in range(count)]
        sender.join(30)
        closes = [("connection", "close") in answer[1] for answer in answers]
        return [answers[0][0], client.asked + closes.index(True) + 1, client.closed()]

    assert both_ways(lane.port, many) == [400, 1000, True]


@pytest.mark.parametrize("stray", [b"\r\n", b" ", b"\x16\x03\x01", b"\x00"])
def test_a_stray_start_after_an_answer_gets_400_at_once(lane: GatewayProcess, stray: bytes) -> None:
    """A byte that cannot start a request (h11 refuses it before the line ends):
    Hypercorn's 400 and the end of the connection at once, here as there."""

    def stray_start(client: Client) -> list[object]:
        client.sock.sendall(REQUESTS["ok"] + stray)
        first = client.answer()[0]
        client.sock.settimeout(3)  # at once, not at the keep-alive timeout (5 s)
        second = comparable(client.answer())
        return [first, second, client.closed()]

    assert both_ways(lane.port, stray_start)[0::2] == [200, True]


def test_the_keep_alive_limit_counts_the_lanes_requests_after_a_hand_over(
    lane: GatewayProcess,
) -> None:
    """One lane request, then 999 for Hypercorn on the same connection: the
    thousandth answer says ``connection: close``, as on Hypercorn's path alone."""
    nope = b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    def mixed(client: Client) -> list[object]:
        count = 1000 - client.asked
        data = REQUESTS["bad_json"] + nope * (count - 1)
        sender = threading.Thread(target=client.sock.sendall, args=(data,))
        sender.start()
        answers = [client.answer() for _ in range(count)]
        sender.join(30)
        closes = [("connection", "close") in answer[1] for answer in answers]
        return [client.asked + closes.index(True) + 1, client.closed()]

    before = lane_count(lane)
    assert both_ways(lane.port, mixed) == [1000, True]
    assert lane_count(lane) == before + 1


def test_a_head_must_come_within_the_keep_alive_timeout(lane: GatewayProcess) -> None:
    """After an answer, the start of a head and then silence: the gateway closes the
    connection at the keep-alive timeout (Hypercorn's 5 s), here as there."""

    def stall(client: Client) -> list[object]:
        assert client.ask(REQUESTS["ok"])[0] == 200
        started = time.monotonic()
        client.sock.sendall(b"POST /v1/exec HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        return [client.closed(), 4 < time.monotonic() - started < 15]

    assert both_ways(lane.port, stall) == [True, True]


def test_reading_ahead_is_bounded_while_a_program_runs(
    lane: GatewayProcess, tmp_path: Path
) -> None:
    """A client that pushes bytes while its request runs: the gateway stops reading
    them (the kernel's buffers fill), on the lane as on Hypercorn."""
    pushed = 32 << 20

    def push(client: Client) -> list[object]:
        pid_file = tmp_path / f"pid-{client.asked}"
        script = f"echo $$ > {pid_file}.new; mv {pid_file}.new {pid_file}; exec sleep 30"
        client.sock.sendall(post({"argv": ["sh", "-c", script], "timeout": 3}))
        wait_until(pid_file.exists, 10, "the program to start")
        client.sock.setblocking(False)
        sent, chunk = 0, b"x" * 65536
        while sent < pushed:
            try:
                sent += client.sock.send(chunk)
            except BlockingIOError:
                if not select.select([], [client.sock], [], 1.0)[1]:
                    break  # nothing taken for a second: nobody reads
        return [sent < pushed // 2]

    assert both_ways(lane.port, push) == [True]


def test_a_stopping_gateway_answers_the_running_request_and_no_pipelined_one(
    broker: Broker, tmp_path: Path
) -> None:
    """SIGTERM while a request runs and two more wait behind it on the connection:
    its answer, then the end of the connection, here as on Hypercorn's path."""
    gateway = GatewayProcess(broker.path)
    clients = [Client(gateway.port), Client(gateway.port)]
    try:
        assert clients[1].ask(HEALTH)[0] == 200
        pid_files = [tmp_path / "lane", tmp_path / "hypercorn"]
        for client, pid_file in zip(clients, pid_files, strict=True):
            script = f"echo $$ > {pid_file}.new; mv {pid_file}.new {pid_file}; sleep 1"
            first = post({"argv": ["sh", "-c", script]}, token=None)
            client.sock.sendall(first + post({"argv": ["echo", "later"]}, token=None) * 2)
        for pid_file in pid_files:
            wait_until(pid_file.exists, 10, "the program to start")
        gateway.proc.send_signal(signal.SIGTERM)
        for client in clients:
            assert client.answer()[0] == 200
            assert client.closed()
        gateway.proc.kill()  # Hypercorn's side waits for its graceful_timeout (5 s)
    finally:
        for client in clients:
            client.close()
        gateway.stop()


def test_a_client_that_leaves_ends_its_program_and_counts_499(
    lane: GatewayProcess, tmp_path: Path
) -> None:
    """Leaving while the program runs (or in the middle of the body) ends the
    broker session, as on Hypercorn's path: 499 in the metrics, the program gone."""
    pid_file = tmp_path / "pid"
    script = f"echo $$ > {pid_file}.new; mv {pid_file}.new {pid_file}; exec sleep 30"
    before = left_count(lane)
    client = Client(lane.port)
    client.sock.sendall(post({"argv": ["sh", "-c", script]}))
    wait_until(pid_file.exists, 10, "the program to start")
    pid = int(pid_file.read_text())
    client.close()
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, "the program to end")
    partial = Client(lane.port)
    partial.sock.sendall(post({"argv": ["true"]})[:-3])
    partial.close()
    wait_until(lambda: left_count(lane) == before + 2, 10, "two more 499s")


def left_count(gateway: GatewayProcess) -> float:
    """The gateway's count of one-shot clients that left (499)."""
    text = gateway.request("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})[2]
    metric = r'^sockexec_gateway_requests_total\{mode="oneshot",status="499"\} (\S+)$'
    found = re.search(metric, text.decode(), re.MULTILINE)
    return float(found[1]) if found else 0.0


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


def test_an_answer_head_h11_would_refuse_is_not_written() -> None:
    """The lane writes only what h11 would: otherwise Hypercorn's 500 goes out."""
    json_type = (b"content-type", b"application/json")
    assert answer_head(200, [json_type], b"{}") == (
        b"HTTP/1.1 200 \r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
    )
    assert answer_head(200, [(b"content-length", b"2")], b"{}") is not None
    for bad in (
        [(b"x a", b"1")],
        [(b"x", b"a\r\nInjected: 1")],
        [(b"x", b"a\x0bb")],
        [(b"x", b" padded")],
        [(b"content-length", b"3")],
    ):
        assert answer_head(200, bad, b"{}") is None, bad
