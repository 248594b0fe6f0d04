"""nginx with the real lua-resty-exec, for tests and benchmarks: one nginx (temporary
prefix, free loopback port, ``master_process off``) with a server block per site,
each including ``nginx/resty-exec-locations.conf`` (the tested configuration) and a
test-only location, ``/r/run``, that calls the library directly and reports all it
returned. The library is read from the reference folder, never copied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .nginx import NginxProcess, free_port, lua_module_missing

ROOT = Path(__file__).resolve().parent.parent.parent
MISC = ROOT / "misc"
#: Third-party reference material (lua-resty-exec, netstring.lua, the C sockexec and
#: its build script), never copied into the repository: ../shared/reference/README.md.
REFERENCE = Path(os.environ.get("SOCKEXEC_LUA_REF") or ROOT.parent / "shared" / "reference")
RESTY_EXEC_LIB = REFERENCE / "lua-resty-exec-3.0.3" / "lib"
NETSTRING_SRC = REFERENCE / "netstring.lua-1.0.6" / "src"


def missing() -> list[str]:
    """What the stack needs and this machine lacks (empty when all is there)."""
    messages = []
    if problem := lua_module_missing():
        messages.append(problem)
    wanted = (
        RESTY_EXEC_LIB / "resty" / "exec.lua",
        RESTY_EXEC_LIB / "resty" / "exec" / "socket.lua",
        NETSTRING_SRC / "netstring.lua",
    )
    if not all(path.is_file() for path in wanted):
        messages.append(
            f"lua-resty-exec 3.0.3 and netstring.lua 1.0.6 are not under {REFERENCE} "
            "(set SOCKEXEC_LUA_REF to the folder holding them)"
        )
    return messages


# /r/run?a=ARG&a=ARG...[&timeout=MS][&fatal=1][&callbacks=1]: runs argv through
# lua-resty-exec with the request body as stdin (nil when empty), with
# timeout_fatal = false as resty-exec-locations.conf sets it, or with the library's
# default (true) with fatal=1. The body is what the program wrote to stdout (through
# the callbacks with callbacks=1); the rest comes back in headers, Lua values as
# tostring() gives them ("nil" included).
HARNESS = r"""
        location = /r/run {
            client_max_body_size 16m;
            client_body_buffer_size 16m;  # in memory: get_body_data() has it
            content_by_lua_block {
                local args = ngx.req.get_uri_args()
                ngx.req.read_body()
                local opts = {
                    argv = type(args.a) == "table" and args.a or { args.a },
                    stdin = ngx.req.get_body_data(),
                    timeout = tonumber(args.timeout),
                }
                if args.fatal ~= "1" then opts.timeout_fatal = false end
                local calls = { stdout = {}, stderr = {} }
                if args.callbacks then
                    opts.stdout = function(data) table.insert(calls.stdout, data) end
                    opts.stderr = function(data) table.insert(calls.stderr, data) end
                end
                local prog = require("resty.exec").new(ngx.var.sockexec_socket)
                local res, err = prog(opts)
                if not res then
                    ngx.header["X-Error"] = ngx.escape_uri(tostring(err))
                    return
                end
                local stdout, stderr = res.stdout, res.stderr
                if args.callbacks then
                    ngx.header["X-Calls"] = #calls.stdout .. " " .. #calls.stderr
                    ngx.header["X-Res-Output"] = ngx.escape_uri(stdout .. "|" .. stderr)
                    stdout = table.concat(calls.stdout)
                    stderr = table.concat(calls.stderr)
                end
                ngx.header["X-Exitcode"] = tostring(res.exitcode)
                ngx.header["X-Termsig"] = tostring(res.termsig)
                ngx.header["X-Stderr"] = ngx.escape_uri(stderr)
                ngx.print(stdout)
            }
        }
"""

SERVER = """
    server {{
        listen 127.0.0.1:{port}{default};
        server_name {name};
        set $sockexec_socket {socket};
        set $sockexec_misc {misc};
        include {root}/nginx/resty-exec-locations.conf;
{harness}
    }}
"""


@dataclass(frozen=True)
class Site:
    """One server block: its name (the first is the default) and its variables."""

    name: str
    socket: Path
    misc: Path = MISC


class RestyNginx(NginxProcess):
    """nginx (temporary prefix, free loopback port, master_process off) with one server
    block per site, each including resty-exec-locations.conf and the /r/run harness."""

    def __init__(self, prefix: Path, sites: list[Site]) -> None:
        port = free_port()
        servers = "".join(
            SERVER.format(
                port=port,
                default=" default_server" if i == 0 else "",
                name=site.name,
                socket=site.socket,
                misc=site.misc,
                root=ROOT,
                harness=HARNESS,
            )
            for i, site in enumerate(sites)
        )
        super().__init__(prefix, port, servers, f"{RESTY_EXEC_LIB}/?.lua;{NETSTRING_SRC}/?.lua")
