"""The real lua-resty-exec 3.0.3 in a real nginx against real brokers.

The library is not vendored: it is read from ``SOCKEXEC_LUA_REF`` (default
``../shared/reference`` beside the repository), with netstring.lua 1.0.6 which it
requires. Without it the module skips, and fails under CI=true.

One nginx serves the module. Each server block includes nginx/resty-exec-locations.conf
(the tested configuration, with its two variables set) and a test-only location,
``/r/run``, that calls the library directly and reports everything it returned.
Server blocks chosen by ``Host:`` point at different brokers: the default one sends
``termsig`` as a name (the default, like the C sockexec), ``numbers.test`` runs with
``--termsig-format number``, ``deadline.test`` with ``-t 5`` (a stalled request ends
soon), ``down.test`` has no broker and ``misconfigured.test`` a wrong path to the
helper programs.

What lua-resty-exec does that these tests lean on (lib/resty/exec.lua and
lib/resty/exec/socket.lua of 3.0.3):
- it sends argv, all of stdin and ``0:,`` before it reads anything;
- its receive waits ``timeout`` (default 60000 ms) for the first netstring of a burst
  and 1 ms for each further one; a reply whose close reaches it later than that after
  the exit pair becomes the fatal error ``timeout`` unless ``timeout_fatal = false``
  (which the conf sets, and /r/run too unless asked for the default: a test must not
  fail one run in a few hundred because the machine was busy);
- it converts ``termsig`` with ``tonumber()``.
"""

from __future__ import annotations

import random
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlencode

import pytest

from sockexec_py.testing.resty import RestyNginx, Site, missing

from conftest import (
    IN_CI,
    Broker,
    check_dying_program_cuts_the_response,
    check_lines_arrive_while_running,
    require_tool,
    running_children,
    wait_until,
)


def _require_stack() -> None:
    """nginx with the Lua module, and the reference Lua libraries."""
    require_tool("nginx")
    messages = missing()
    if messages:
        if IN_CI:
            pytest.fail("; ".join(messages))
        pytest.skip("; ".join(messages))


@dataclass
class Outcome:
    """What lua-resty-exec returned, as /r/run reports it."""

    error: str | None
    stdout: bytes
    stderr: str | None
    exitcode: str | None  # tostring() of the Lua value: "0", "nil"...
    termsig: str | None
    headers: dict[str, str]


