-- sockexec.lua: a dependency-free client of the sockexec / sockexec_py broker.
--
-- Inside nginx it uses ngx_lua cosockets (non-blocking); outside, LuaSocket's
-- socket.unix if installed. Written from the protocol (netstrings):
--   request:  <argc> <argv...> <stdin chunks...> 0:,
--   reply:    pairs (type, data): stdout/stderr chunks, then exitcode or termsig.
--
--   local sockexec = require "sockexec"
--   local res, err = sockexec.run("/run/sockexec.sock", {"uname", "-a"}, {timeout = 5000})
--   -- res.stdout, res.stderr, res.exitcode (number or nil), res.termsig ("TERM" or nil)
--
--   local s = assert(sockexec.open("/run/sockexec.sock", {"cat"}))
--   s:send("hello"); local kind, data = s:receive(); s:close_stdin(); ...; s:close()
--
-- The broker keeps only small buffers, so stdin is written while the output is
-- read (a second light thread inside nginx): any size goes through `cat`.

local M = { _VERSION = "0.1.0" }

local tonumber, tostring, type = tonumber, tostring, type
local concat, insert = table.concat, table.insert
local ngx = rawget(_G, "ngx")
local in_nginx = ngx ~= nil and ngx.socket ~= nil and ngx.socket.tcp ~= nil

local STDIN_CHUNK = 65536
local MAX_FRAME = 16 * 1024 * 1024
local KNOWN = { stdout = true, stderr = true, exitcode = true, termsig = true, unknown = true }

local function netstring(s)
    return #s .. ":" .. s .. ","
end
M.netstring = netstring

-- Say plainly why the socket could not be reached.
local function explain(path, err)
    err = tostring(err)
    if err:find("No such file", 1, true) or err:find("no such file", 1, true) then
        return "cannot connect to unix:" .. path .. ": no such socket (is sockexec-py running?)"
    elseif err:find("refused", 1, true) then
        return "cannot connect to unix:" .. path .. ": connection refused (stale socket?)"
    elseif err:find("ermission denied", 1, true) then
        return "cannot connect to unix:" .. path .. ": permission denied (socket mode/group)"
    end
    return "cannot connect to unix:" .. path .. ": " .. err
end

local function connect(path, timeout_ms)
    if in_nginx then
        local sock = ngx.socket.tcp()
        sock:settimeout(timeout_ms or 60000)
        local ok, err = sock:connect("unix:" .. path)
        if not ok then return nil, explain(path, err) end
        return sock
    end
    local ok, unix = pcall(require, "socket.unix")
    if not ok then
        return nil, "no socket library: run inside nginx (ngx_lua) or install LuaSocket"
    end
    local sock = (type(unix) == "table" and unix.stream or unix)()
    if timeout_ms then sock:settimeout(timeout_ms / 1000) end
    local okc, err = sock:connect(path)
    if not okc then return nil, explain(path, err) end
    return sock
end

