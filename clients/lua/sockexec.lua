-- sockexec.lua: a small, dependency-free client of the sockexec protocol, as spoken
-- by sockexec_py and the C sockexec 3.x. Written from the protocol (SPEC §1-§3):
--
--   request  <argc> <argv[0]> ... <argv[argc-1]> <stdin chunk>... 0:,
--   reply    (type, data) pairs: stdout / stderr chunks, then exitcode or termsig,
--            after which the broker closes the connection
--
-- every item being a netstring `<decimal length>:<bytes>,`.
--
-- Transport: inside nginx (ngx_lua >= 0.10.14, OpenResty >= 1.15.8) it uses cosockets
-- and never blocks the worker; outside nginx it uses LuaSocket (`socket.unix`) if it
-- is installed, and blocks.
--
-- One-shot:
--
--   local sockexec = require "sockexec"
--   local res, err = sockexec.run("/run/sockexec.sock", { "uname", "-a" })
--   -- res.stdout, res.stderr (strings), res.exitcode (number, nil after a signal),
--   -- res.termsig ("TERM", "KILL"... nil after a normal exit), res.signum (15, 9...)
--
--   options (all optional):
--     stdin    a string, an array of strings, or a function returning the next chunk
--              (nil at the end, or nil and an error to give up)
--     stdout   function(data) called with each chunk as it arrives, instead of
--     stderr   collecting it in res; returning false (and a reason) stops the
--              program: the connection is closed and run returns nil, reason
--     timeout  milliseconds any single wait may last (connect, a send, a receive):
--              a program silent for longer fails the call; default 60000
--     max_frame  largest netstring accepted from the broker, default 64 MiB
--
--   `exec` is another name for `run`, `connect` for `open`.
--
-- Duplex (talk to a running program):
--
--   local s, err = sockexec.open("/run/sockexec.sock", { "cat" }, { timeout = 5000 })
--   s:send("hello\n")              -- a stdin chunk (the program started already)
--   local kind, data = s:receive() -- "stdout", "hello\n"
--   s:close_stdin()
--   kind, data = s:receive()       -- "exitcode", 0 (a number; "termsig" gives a name)
--   s:receive()                    -- nil, "closed": the session is over
--   s:close()                      -- always; closing early terminates the program
--
--   receive() returns kind, data or nil, err. err "timeout" (nothing arrived within
--   the timeout) leaves the session usable; any other error ends it.
--
-- Writing stdin while reading: the broker keeps small buffers (SPEC §7), so a client
-- that sends a large stdin to a program echoing it (cat, gzip) without reading the
-- output stalls. Inside nginx, run() writes stdin from a second light thread
-- (ngx.thread.spawn) while it reads, so any size goes through. Outside nginx
-- (LuaSocket), run() sends all of stdin first: keep stdin for such programs under
-- about 1 MiB there, or use a duplex session and alternate send and receive.
--
-- Errors are returned, never raised, as one line starting with "sockexec: ", e.g.
--   sockexec: cannot connect to unix:/run/sockexec.sock: no such file or directory
--     (is the broker running?)
-- except for the broker's own refusals, which are a normal result (exit 125/126/127
-- and a "sockexec_py: ..." line on stderr): broker_error(res, err) turns both into
-- the message to show, and returns nil when the program ran.

local M = { _VERSION = "0.2.0" }

local type, tostring, tonumber, setmetatable, pcall, require, pairs, select =
    type, tostring, tonumber, setmetatable, pcall, require, pairs, select
local concat = table.concat
local find, sub, byte, format, match, lower =
    string.find, string.sub, string.byte, string.format, string.match, string.lower

local ngx = rawget(_G, "ngx")
local in_nginx = type(ngx) == "table" and type(ngx.socket) == "table"
    and ngx.socket.tcp ~= nil

local DEFAULT_TIMEOUT = 60000
local DEFAULT_MAX_FRAME = 64 * 1024 * 1024
local READ_SIZE = 65536    -- most bytes taken from the socket at once
local STDIN_CHUNK = 65536  -- stdin goes out in netstrings of at most this size
local INLINE_STDIN = 65536 -- a stdin this small is sent with the argv, no thread