@dataclass
class Stack:
    names: Broker  # termsig as a name (the default)
    numbers: Broker  # --termsig-format number
    deadline: Broker  # -t 5
    nginx: RestyNginx
    tmp: Path
    down_socket: Path

    def run(
        self,
        *argv: str | bytes,
        stdin: bytes | None = None,
        host: str | None = None,
        fatal: bool = False,
        **params: str,
    ) -> Outcome:
        """lua-resty-exec's one-shot through /r/run (``fatal``: the library's default
        timeout_fatal = true instead of the conf's false)."""
        if fatal:
            params["fatal"] = "1"
        query = urlencode([("a", a) for a in argv] + list(params.items()))
        status, headers, body = self.nginx.request(f"/r/run?{query}", stdin, host)
        assert status == 200, (status, body)

        def header(name: str) -> str | None:
            value = headers.get(name)
            return None if value is None else unquote(value)

        return Outcome(
            header("X-Error"),
            body,
            header("X-Stderr"),
            header("X-Exitcode"),
            header("X-Termsig"),
            headers,
        )

    def programs(self, name: bytes) -> list[int]:
        """The default broker's running children whose command line mentions ``name``."""
        return running_children(self.names.children(), name)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Three brokers and one nginx for the module; tests leave no program running."""
    _require_stack()
    tmp = tmp_path_factory.mktemp("resty")
    brokers = [
        Broker(tmp / "names.sock", []),
        Broker(tmp / "numbers.sock", ["--termsig-format", "number"]),
        Broker(tmp / "deadline.sock", ["-t", "5"]),
    ]
    try:
        names, numbers, deadline = brokers
        down = tmp / "nobody-listens.sock"
        nginx = RestyNginx(
            tmp / "prefix",
            [
                Site("_", names.path),
                Site("numbers.test", numbers.path),
                Site("deadline.test", deadline.path),
                Site("down.test", down),
                Site("misconfigured.test", names.path, tmp / "no-such-dir"),
            ],
        )
        try:
            yield Stack(names, numbers, deadline, nginx, tmp, down)
            log = nginx.error_log()
        finally:
            nginx.stop()
        for bad in ("[alert]", "[emerg]", "runtime error", "thread aborted"):
            assert bad not in log, log
    finally:
        codes = [broker.stop() for broker in brokers]
    for broker, code in zip(brokers, codes, strict=True):
        broker_log = broker.log()
        assert "internal error" not in broker_log and "Traceback" not in broker_log, broker_log
        assert code == 0, f"broker exited {code}: {broker_log}"


# -- resty-exec-locations.conf ---------------------------------------------------------


def test_uname(stack: Stack) -> None:
    expected = subprocess.run(["uname", "-a"], capture_output=True, check=True).stdout
    status, headers, body = stack.nginx.request("/uname")
    assert (status, body) == (200, expected)
    assert headers["Content-Type"] == "text/plain"


def test_broker_down_is_a_502_with_the_librarys_message(stack: Stack) -> None:
    # lua-resty-exec passes ngx_lua's connect() error on as it is.
    assert stack.nginx.request("/uname", host="down.test")[::2] == (
        502,
        b"sockexec: no such file or directory\n",
    )


def test_ls_gets_the_query_value_as_one_argument(stack: Stack) -> None:
    odd = stack.tmp / "a dir; echo owned $(id)"
    odd.mkdir()
    (odd / "inside.txt").write_text("x")
    status, _, body = stack.nginx.request(f"/ls?dir={quote(str(odd))}")
    assert status == 200
    assert body.startswith(b"total ") and body.rstrip().endswith(b" inside.txt"), body
    status, _, body = stack.nginx.request("/ls?dir=-R")
    assert (status, body) == (500, b"ls: cannot access '-R': No such file or directory\n")
    assert stack.nginx.request("/ls")[0] == 400


def test_shell_gets_request_data_as_a_positional_parameter(stack: Stack) -> None:
    status, _, body = stack.nginx.request("/shell?" + urlencode({"name": "$(id); exit 3"}))
    assert (status, body) == (200, b"hello, $(id); exit 3\n3\n")
    assert stack.nginx.request("/shell")[::2] == (200, b"hello, world\n3\n")


def test_cat_echoes_small_bodies_and_refuses_large_ones(stack: Stack) -> None:
    body = random.Random(1).randbytes(500 << 10) + b"\x00\n"
    assert stack.nginx.request("/cat", body)[::2] == (200, body)
    # An empty body is stdin = nil for lua-resty-exec (never ""; see the conf).
    assert stack.nginx.request("/cat", b"")[::2] == (200, b"")
    assert stack.nginx.request("/cat", b"x" * ((512 << 10) + 1))[0] == 413


def test_slow_lines_arrive_while_the_program_runs(stack: Stack) -> None:
    check_lines_arrive_while_running(stack.nginx.port, stack.programs, 500)


def test_slow_program_dying_mid_stream_cuts_the_response_short(stack: Stack) -> None:
    check_dying_program_cuts_the_response(stack.nginx.port, stack.programs)
    assert "slow-print: killed by a signal" in stack.nginx.error_log()  # logged before the cut


def test_slow_missing_program_is_a_502_with_the_brokers_message(stack: Stack) -> None:
    status, _, body = stack.nginx.request("/slow?count=1", host="misconfigured.test")
    missing = stack.tmp / "no-such-dir" / "slow-print"
    assert (status, body) == (502, f"sockexec_py: {missing}: program not found\n".encode())


def test_slow_bad_parameters_are_400(stack: Stack) -> None:
    for query in ("count=0", "count=1.5", "ms=-1", "count=x"):
        assert stack.nginx.request(f"/slow?{query}")[0] == 400, query


# -- lua-resty-exec called directly (/r/run) ---------------------------------------------


def test_one_shot_stdout_stderr_exit_status(stack: Stack) -> None:
    outcome = stack.run("sh", "-c", "echo out; echo err >&2; exit 3")
    assert (outcome.error, outcome.stdout, outcome.stderr) == (None, b"out\n", "err\n")
    assert (outcome.exitcode, outcome.termsig) == ("3", "nil")
    # Bytes of any value in argv and output, one argv element each.
    odd = b"a b\t\xff\xfe\x01\n'\"$(id)"
    outcome = stack.run("printf", "%s|", odd, b"", b"-n")
    assert (outcome.stdout, outcome.exitcode) == (odd + b"||-n|", "0")


def test_stdin(stack: Stack) -> None:
    payload = random.Random(2).randbytes(65536)
    outcome = stack.run("cat", stdin=payload)
    assert (outcome.stdout, outcome.exitcode) == (payload, "0")
    assert stack.run("wc", "-c", stdin=payload).stdout == b"65536\n"
    # The program exits without reading most of stdin: still a normal result.
    outcome = stack.run("head", "-c", "5", stdin=b"abcdefgh" * (64 << 10))
    assert (outcome.error, outcome.stdout, outcome.exitcode) == (None, b"abcde", "0")


def test_callbacks_get_the_output_and_the_result_keeps_none(stack: Stack) -> None:
    script = "for i in 1 2 3; do echo out$i; echo err$i >&2; done; exit 7"
    outcome = stack.run("sh", "-c", script, callbacks="1")
    assert outcome.stdout == b"out1\nout2\nout3\n"
    assert outcome.stderr == "err1\nerr2\nerr3\n"
    assert outcome.exitcode == "7"
    stdout_calls, stderr_calls = map(int, outcome.headers["X-Calls"].split())
    assert stdout_calls >= 1 and stderr_calls >= 1
    # With a callback, res.stdout and res.stderr are empty strings.
    assert unquote(outcome.headers["X-Res-Output"]) == "|"


def test_sixteen_mebibytes_of_output(stack: Stack) -> None:
    payload = random.Random(16).randbytes(16 << 20)
    source = stack.tmp / "sixteen.bin"
    source.write_bytes(payload)
    outcome = stack.run("cat", str(source))
    assert (outcome.error, outcome.exitcode) == (None, "0")
    assert len(outcome.stdout) == len(payload) and outcome.stdout == payload


def test_eight_mebibytes_of_stdin_through_cat(stack: Stack) -> None:
    # lua-resty-exec sends all of stdin before it reads: the broker must take it all
    # while the output waits (SPEC section 7, spill instead of stall). Without the
    # spool it stopped reading at about 1 MiB, and the library's send and reads
    # waited until the broker's -t (5 s on this broker) ended the program.
    payload = random.Random(8).randbytes(8 << 20)
    outcome = stack.run("cat", stdin=payload, host="deadline.test")
    assert (outcome.error, outcome.exitcode) == (None, "0")
    assert len(outcome.stdout) == len(payload) and outcome.stdout == payload


@pytest.mark.parametrize(("name", "number"), [("TERM", "15"), ("KILL", "9"), ("SEGV", "11")])
def test_termsig_is_a_number_only_with_termsig_format_number(
    stack: Stack, name: str, number: str
) -> None:
    script = f"ulimit -c 0; echo before; kill -{name} $$"
    # Default (a name, as the C sockexec sends): tonumber("TERM") is nil, so the
    # result says neither an exit code nor a signal.
    outcome = stack.run("sh", "-c", script)
    assert (outcome.error, outcome.stdout) == (None, b"before\n")
    assert (outcome.exitcode, outcome.termsig) == ("nil", "nil")
    # --termsig-format number: res.termsig is the signal number.
    outcome = stack.run("sh", "-c", script, host="numbers.test")
    assert (outcome.error, outcome.stdout) == (None, b"before\n")
    assert (outcome.exitcode, outcome.termsig) == ("nil", number)


def test_timeout_fatal_false_waits_past_the_timeout(stack: Stack) -> None:
    # Its receive timeout is fatal by default; with timeout_fatal = false the library
    # keeps reading until the broker closes: `timeout` no longer bounds the call (the
    # broker's -t does).
    script = "sleep 0.5; echo done"
    assert stack.run("sh", "-c", script, timeout="100", fatal=True).error == "timeout"
    outcome = stack.run("sh", "-c", script, timeout="100")
    assert (outcome.error, outcome.stdout, outcome.exitcode) == (None, b"done\n", "0")
    wait_until(lambda: not stack.programs(b"sleep 0.5"), 15, "the first sleep to be stopped")


# -- 50 parallel requests ----------------------------------------------------------------
#
# lua-resty-exec waits 1 ms for each netstring after the first of a burst; when the
# broker's close reaches it later than that after the exit pair, its next receive
# finds the close on its first read and reports "timeout" (socket.lua, receive), which
# exec.lua makes fatal unless timeout_fatal = false. How often that happens with the
# defaults depends on scheduling, not on correctness: the count is printed (a bench
# row), never asserted, and anything else going wrong is a failure.
#
# With timeout_fatal = false (what resty-exec-locations.conf sets), exec.lua ignores
# "timeout" and calls receive again, which returns "closed" once the library has seen
# the close: a late close ends the loop normally. A netstring split in its length
# digits is waited for again too (socket.lua keeps the digits read so far). One case
# stays fatal, silently: a netstring body arriving in parts more than 1 ms apart
# (socket.lua subtracts the size it asked for, not the size it got, and drops the
# reply). The broker never causes it: every pair leaves whole, in one sendmsg that
# fits the socket buffer (tests/test_pairs.py). So with it no request may fail.

PARALLEL = 50


def _in_parallel(count: int, one: Callable[[int], str | None]) -> list[str | None]:
    """Run ``one(i)`` for i in range(count) from threads released together; returns
    what each returned: None for a correct result, else what went wrong."""
    start = threading.Barrier(count, timeout=30)

    def released(i: int) -> str | None:
        start.wait()
        return one(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(released, range(count)))


def test_fifty_parallel_requests_to_the_locations(stack: Stack) -> None:
    uname = subprocess.run(["uname", "-a"], capture_output=True, check=True).stdout

    def one(i: int) -> str | None:
        if i % 3 == 0:
            path, body, expected = "/uname", None, uname
        elif i % 3 == 1:
            path, body, expected = f"/shell?name=n{i}", None, f"hello, n{i}\n3\n".encode()
        else:
            body = random.Random(i).randbytes(1000 * i)
            path, expected = "/cat", body
        status, _, got = stack.nginx.request(path, body)
        return None if (status, got) == (200, expected) else f"{path}: {status} {got[:80]!r}"

    assert [r for r in _in_parallel(PARALLEL, one) if r is not None] == []


SEQ_1000 = "".join(f"{n}\n" for n in range(1, 1001)).encode()


def _mixed_workload(stack: Stack, fatal: bool = False) -> Callable[[int], str | None]:
    """The issue's mix: `echo`, `cat` of a few KB, `seq 1000`. Returns lua-resty-exec's
    error, "wrong output" or None."""

    def one(i: int) -> str | None:
        if i % 3 == 0:
            outcome, expected = stack.run("echo", f"hello {i}", fatal=fatal), b"hello %d\n" % i
        elif i % 3 == 1:
            expected = random.Random(i).randbytes(2000 + 100 * i)
            outcome = stack.run("cat", stdin=expected, fatal=fatal)
        else:
            outcome, expected = stack.run("seq", "1000", fatal=fatal), SEQ_1000
        if outcome.error is not None:
            return outcome.error
        return None if (outcome.stdout, outcome.exitcode) == (expected, "0") else "wrong output"

    return one


def test_fifty_parallel_one_shots_with_the_defaults(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _in_parallel(PARALLEL, _mixed_workload(stack, fatal=True))
    assert [r for r in results if r not in (None, "timeout")] == []
    with capsys.disabled():  # the count is the result, shown even when it passes
        timeouts = results.count("timeout")
        print(f"\nlua-resty-exec defaults: {timeouts} of {PARALLEL} parallel requests 'timeout'")


def test_fifty_parallel_one_shots_with_timeout_fatal_false(stack: Stack) -> None:
    results = _in_parallel(PARALLEL, _mixed_workload(stack))
    assert [r for r in results if r is not None] == []