-- Reads one netstring. Cosockets read the length with receiveuntil(":") and the
-- payload with one receive(n); LuaSocket has no receiveuntil, so there the (at most
-- 20) length digits are read one by one and the payload in one receive.
local function read_netstring(self)
    local digits, err
    if self.until_colon then
        digits, err = self.until_colon()
    else
        local parts = {}
        while true do
            local c, e = self.sock:receive(1)
            if not c then return nil, e end
            if c == ":" then break end
            insert(parts, c)
            if #parts > 20 then return nil, "netstring length too long" end
        end
        digits = concat(parts)
    end
    if not digits then return nil, err end
    if not digits:match("^%d+$") or (#digits > 1 and digits:sub(1, 1) == "0") then
        return nil, "malformed netstring length: " .. digits:sub(1, 20)
    end
    local n = tonumber(digits)
    if n > MAX_FRAME then return nil, "netstring longer than " .. MAX_FRAME .. " bytes" end
    local body, e2 = self.sock:receive(n + 1)
    if not body then return nil, e2 end
    if body:sub(-1) ~= "," then return nil, "netstring not terminated by ','" end
    return body:sub(1, n)
end

local Session = {}
Session.__index = Session

--- Opens a duplex session: the program starts as soon as the argv is sent.
function M.open(path, argv, opts)
    opts = opts or {}
    if type(argv) ~= "table" or #argv == 0 then return nil, "argv must be a non-empty table" end
    local sock, err = connect(path, opts.timeout)
    if not sock then return nil, err end
    local parts = { netstring(tostring(#argv)) }
    for i = 1, #argv do parts[#parts + 1] = netstring(tostring(argv[i])) end
    local ok, serr = sock:send(concat(parts))
    if not ok then sock:close(); return nil, "cannot send the request: " .. tostring(serr) end
    local self = setmetatable({ sock = sock, stdin_closed = false, done = false }, Session)
    if in_nginx then self.until_colon = sock:receiveuntil(":") end
    return self
end

--- Sends a stdin chunk (a string); ignored once stdin is closed.
function Session:send(data)
    if self.stdin_closed or data == nil or #data == 0 then return true end
    for i = 1, #data, STDIN_CHUNK do
        local ok, err = self.sock:send(netstring(data:sub(i, i + STDIN_CHUNK - 1)))
        if not ok then self.stdin_closed = true; return nil, err end
    end
    return true
end

--- Closes the program's stdin.
function Session:close_stdin()
    if self.stdin_closed then return true end
    self.stdin_closed = true
    return self.sock:send("0:,")
end

--- Receives the next frame: kind ("stdout", "stderr", "exitcode", "termsig"), data.
--- After the exit frame it returns nil, "closed".
function Session:receive()
    if self.done then return nil, nil, "closed" end
    while true do
        local kind, err = read_netstring(self)
        if not kind then return nil, nil, err end
        if not KNOWN[kind] then return nil, nil, "unknown frame type: " .. kind:sub(1, 20) end
        local data, err2 = read_netstring(self)
        if not data then return nil, nil, err2 end
        if kind == "exitcode" or kind == "termsig" then self.done = true end
        if kind ~= "unknown" then return kind, data end
    end
end

function Session:close()
    return self.sock:close()
end

--- One-shot: runs argv with opts.stdin, calls opts.stdout/opts.stderr with each chunk
--- (or collects them), returns { stdout, stderr, exitcode, termsig } or nil, err.
function M.run(path, argv, opts)
    opts = opts or {}
    local s, err = M.open(path, argv, opts)
    if not s then return nil, err end
    local stdin = opts.stdin or ""
    local writer
    local function feed()
        s:send(stdin)
        s:close_stdin()
    end
    if in_nginx and #stdin > 0 then
        writer = ngx.thread.spawn(feed)  -- write while reading: no deadlock on big stdin
    else
        feed()  -- outside nginx: stdin must fit the socket and pipe buffers (~1 MiB)
    end
    local out, errs = {}, {}
    local res = { exitcode = nil, termsig = nil }
    while true do
        local kind, data, rerr = s:receive()
        if not kind then
            if writer then ngx.thread.kill(writer) end
            s:close()
            return nil, rerr
        end
        if kind == "stdout" then
            if opts.stdout then opts.stdout(data) else insert(out, data) end
        elseif kind == "stderr" then
            if opts.stderr then opts.stderr(data) else insert(errs, data) end
        elseif kind == "exitcode" then
            res.exitcode = tonumber(data)
            break
        else
            res.termsig = data
            break
        end
    end
    if writer then ngx.thread.wait(writer) end
    s:close()
    res.stdout, res.stderr = concat(out), concat(errs)
    return res
end

--- For nginx handlers: the broker's own refusals (exit 125/126/127 with a
--- "sockexec_py: ..." line) and transport errors, as one message; nil when the
--- program ran (whatever its exit status).
function M.broker_error(res, err)
    if not res then return "sockexec: " .. tostring(err) end
    local code = res.exitcode
    if (code == 125 or code == 126 or code == 127) and (res.stderr or ""):find("^sockexec_py: ") then
        return (res.stderr:gsub("\n$", ""))
    end
    return nil
end

return M