-- Signal numbers (Linux on x86, ARM, RISC-V...), for brokers run with
-- --termsig-format number: res.termsig is always the name, res.signum the number.
M.signals = {
    HUP = 1, INT = 2, QUIT = 3, ILL = 4, TRAP = 5, ABRT = 6, BUS = 7, FPE = 8,
    KILL = 9, USR1 = 10, SEGV = 11, USR2 = 12, PIPE = 13, ALRM = 14, TERM = 15,
    STKFLT = 16, CHLD = 17, CONT = 18, STOP = 19, TSTP = 20, TTIN = 21, TTOU = 22,
    URG = 23, XCPU = 24, XFSZ = 25, VTALRM = 26, PROF = 27, WINCH = 28, IO = 29,
    PWR = 30, SYS = 31,
}
local signal_names = {}
for name, number in pairs(M.signals) do signal_names[number] = name end

local KINDS = { stdout = true, stderr = true, exitcode = true, termsig = true, unknown = true }

local function fail(fmt, ...)
    return nil, "sockexec: " .. format(fmt, ...)
end

-- A short, printable excerpt of bytes from the peer, for error messages:
-- quoted, with \ and " escaped and other unprintable bytes as \ddd.
local function escape_byte(c)
    if c == "\\" or c == '"' then return "\\" .. c end
    return format("\\%03d", byte(c))
end

local function excerpt(s)
    local text = sub(s, 1, 16):gsub('[%c"\\\128-\255]', escape_byte)
    return '"' .. text .. '"'
end

--------------------------------------------------------------------------------
-- Transports. Both offer receiveany(max) (whatever arrived, at least one byte),
-- receive(n) (exactly n bytes; on failure nil, err, partial), send(string or array
-- of strings) and close(), with ngx_lua's error strings ("closed", "timeout"...).

local function cosocket_open(path, timeout)
    local ok, sock = pcall(ngx.socket.tcp)
    if not ok then
        return fail("cosockets are not available here (%s): call it from a content, "
            .. "access, rewrite or timer handler", tostring(sock))
    end
    sock:settimeouts(timeout, timeout, timeout)
    local called, connected, err = pcall(sock.connect, sock, "unix:" .. path)
    if not called then  -- e.g. "API disabled in the context of init_by_lua*"
        return fail("cosockets are not available here (%s)", tostring(connected))
    end
    if not connected then return nil, err end
    return sock
end

local LuaSocket = {}
LuaSocket.__index = LuaSocket

function LuaSocket:receiveany(max)
    local sock = self.sock
    if not sock:dirty() then
        local _, _, err = self.socket.select({ sock }, nil, self.timeout)
        if err then return nil, err end
    end
    sock:settimeout(0)
    local data, err, partial = sock:receive(max)
    sock:settimeout(self.timeout)
    if data then return data end
    if partial and partial ~= "" then return partial end
    return nil, err
end

function LuaSocket:receive(n)
    return self.sock:receive(n)
end

function LuaSocket:send(data)
    if type(data) == "table" then data = concat(data) end
    local sent, err = self.sock:send(data)
    if not sent then return nil, err end
    return sent
end

function LuaSocket:close()
    return self.sock:close()
end

local function luasocket_open(path, timeout)
    local ok_socket, socket = pcall(require, "socket")
    local ok_unix, unix = pcall(require, "socket.unix")
    if not (ok_socket and ok_unix) then
        return fail("outside nginx this client needs LuaSocket (require \"socket.unix\"): %s",
            tostring(ok_socket and unix or socket):match("^[^\n]*"))
    end
    local create = type(unix) == "table" and unix.stream or unix
    local sock, err = create()
    if not sock then return nil, err end
    sock:settimeout(timeout / 1000)
    local connected, cerr = sock:connect(path)
    if not connected then
        sock:close()
        return nil, cerr
    end
    return setmetatable({ sock = sock, socket = socket, timeout = timeout / 1000 }, LuaSocket)
end

local HINTS = {
    ["no such file or directory"] = " (is the broker running?)",
    ["connection refused"] = " (stale socket: is the broker running?)",
    ["permission denied"] = " (the socket's mode and group must let this user in: see -M)",
}

local function open_transport(path, timeout)
    local conn, err
    if in_nginx then
        conn, err = cosocket_open(path, timeout)
    else
        conn, err = luasocket_open(path, timeout)
    end
    if conn then return conn end
    if find(err, "^sockexec: ") then return nil, err end
    err = lower(sub(err, 1, 1)) .. sub(err, 2)
    return fail("cannot connect to unix:%s: %s%s", path, err, HINTS[err] or "")
