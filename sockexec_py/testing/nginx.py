"""A real nginx with ngx_lua for tests and benchmarks: a temporary prefix, a free
loopback port, ``master_process off``, the server blocks the caller writes, and
plain HTTP requests to it. The Lua client's tests and lua-resty-exec's both run on
it; what differs between them is only their server blocks and their Lua path."""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
from pathlib import Path

from .broker import HarnessError, wait_until

MODULES = Path("/usr/share/nginx/modules")

CONF = """
load_module {modules}/ndk_http_module.so;
load_module {modules}/ngx_http_lua_module.so;
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
    lua_package_path "{lua_path};/usr/share/lua/5.1/?.lua;;";
{servers}
}}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def lua_module_missing() -> str | None:
    """Why ngx_lua cannot be loaded here (None when it can)."""
    if not (MODULES / "ngx_http_lua_module.so").exists():
        return "libnginx-mod-http-lua is not installed (the test command installs it)"
    return None


class NginxProcess:
    """nginx serving ``servers`` (server blocks, written by the caller for
    :attr:`port`, which is chosen before) with ``lua_path`` first on the Lua path.

    Resource handling: started and listening when built (the port is polled: nginx
    has no readiness notification); :meth:`stop` is a graceful SIGQUIT, then SIGKILL
    past 20 s. Error handling: :class:`HarnessError` if nginx exits while starting.
    """

    def __init__(self, prefix: Path, port: int, servers: str, lua_path: str) -> None:
        self.port = port
        self.prefix = prefix
        for sub in ("logs", "tmp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(
            CONF.format(modules=MODULES, prefix=prefix, lua_path=lua_path, servers=servers)
        )
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs/error.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise HarnessError(f"nginx exited {self.proc.returncode}: {self.error_log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
            except ConnectionRefusedError:
                return False
            return True

        try:
            wait_until(listening, 20, "nginx to listen")
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)  # graceful: finish requests, then exit
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def error_log(self) -> str:
        return (self.prefix / "logs/error.log").read_text(errors="replace")

    def request(
        self, path: str, body: bytes | None = None, host: str | None = None, timeout: float = 60
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection (POST with a body, else GET)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Host": host} if host else {}
            conn.request("POST" if body is not None else "GET", path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()
