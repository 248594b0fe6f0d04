"""nginx + ngx_lua against a real broker: the locations of nginx/exec-locations.conf and
the Lua client of clients/lua, driven over HTTP by the standard library's client.

One nginx (temporary prefix, free loopback port, master_process off) and one broker
serve the module; server blocks chosen by the Host header give the failure cases
(broker down, wrong path to the helper programs) without restarting anything. Test-only
locations under /t/ call the Lua client directly (one-shot and duplex). A small Unix
socket peer written here (``FakeBroker``) sends replies no real broker sends, to check
the client's parsing of bad or unusual frames.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import http.client
import json
import os
import random
import socket
import subprocess
import sysconfig
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode

import pytest
import trio
from trio_websocket import open_websocket_url

from sockexec_py.testing.nginx import NginxProcess, free_port, lua_module_missing

from conftest import (
    IN_CI,
    MISC,
    ROOT,
    Broker,
    GatewayProcess,
    StartBroker,
    check_dying_program_cuts_the_response,
    check_lines_arrive_while_running,
    pid_alive,
    require_tool,
    running_children,
    wait_until,
)

# Test-only locations, in the default server: the Lua client called directly.
# /t/run?a=ARG&a=ARG...[&sock=PATH][&timeout=MS] runs argv with the request body as
# stdin; the body is stdout, the rest comes back in headers (URI-escaped text).
HARNESS = r"""
    location = /t/run {
        client_max_body_size 8m;
        client_body_buffer_size 8m;
        content_by_lua_block {
            local sockexec = require "sockexec"
            local args = ngx.req.get_uri_args()
            local argv = type(args.a) == "table" and args.a or { args.a }
            ngx.req.read_body()
            local res, err = sockexec.run(args.sock or ngx.var.sockexec_socket, argv, {
                stdin = ngx.req.get_body_data(),
                timeout = tonumber(args.timeout) or 20000,
            })
            if not res then
                ngx.header["X-Error"] = ngx.escape_uri(err)
                return
            end
            ngx.header["X-Exitcode"] = res.exitcode
            ngx.header["X-Termsig"] = res.termsig
            ngx.header["X-Signum"] = res.signum
            ngx.header["X-Stderr"] = ngx.escape_uri(res.stderr)
            ngx.print(res.stdout)
        }
    }

    location = /t/duplex {
        content_by_lua_block {
            local sockexec = require "sockexec"
            local s, err = sockexec.open(ngx.var.sockexec_socket, { "cat" }, { timeout = 300 })
            if not s then return ngx.say(err) end
            local log = {}
            local function note(a, b) log[#log + 1] = tostring(a) .. " " .. tostring(b) end
            note(s:receive())  -- cat has nothing to say yet: a timeout, not fatal
            for _, chunk in ipairs({ "hello\n", "again\n" }) do
                assert(s:send(chunk))
                note(s:receive())  -- the echo arrives while stdin is still open
            end
            assert(s:close_stdin())
            note(s:receive())
            note(s:receive())
            s:close()
            ngx.print(table.concat(log, "|"))
        }
    }
"""

SERVER = """
    server {{
        listen 127.0.0.1:{port}{default};
        server_name {name};
        set $sockexec_socket {socket};
        set $sockexec_misc {misc};
        include {root}/nginx/exec-locations.conf;
        {extra}
    }}
"""


def _require_nginx_lua() -> None:
    require_tool("nginx")
    if message := lua_module_missing():
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


class Nginx(NginxProcess):
    """A running nginx: the default server talks to ``broker``; named servers
    (``Host:``) are given as (name, socket path, misc path) for failure cases."""

    def __init__(
        self,
        prefix: Path,
        broker: Broker,
        gateway_port: int | None = None,
        others: tuple[tuple[str, Path, Path], ...] = (),
        harness: bool = False,
    ) -> None:
        port = free_port()
        common = {"port": port, "root": ROOT}
        servers = [
            SERVER.format(
                **common,
                default=" default_server",
                name="_",
                socket=broker.path,
                misc=MISC,
                extra=HARNESS if harness else "",
            )
        ]
        servers += [
            SERVER.format(**common, default="", name=name, socket=sock, misc=misc, extra="")
            for name, sock, misc in others
        ]
        if gateway_port:
            self.proxy_port = free_port()
            servers.append(f"""
    upstream sockexec_gateway {{ server 127.0.0.1:{gateway_port}; keepalive 4; }}
    upstream sockexec_gateway_monitor {{ server 127.0.0.1:{gateway_port}; }}
    server {{
        listen 127.0.0.1:{self.proxy_port};
        include {ROOT}/nginx/gateway-proxy.conf;
    }}""")
        super().__init__(prefix, port, "".join(servers), f"{ROOT}/clients/lua/?.lua")


@dataclass
class Stack:
    broker: Broker
    nginx: Nginx
    tmp: Path
    down_socket: Path  # where server "down.test" looks for the broker (nothing there)

    def request(
        self, path: str, body: bytes | None = None, host: str | None = None, timeout: float = 60
    ) -> tuple[int, dict[str, str], bytes]:
        return self.nginx.request(path, body, host, timeout)

    def run(
        self, *argv: str, stdin: bytes | None = None, **params: str
    ) -> tuple[dict[str, str], bytes]:
        """The Lua client's one-shot through /t/run: (headers, stdout)."""
        query = urlencode([("a", a) for a in argv] + list(params.items()))
        status, headers, body = self.request(f"/t/run?{query}", stdin)
        assert status == 200, (status, body)
        for name in ("X-Error", "X-Stderr"):
            if name in headers:
                headers[name] = unquote(headers[name])
        return headers, body

    def programs(self, name: bytes) -> list[int]:
        """The broker's running children whose command line mentions ``name``."""
        return running_children(self.broker.children(), name)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One broker and one nginx for the module (each costs about half a second to
    start); tests leave no program running behind them."""
    _require_nginx_lua()
    tmp = tmp_path_factory.mktemp("nginx")
    broker = Broker(tmp / "broker.sock", [])
    try:
        down = tmp / "nobody-listens.sock"
        nginx = Nginx(
            tmp / "prefix",
            broker,
            others=(
                ("down.test", down, MISC),
                ("misconfigured.test", broker.path, tmp / "no-such-dir"),
            ),
            harness=True,
        )
        try:
            yield Stack(broker, nginx, tmp, down)
            log = nginx.error_log()
        finally:
            nginx.stop()
        # ([crit] is how nginx logs a connect() to a missing socket: expected here.)
        for bad in ("[alert]", "[emerg]", "runtime error", "thread aborted"):
            assert bad not in log, log
    finally:
        code = broker.stop()
    broker_log = broker.log()
    assert "internal error" not in broker_log and "Traceback" not in broker_log, broker_log
    assert code == 0, f"broker exited {code}: {broker_log}"


# -- exec-locations.conf ------------------------------------------------------------


def test_uname(stack: Stack) -> None:
    expected = subprocess.run(["uname", "-a"], capture_output=True, check=True).stdout
    status, headers, body = stack.request("/uname")
    assert (status, body) == (200, expected)
    assert headers["Content-Type"] == "text/plain"


def test_ls_gets_the_query_value_as_one_argument(stack: Stack) -> None:
    odd = stack.tmp / "a dir; echo owned $(id)"
    odd.mkdir()
    (odd / "inside.txt").write_text("x")
    status, _, body = stack.request(f"/ls?dir={quote(str(odd))}")
    assert status == 200
    assert body.startswith(b"total ") and body.rstrip().endswith(b" inside.txt"), body
    # After "--", a value that looks like a flag is a name ls looks up: it fails (500).
    status, _, body = stack.request("/ls?dir=-R")
    assert (status, body) == (500, b"ls: cannot access '-R': No such file or directory\n")
    assert stack.request("/ls")[0] == 400


def test_shell_gets_request_data_as_a_positional_parameter(stack: Stack) -> None:
    status, _, body = stack.request("/shell?" + urlencode({"name": "$(id); exit 3"}))
    assert (status, body) == (200, b"hello, $(id); exit 3\n3\n")
    assert stack.request("/shell")[2] == b"hello, world\n3\n"


def test_cat_echoes_a_small_body_and_an_empty_one(stack: Stack) -> None:
    assert stack.request("/cat", b"hello\x00world\n")[::2] == (200, b"hello\x00world\n")
    assert stack.request("/cat", b"")[::2] == (200, b"")


def test_eight_megabytes_through_cat_exactly(stack: Stack) -> None:
    payload = random.Random(8).randbytes(8 << 20)
    status, headers, body = stack.request("/cat", payload)
    assert status == 200 and headers["Transfer-Encoding"] == "chunked"
    assert len(body) == len(payload) and body == payload


def test_slow_printer_lines_arrive_while_the_program_runs(stack: Stack) -> None:
    check_lines_arrive_while_running(stack.nginx.port, stack.programs, 750)


def test_http_client_going_away_stops_the_program(stack: Stack) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", stack.nginx.port, timeout=30)
    conn.request("GET", "/slow?count=100&ms=200")  # would print for 20 s
    response = conn.getresponse()
    assert response.readline() == b"line 1\n"
    assert stack.programs(b"slow-print")
    conn.close()
    # The next ngx.print/ngx.flush fails, the stdout callback returns false, the Lua
    # client closes the broker connection and the broker terminates the program.
    wait_until(lambda: not stack.programs(b"slow-print"), 10, "slow-print to be stopped")
    stopped = "slow-print: sockexec: stopped by the stdout callback"
    wait_until(lambda: stopped in stack.nginx.error_log(), 5, "the location's log line")


def test_program_dying_mid_stream_cuts_the_response_short(stack: Stack) -> None:
    check_dying_program_cuts_the_response(stack.nginx.port, stack.programs)
    assert "slow-print: killed by SIGTERM" in stack.nginx.error_log()  # logged before the cut


def test_missing_program_is_a_502_with_the_brokers_message(stack: Stack) -> None:
    status, _, body = stack.request("/slow?count=1", host="misconfigured.test")
    missing = stack.tmp / "no-such-dir" / "slow-print"
    assert (status, body) == (502, f"sockexec_py: {missing}: program not found\n".encode())


def test_broker_down_is_a_502_saying_so(stack: Stack) -> None:
    status, _, body = stack.request("/uname", host="down.test")
    assert status == 502
    assert (
        body
        == (
            f"sockexec: cannot connect to unix:{stack.down_socket}: "
            "no such file or directory (is the broker running?)\n"
        ).encode()
    )
    # The streamed locations answer the same way when nothing was sent yet.
    assert stack.request("/cat", b"x", host="down.test")[::2] == (502, body)


def test_bad_parameters_are_400(stack: Stack) -> None:
    for query in ("count=0", "count=1.5", "ms=-1", "count=x"):
        assert stack.request(f"/slow?{query}")[0] == 400, query


def test_fifty_parallel_requests(stack: Stack) -> None:
    uname = subprocess.run(["uname", "-a"], capture_output=True, check=True).stdout
    start = threading.Barrier(50, timeout=30)

    def one(i: int) -> tuple[int, bytes, bytes]:
        if i % 3 == 0:
            path, body, expected = "/uname", None, uname
        elif i % 3 == 1:
            path, body, expected = f"/shell?name=n{i}", None, f"hello, n{i}\n3\n".encode()
        else:
            body = os.urandom(1000 * i)
            path, expected = "/cat", body
        start.wait()
        status, _, got = stack.request(path, body)
        return status, got, expected

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    failures = [(i, r[0], r[1][:80]) for i, r in enumerate(results) if r[:2] != (200, r[2])]
    assert not failures


# -- the Lua client (test-only locations) ---------------------------------------------


def test_exit_status_stderr_and_signal_names(stack: Stack) -> None:
    headers, out = stack.run("sh", "-c", "echo out; echo err >&2; exit 3")
    assert (out, headers["X-Exitcode"], headers["X-Stderr"]) == (b"out\n", "3", "err\n")
    assert "X-Termsig" not in headers
    headers, _ = stack.run("sh", "-c", "kill -TERM $$")
    assert (headers["X-Termsig"], headers["X-Signum"]) == ("TERM", "15")
    assert "X-Exitcode" not in headers


def test_stdin_larger_than_what_the_program_reads(stack: Stack) -> None:
    # Sent by a writer thread; the program exits without reading it and the writer,
    # blocked on a connection the broker closed, is stopped: the result is normal.
    headers, out = stack.run("head", "-c", "5", stdin=b"abcdefgh" * (512 << 10))
    assert (out, headers.get("X-Exitcode")) == (b"abcde", "0"), headers


def test_timeout_fails_the_call_and_the_broker_stops_the_program(stack: Stack) -> None:
    headers, _ = stack.run("sleep", "30", timeout="300")
    assert headers["X-Error"] == "sockexec: no reply from the program for 300 ms"
    wait_until(lambda: not stack.programs(b"sleep"), 15, "sleep to be stopped")


def test_stale_socket_is_reported_as_refused(stack: Stack) -> None:
    stale = stack.tmp / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # bound, never listening: what a crashed server leaves
        headers, _ = stack.run("true", sock=str(stale))
    assert headers["X-Error"] == (
        f"sockexec: cannot connect to unix:{stale}: "
        "connection refused (stale socket: is the broker running?)"
    )


def test_duplex_session(stack: Stack) -> None:
    status, _, body = stack.request("/t/duplex")
    assert (status, body) == (
        200,
        b"nil timeout|stdout hello\n|stdout again\n|exitcode 0|nil closed",
    )


class FakeBroker:
    """A Unix socket peer that reads a request and answers with fixed bytes; with
    ``hold`` it keeps the connection open afterwards (until the test ends)."""

    def __init__(self, path: Path, reply: bytes, hold: bool) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.reply, self.hold = reply, hold
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(30)
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(30)
            request = b""
            while not request.endswith(b"0:,"):
                data = conn.recv(4096)
                if not data:
                    return
                request += data
            conn.sendall(self.reply)
            if self.hold:
                self.release.wait(30)

    def close(self) -> None:
        self.release.set()
        self.thread.join(30)
        self.listener.close()


@pytest.mark.parametrize(
    ("reply", "hold", "expected"),
    [
        # termsig as a number (--termsig-format number) is reported by name
        (b"6:stdout,2:hi,7:termsig,1:9,", False, {"X-Termsig": "KILL", "X-Signum": "9"}),
        (
            b"6:stdout,2:hi,",
            False,
            "sockexec: the broker closed the connection before the exit status",
        ),
        (
            b"6:stdout,2:hi,8:exitcode,",
            False,
            "sockexec: the broker closed the connection inside a pair",
        ),
        (b"6:stdout,5:hi", False, "sockexec: connection closed in the middle of a netstring"),
        # rejected while reading the digits, without waiting for the rest
        (
            b"99999999999999",
            True,
            "sockexec: protocol error: netstring longer than 67108864 bytes announced",
        ),
        (b"06:stdout,", True, 'sockexec: protocol error: bad netstring length "06:stdout,"'),
        (b"6 :stdout,", True, 'sockexec: protocol error: bad netstring length "6 :stdout,"'),
        (b"6:stdout;", True, "sockexec: protocol error: netstring not ended by ','"),
        (b"5:hello,1:x,", True, 'sockexec: protocol error: unknown pair type "hello"'),
        (b"8:exitcode,2:-1,", True, 'sockexec: protocol error: bad exitcode "-1"'),
    ],
)
def test_client_parses_strictly(
    stack: Stack, reply: bytes, hold: bool, expected: str | dict[str, str]
) -> None:
    path = stack.tmp / "fake.sock"
    peer = FakeBroker(path, reply, hold)
    try:
        headers, out = stack.run("anything", sock=str(path), timeout="20000")
    finally:
        peer.close()
        path.unlink()
    if isinstance(expected, str):
        assert headers.get("X-Error") == expected
    else:
        assert out == b"hi" and {k: headers.get(k) for k in expected} == expected


# -- the Lua client outside nginx (LuaJIT + LuaSocket) ---------------------------------

MULTIARCH = sysconfig.get_config_var("MULTIARCH") or ""
LUASOCKET_CPATH = f"/usr/lib/{MULTIARCH}/lua/5.1"
OUTSIDE_NGINX = r"""
package.path = ROOT .. "/clients/lua/?.lua;/usr/share/lua/5.1/?.lua;" .. package.path
package.cpath = CPATH .. "/?.so;" .. package.cpath
local sockexec = require "sockexec"
local out = {}
local function note(...)
    local t = { ... }
    for i = 1, select("#", ...) do t[i] = tostring(t[i]) end
    out[#out + 1] = table.concat(t, " ")
end
local r, e = sockexec.run(SOCKET, { "sh", "-c", "echo out; echo err >&2; exit 3" })
note(r.stdout, r.stderr, r.exitcode, e)
local big = string.rep("0123456789abcdef", 16384)  -- 256 KiB: sent before reading
r, e = sockexec.run(SOCKET, { "cat" }, { stdin = big })
note(r.stdout == big, e)
r, e = sockexec.run(SOCKET, { "sh", "-c", "kill -KILL $$" })
note(r.termsig, r.signum, r.exitcode)
local s = assert(sockexec.open(SOCKET, { "cat" }, { timeout = 300 }))
note(s:receive())
assert(s:send("hello"))
note(s:receive())
assert(s:close_stdin())
note(s:receive())
note(s:receive())
s:close()
note(sockexec.run(SOCKET .. ".gone", { "true" }))
return table.concat(out, "|")
"""


def test_lua_client_outside_nginx_with_luasocket(start_broker: StartBroker) -> None:
    """The LuaSocket fallback, run by the LuaJIT library nginx's Lua module uses."""
    luajit = ctypes.util.find_library("luajit-5.1")
    if luajit is None or not Path(LUASOCKET_CPATH, "socket/unix.so").exists():
        message = "LuaJIT or LuaSocket (Debian: lua-socket) is not installed"
        if IN_CI:
            pytest.fail(message + " (the test command installs it)")
        pytest.skip(message)
    broker = start_broker()
    lua = ctypes.CDLL(luajit, mode=ctypes.RTLD_GLOBAL)  # LuaSocket binds to its symbols
    lua.luaL_newstate.restype = ctypes.c_void_p
    lua.lua_tolstring.restype = ctypes.c_void_p
    state = ctypes.c_void_p(lua.luaL_newstate())
    try:
        lua.luaL_openlibs(state)
        prelude = f"local ROOT, CPATH, SOCKET = {json.dumps(str(ROOT))}, "
        prelude += f"{json.dumps(LUASOCKET_CPATH)}, {json.dumps(str(broker.path))}\n"
        status = lua.luaL_loadstring(state, (prelude + OUTSIDE_NGINX).encode())
        if status == 0:
            status = lua.lua_pcall(state, 0, 1, 0)
        size = ctypes.c_size_t()
        text = ctypes.string_at(lua.lua_tolstring(state, -1, ctypes.byref(size)), size.value)
    finally:
        lua.lua_close(state)
    assert status == 0, text
    assert text.decode().split("|") == [
        "out\n err\n 3 nil",
        "true nil",
        "KILL 9 nil",
        "nil timeout",
        "stdout hello",
        "exitcode 0",
        "nil closed",
        f"nil sockexec: cannot connect to unix:{broker.path}.gone: "
        "no such file or directory (is the broker running?)",
    ]


# -- the gateway behind nginx (gateway-proxy.conf) -----------------------------------


@pytest.fixture
def proxied_gateway(broker: Broker, tmp_path: Path) -> Iterator[Nginx]:
    """nginx with gateway-proxy.conf in front of a real sockexec-gateway."""
    _require_nginx_lua()
    gateway = GatewayProcess(broker.path, "--data-dir", str(tmp_path / "data"))
    server = Nginx(tmp_path / "nginx", broker, gateway_port=gateway.port)
    yield server
    server.stop()
    gateway.stop()


def _proxied(
    proxied_gateway: Nginx, method: str, path: str, body: Any = None, host: str | None = None
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", proxied_gateway.proxy_port, timeout=30)
    headers = {"Content-Type": "application/json", **({"Host": host} if host else {})}
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    response = conn.getresponse()
    result = json.loads(response.read())
    conn.close()
    return response.status, result


def test_a_monitor_through_nginx_gets_the_jobs_events(proxied_gateway: Nginx) -> None:
    """gateway-proxy.conf upgrades /v1/monitor on an upstream connection of its own,
    even when a request left a kept-alive one in nginx's cache, so the gateway's
    front door serves it; its events come through."""
    assert _proxied(proxied_gateway, "GET", "/healthz") == (200, {"status": "ok"})
    sock = socket.create_connection(("127.0.0.1", proxied_gateway.proxy_port), timeout=30)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            "GET /v1/monitor?types=finished HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate\r\n"
            f"Sec-WebSocket-Key: {key}\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        head = data.split(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 101")
        # The front door took it (the ASGI route would have agreed to deflate):
        # the upgrade came on a fresh upstream connection, not a kept-alive one.
        assert b"sec-websocket-extensions" not in head, head
        while b'"ready"' not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        status, accepted = _proxied(proxied_gateway, "POST", "/v1/jobs", {"argv": ["true"]})
        assert status == 202
        while accepted["id"].encode() not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    finally:
        sock.close()


def test_gateway_one_shot_through_nginx(proxied_gateway: Nginx) -> None:
    status, result = _proxied(proxied_gateway, "POST", "/v1/exec", {"argv": ["echo", "via nginx"]})
    assert status == 200
    assert (result["stdout"], result["exitcode"]) == ("via nginx\n", 0)
    assert _proxied(proxied_gateway, "GET", "/healthz") == (200, {"status": "ok"})


def test_gateway_behind_nginx_still_sees_the_clients_host(proxied_gateway: Nginx) -> None:
    # nginx passes the client's Host on, so a token-less gateway keeps refusing
    # DNS-rebound requests (Host: evil.example) that reach it through the proxy.
    for method, path in (("POST", "/v1/exec"), ("GET", "/healthz")):
        body = {"argv": ["true"]} if method == "POST" else None
        status, result = _proxied(proxied_gateway, method, path, body, "evil.test")
        assert (status, result["error"]) == (421, "misdirected_request"), path


def test_gateway_ndjson_streams_through_nginx_unbuffered(proxied_gateway: Nginx) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxied_gateway.proxy_port, timeout=30)
    body = {"argv": ["sh", "-c", "echo $$; sleep 2; echo done"]}
    headers = {"Accept": "application/x-ndjson", "Content-Type": "application/json"}
    conn.request("POST", "/v1/exec", body=json.dumps(body), headers=headers)
    response = conn.getresponse()
    pid = int(json.loads(response.readline())["data"])
    assert pid_alive(pid), "the first frame was held back until the program ended"
    frames = [json.loads(line) for line in response.read().splitlines()]
    conn.close()
    assert frames[-1] == {"type": "exit", "exitcode": 0, "termsig": None}


# trio-websocket leaves its socket to the garbage collector when the server closes
# first (as the gateway does after the exit frame).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_gateway_websocket_through_nginx(proxied_gateway: Nginx) -> None:
    url = f"ws://127.0.0.1:{proxied_gateway.proxy_port}/v1/exec/ws"
    with trio.fail_after(30):
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"argv": ["cat"]}))
            await ws.send_message("echo me")
            assert json.loads(await ws.get_message()) == {"type": "stdout", "data": "echo me"}
            await ws.send_message(json.dumps({"type": "close_stdin"}))
            assert json.loads(await ws.get_message())["exitcode"] == 0