end

--------------------------------------------------------------------------------
-- Netstrings in: a buffer filled in bulk (receiveany), frames cut out of it; a
-- payload that has not fully arrived is completed with one receive(n).

local Reader = {}
Reader.__index = Reader

local function new_reader(conn, max_frame)
    return setmetatable({
        conn = conn, buf = "", pos = 1, max_frame = max_frame,
        max_digits = #tostring(max_frame),
    }, Reader)
end

-- Returns the next payload, or nil and an error: "closed" (the peer closed before a
-- frame began), "timeout" (the frame is kept and a later call resumes it), or a
-- "sockexec: ..." message.
function Reader:read()
    local colon
    while true do
        local buf, pos = self.buf, self.pos
        colon = find(buf, ":", pos, true)
        local bad = find(buf, "[^0-9]", pos)
        if bad and bad ~= colon then
            return fail("protocol error: bad netstring length %s", excerpt(sub(buf, pos)))
        end
        local ndigits = (colon or #buf + 1) - pos
        if ndigits > self.max_digits then
            return fail("protocol error: netstring longer than %d bytes announced",
                self.max_frame)
        end
        if colon then break end
        local data, err = self.conn:receiveany(READ_SIZE)
        if not data then
            if err == "closed" and ndigits > 0 then
                return fail("connection closed in the middle of a netstring")
            end
            return nil, err
        end
        if pos > #buf then self.buf = data else self.buf = sub(buf, pos) .. data end
        self.pos = 1
    end
    local buf, pos = self.buf, self.pos
    if colon == pos or (colon > pos + 1 and byte(buf, pos) == 48) then
        return fail("protocol error: bad netstring length %s", excerpt(sub(buf, pos)))
    end
    local n = tonumber(sub(buf, pos, colon - 1))
    if n > self.max_frame then
        return fail("protocol error: netstring of %d bytes (limit %d)", n, self.max_frame)
    end
    local first = colon + 1
    local have = #buf - first + 1
    local payload
    if have > n then
        if byte(buf, first + n) ~= 44 then
            return fail("protocol error: netstring not ended by ','")
        end
        payload = sub(buf, first, first + n - 1)
        self.pos = first + n + 1
        return payload
    end
    local rest, err, partial = self.conn:receive(n + 1 - have)
    if not rest then
        if partial and partial ~= "" then  -- keep it: a retry resumes this frame
            self.buf, self.pos = sub(buf, pos) .. partial, 1
        end
        if err == "closed" then
            return fail("connection closed in the middle of a netstring")
        end
        return nil, err
    end
    if byte(rest, #rest) ~= 44 then
        return fail("protocol error: netstring not ended by ','")
    end
    payload = sub(buf, first) .. sub(rest, 1, -2)
    self.buf, self.pos = "", 1
    return payload
end

--------------------------------------------------------------------------------
-- Sessions.

local Session = {}
Session.__index = Session

local function check_argv(argv)
    if type(argv) == "string" then argv = { argv } end
    if type(argv) ~= "table" or #argv == 0 then
        return fail("argv must be a non-empty array of strings")
    end
    local count = tostring(#argv)
    local parts = { #count .. ":" .. count .. "," }
    for i = 1, #argv do
        local arg = argv[i]
        if type(arg) == "number" then arg = tostring(arg) end
        if type(arg) ~= "string" then return fail("argv[%d] is a %s", i, type(arg)) end
        if find(arg, "\0", 1, true) then return fail("argv[%d] contains a NUL byte", i) end
        parts[#parts + 1] = #arg .. ":" .. arg .. ","
    end
    return parts
end

local function transport_error(self, what, err)
    if err == "timeout" then
        return fail("%s timed out after %d ms", what, self.timeout)
    end
    if find(err, "^sockexec: ") then return nil, err end
    return fail("%s failed: %s", what, err)
end

--- Connects and sends argv: the program starts at once. Returns a session, or nil, err.
function M.open(path, argv, opts)
    opts = opts or {}
    if type(path) ~= "string" or path == "" then
        return fail("no socket path (in nginx: set $sockexec_socket)")
    end
    path = path:gsub("^unix:", "")
    local request, aerr = check_argv(argv)
    if not request then return nil, aerr end
    local timeout = opts.timeout or DEFAULT_TIMEOUT
    local conn, err = open_transport(path, timeout)
    if not conn then return nil, err end
    local self = setmetatable({
        conn = conn, path = path, timeout = timeout,
        reader = new_reader(conn, opts.max_frame or DEFAULT_MAX_FRAME),
        stdin_closed = false, done = false, failed = nil, pending = nil,
    }, Session)
    local sent, serr = conn:send(request)
    if not sent then
        conn:close()
        return transport_error(self, "sending the argv", serr)
    end
    return self
end
M.connect = M.open

-- The netstrings carrying `data` as stdin, appended to `parts`.
local function stdin_frames(parts, data)
    for i = 1, #data, STDIN_CHUNK do
        local chunk = sub(data, i, i + STDIN_CHUNK - 1)
        parts[#parts + 1] = #chunk .. ":"
        parts[#parts + 1] = chunk
        parts[#parts + 1] = ","
    end
    return parts
end

--- Sends a chunk of stdin. An empty chunk sends nothing (an empty netstring would
--- close stdin: that is close_stdin()). Returns true, or nil, err.
function Session:send(data)
    if self.stdin_closed then return fail("stdin is already closed") end
    if type(data) ~= "string" then return fail("stdin data must be a string") end
    if data == "" then return true end
    local sent, err = self.conn:send(stdin_frames({}, data))
    if not sent then return transport_error(self, "sending stdin", err) end
    return true
end

--- Closes the program's stdin (it sees end of file). Returns true, or nil, err.
function Session:close_stdin()
    if self.stdin_closed then return true end
    self.stdin_closed = true
    local sent, err = self.conn:send("0:,")
    if not sent then return transport_error(self, "closing stdin", err) end
    return true
end

--- The next pair from the broker: kind, data. kind is "stdout" or "stderr" (data:
--- the bytes), "exitcode" (data: a number) or "termsig" (data: the signal name, e.g.
--- "TERM"), last; "unknown" is passed through as the C sockexec may send it. After
--- the last pair: nil, "closed". On error: nil, err ("timeout" leaves the session
--- usable).
function Session:receive()
    if self.done then return nil, "closed" end
    if self.failed then return nil, self.failed end
    local kind = self.pending
    if not kind then
        local err
        kind, err = self.reader:read()
        if not kind then
            if err == "timeout" then return nil, "timeout" end
            if err == "closed" then
                err = "sockexec: the broker closed the connection before the exit status"
            end
            return self:_fail(err)
        end
        if not KINDS[kind] then
            return self:_fail(format("sockexec: protocol error: unknown pair type %s",
                excerpt(kind)))
        end
        self.pending = kind
    end
    local data, err = self.reader:read()
    if not data then
        if err == "timeout" then return nil, "timeout" end
        if err == "closed" then
            err = "sockexec: the broker closed the connection inside a pair"
        end
        return self:_fail(err)
    end
    self.pending = nil
    if kind == "exitcode" then
        local code = match(data, "^%d+$") and tonumber(data)
        if not code then
            return self:_fail("sockexec: protocol error: bad exitcode " .. excerpt(data))
        end
        self.done = true
        return kind, code
    elseif kind == "termsig" then
        if not match(data, "^[%w+-]+$") then
            return self:_fail("sockexec: protocol error: bad termsig " .. excerpt(data))
        end
        self.done = true
        return kind, signal_names[tonumber(data)] or data
    end
    return kind, data
end

function Session:_fail(err)
    if not find(err, "^sockexec: ") then err = "sockexec: receive failed: " .. err end
    self.failed = err
    return nil, err
end

--- Closes the connection. If the program is still running, the broker terminates it.
function Session:close()
    if self.closed then return true end
    self.closed = true
    return self.conn:close()
end

--------------------------------------------------------------------------------
-- One-shot.

-- Sends all of `stdin` (string, array or iterator function), then closes stdin.
-- Returns true, or nil, err, bad_input: bad_input when the caller's stdin is at
-- fault (stdin is then closed, so the program does not wait for more), otherwise
-- the connection failed and the reading side reports it.
local function write_stdin(s, stdin)
    local kind = type(stdin)
    local next_chunk
    if kind == "string" then
        next_chunk = function()
            local chunk = stdin
            stdin = nil
            return chunk
        end
    elseif kind == "table" then
        local i = 0
        next_chunk = function()
            i = i + 1
            return stdin[i]
        end
    elseif kind == "function" then
        next_chunk = stdin
    end
    while next_chunk do
        local called, chunk, cerr = pcall(next_chunk)
        if not called or (chunk == nil and cerr ~= nil)
            or (chunk ~= nil and type(chunk) ~= "string") then
            pcall(s.close_stdin, s)
            local why = not called and chunk or cerr or ("a chunk is a " .. type(chunk))
            return nil, "sockexec: reading stdin failed: " .. tostring(why), true
        end
        if chunk == nil then break end
        local ok, err = s:send(chunk)
        if not ok then return nil, err end
    end
    return s:close_stdin()
end

local function signum_of(name)
    return M.signals[name] or tonumber(name)
end

--- Runs argv to completion. Returns { stdout, stderr, exitcode, termsig, signum }, or
--- nil, err. See the top of this file for the options.
function M.run(path, argv, opts)
    opts = opts or {}
    local stdin, on_stdout, on_stderr = opts.stdin, opts.stdout, opts.stderr
    local stdin_type = type(stdin)
    if stdin ~= nil and stdin_type ~= "string" and stdin_type ~= "table"
        and stdin_type ~= "function" then
        return fail("stdin must be a string, an array of strings or a function")
    end
    local s, err = M.open(path, argv, opts)
    if not s then return nil, err end

    -- state.stdin_err: the caller's stdin could not be read (the run fails). Errors
    -- sending it are left to the reading side: it gets the broker's answer (e.g. the
    -- program exited without reading everything) or the connection's failure.
    local writer, state = nil, {}
    if stdin == nil or (type(stdin) == "string" and #stdin <= INLINE_STDIN) then
        -- small enough for the socket buffer: one send, nothing to interleave
        local parts = stdin_frames({}, stdin or "")
        parts[#parts + 1] = "0:,"
        s.stdin_closed = true
        s.conn:send(parts)
    else
        local function feed()
            local done, err, bad_input = write_stdin(s, stdin)
            if not done and bad_input then state.stdin_err = err end
        end
        if in_nginx then
            local ok, thread = pcall(ngx.thread.spawn, feed)
            if ok then writer = thread else feed() end
        else
            feed()  -- LuaSocket: all of stdin first (see the size note at the top)
        end
    end

    local res = { stdout = nil, stderr = nil, exitcode = nil, termsig = nil, signum = nil }
    local out, errs = {}, {}
    local failure
    while true do
        local kind, data = s:receive()
        if not kind then
            failure = data == "timeout"
                and format("sockexec: no reply from the program for %d ms", s.timeout)
                or data
            break
        end
        local callback = kind == "stdout" and on_stdout or kind == "stderr" and on_stderr
        if callback then
            local keep, why = callback(data)
            if keep == false then
                failure = "sockexec: stopped by the " .. kind .. " callback"
                    .. (why and ": " .. tostring(why) or "")
                break
            end
        elseif kind == "stdout" then
            out[#out + 1] = data
        elseif kind == "stderr" then
            errs[#errs + 1] = data
        elseif kind == "exitcode" then
            res.exitcode = data
            break
        elseif kind == "termsig" then
            res.termsig, res.signum = data, signum_of(data)
            break
        end
    end

    if writer then
        -- After the exit pair the writer has finished, or is blocked on a connection
        -- the broker closed (the program did not read all its stdin); after a failure
        -- it may be blocked on a stalled one. Killing it ends it in every case.
        ngx.thread.kill(writer)
    end
    s:close()
    if failure then return nil, failure end
    if state.stdin_err then return nil, state.stdin_err end
    res.stdout, res.stderr = concat(out), concat(errs)
    return res
end
M.exec = M.run

--- The message to show when the program could not be run: the transport error, or
--- the broker's refusal line ("sockexec_py: ...: program not found", exit 127; 126:
--- not executable; 125: request refused). nil when the program ran, whatever its
--- exit status. Needs res.stderr, i.e. no stderr callback.
function M.broker_error(res, err)
    if not res then return err or "sockexec: no result" end
    local code, stderr = res.exitcode, res.stderr
    if code and code >= 125 and code <= 127 and type(stderr) == "string"
        and find(stderr, "^sockexec_py: ") then
        return (stderr:gsub("\n$", ""))
    end
    return nil
end

return M
