"""OpenResty-style locations (nginx/exec-locations.conf) with a real nginx (temporary
prefix, free loopback port), the Lua client of clients/lua and a real broker."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from trio_websocket import open_websocket_url

from conftest import ROOT, Broker, GatewayProcess, pid_alive, require_tool

MODULES = Path("/usr/share/nginx/modules")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Nginx:
    def __init__(self, prefix: Path, broker: Broker, gateway_port: int | None = None) -> None:
        self.port = _free_port()
        self.proxy_port = _free_port()
        proxy = (
            f"""
    upstream sockexec_gateway {{ server 127.0.0.1:{gateway_port}; keepalive 4; }}
    server {{
        listen 127.0.0.1:{self.proxy_port};
        include {ROOT}/nginx/gateway-proxy.conf;
    }}"""
            if gateway_port
            else ""
        )
        self.prefix = prefix
        for sub in ("logs", "tmp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(f"""
load_module {MODULES}/ndk_http_module.so;
load_module {MODULES}/ngx_http_lua_module.so;
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    lua_package_path "{ROOT}/clients/lua/?.lua;/usr/share/lua/5.1/?.lua;;";
    server {{
        listen 127.0.0.1:{self.port};
        set $sockexec_socket {broker.path};
        set $sockexec_misc {ROOT}/misc;
        client_max_body_size 16m;
        client_body_buffer_size 16m;
        include {ROOT}/nginx/exec-locations.conf;
    }}{proxy}
}}
""")
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs/error.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while True:  # a condition poll: nginx has no readiness notification
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.proc.stderr.read().decode()}")  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start listening") from None
                time.sleep(0.02)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stderr is not None
        self.proc.stderr.close()

    def error_log(self) -> str:
        return (self.prefix / "logs/error.log").read_text(errors="replace")


@pytest.fixture
def nginx(broker: Broker, tmp_path: Path) -> Iterator[Nginx]:
    _require_nginx_lua()
    server = Nginx(tmp_path / "nginx", broker)
    yield server
    server.stop()


def _require_nginx_lua() -> None:
    require_tool("nginx")
    if not (MODULES / "ngx_http_lua_module.so").exists():
        message = "libnginx-mod-http-lua is not installed (the test command installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def proxied_gateway(broker: Broker, tmp_path: Path) -> Iterator[Nginx]:
    """nginx with gateway-proxy.conf in front of a real sockexec-gateway."""
    _require_nginx_lua()
    gateway = GatewayProcess(broker.path)
    server = Nginx(tmp_path / "nginx", broker, gateway_port=gateway.port)
    yield server
    server.stop()
    gateway.stop()


def _get(nginx: Nginx, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=60)
    try:
        conn.request("POST" if body is not None else "GET", path, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_uname(nginx: Nginx) -> None:
    expected = subprocess.run(["uname", "-a"], capture_output=True, check=True).stdout
    assert _get(nginx, "/uname") == (200, expected)


def test_argv_with_flags_is_not_shell_parsed(nginx: Nginx) -> None:
    status, body = _get(nginx, "/ls?dir=/etc")
    assert status == 200 and b"passwd" in body
    status, body = _get(nginx, "/ls?dir=%2Fnope%3B%20echo%20owned")
    assert status == 404 and b"owned\n" not in body and b"No such file" in body


def test_shell_with_a_fixed_script(nginx: Nginx) -> None:
    status, body = _get(nginx, "/shell?name=$(id)")
    assert status == 200
    assert body.startswith(b"hello, $(id)\nfrom ")


def test_eight_megabytes_through_cat_exactly(nginx: Nginx) -> None:
    payload = random.Random(8).randbytes(8_000_000)
    assert _get(nginx, "/cat", payload) == (200, payload)


def test_missing_program_is_a_502_with_the_brokers_message(nginx: Nginx) -> None:
    status, body = _get(nginx, "/missing")
    assert status == 502
    assert body == b"sockexec_py: no-such-program: program not found\n"


def test_broker_down_is_a_502_saying_so(nginx: Nginx, broker: Broker) -> None:
    broker.stop()
    status, body = _get(nginx, "/uname")
    assert status == 502
    assert body.startswith(b"sockexec: cannot connect to unix:")
    assert b"no such socket" in body


def test_slow_printer_is_streamed_as_it_prints(nginx: Nginx) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=60)
    conn.request("GET", "/slow?count=3&ms=1500")
    response = conn.getresponse()
    assert response.status == 200
    # The first line arrives while the program still has 3 s of printing to do:
    # read it with a deadline shorter than that.
    response.fp.raw._sock.settimeout(1.4)  # type: ignore[attr-defined]
    first = response.readline()
    assert first.endswith(b"line 1\n"), first
    response.fp.raw._sock.settimeout(30)  # type: ignore[attr-defined]
    rest = response.read()
    conn.close()
    assert rest.endswith(b"line 2\nline 3\n")


def test_fifty_parallel_requests(nginx: Nginx) -> None:
    expected = subprocess.run(["uname", "-a"], capture_output=True, check=True).stdout
    results: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def one() -> None:
        outcome = _get(nginx, "/uname")
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=one) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [(200, expected)] * 50


# -- the gateway behind nginx (gateway-proxy.conf) -----------------------------------


def test_gateway_one_shot_through_nginx(proxied_gateway: Nginx) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxied_gateway.proxy_port, timeout=30)
    conn.request("POST", "/v1/exec", body=json.dumps({"argv": ["echo", "via nginx"]}))
    response = conn.getresponse()
    result = json.loads(response.read())
    conn.close()
    assert response.status == 200
    assert (result["stdout"], result["exitcode"]) == ("via nginx\n", 0)


def test_gateway_ndjson_streams_through_nginx_unbuffered(proxied_gateway: Nginx) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxied_gateway.proxy_port, timeout=30)
    body = {"argv": ["sh", "-c", "echo $$; sleep 2; echo done"]}
    conn.request(
        "POST", "/v1/exec", body=json.dumps(body), headers={"Accept": "application/x-ndjson"}
    )
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
