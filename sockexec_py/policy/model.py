"""Execution policy: which programs a peer may run, as whom, with which limits.

Sans-IO apart from reading the file and resolving names (users, groups, programs in the
policy's search path): :func:`load_policy` turns a TOML file into a :class:`Policy`,
and :meth:`Policy.decide` turns a request (argv + peer credentials) into an
:class:`Allowed` (what to execute and how) or a :class:`Denied` (a one-line reason).

Two kinds of rules; a request naming a ``[[command]]`` uses it, otherwise the
``[[allow]]`` rules are tried in file order and the first that matches wins:

* ``[[allow]]`` — a program by absolute path or by name in the search path, with
  optional argument constraints (exact list, prefix, or one regex per position);
* ``[[command]]`` — a named command: the client sends the name and parameters, the
  rule gives the argv, ``@@1``, ``@@2``… replaced by the parameters, each one a single
  argument (there is no shell, so no quoting problem exists).

Programs are executed by the resolved absolute path; the client's ``argv[0]`` is kept.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import resource
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from sockexec_py.protocol import printable

#: Where bare program names are looked up when the policy does not say.
DEFAULT_SEARCH_PATH = ("/usr/local/bin", "/usr/bin", "/bin")
#: The rlimits a rule may set, by their name in the file.
RLIMITS: Mapping[str, int] = {
    "cpu": resource.RLIMIT_CPU,
    "as": resource.RLIMIT_AS,
    "data": resource.RLIMIT_DATA,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "core": resource.RLIMIT_CORE,
    "stack": resource.RLIMIT_STACK,
}
_RLIM_MAX = (1 << 63) - 1
_SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_PLACEHOLDER = re.compile(rb"@@(\d+)")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RULE_KEYS = frozenset(
    (
        "name",
        "user",
        "group",
        "cwd",
        "env",
        "setenv",
        "keepenv",
        "rlimits",
        "umask",
        "timeout",
        "stdin",
        "max_running",
        "max_queue",
        "peer_uids",
        "peer_gids",
    )
)
_ALLOW_KEYS = _RULE_KEYS | {"program", "args", "args_prefix", "args_regex"}
_COMMAND_KEYS = _RULE_KEYS | {"argv", "params", "params_regex"}
EnvMode = Literal["inherit", "clear", "minimal"]


class PolicyError(Exception):
    """The policy file is unreadable or invalid; ``str()`` is one line naming where."""


@dataclass(frozen=True, eq=False)
class Rule:
    """One rule of the policy, validated; compared by identity (reloads make new ones).

    ``program`` is an absolute path or a bare name (``[[allow]]``); ``template`` the
    argv of a named command (``[[command]]``). The rest applies to either kind.
    """

    kind: Literal["allow", "command"]
    name: str
    index: int
    program: str = ""
    args: tuple[bytes, ...] | None = None
    args_prefix: tuple[bytes, ...] | None = None
    args_regex: tuple[re.Pattern[str], ...] | None = None
    template: tuple[bytes, ...] = ()
    params: int = 0
    params_regex: tuple[re.Pattern[str], ...] | None = None
    user: str | None = None
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None
    home: str | None = None
    shell: str | None = None
    cwd: str | None = None
    env_mode: EnvMode = "inherit"
    setenv: tuple[tuple[bytes, bytes], ...] = ()
    keepenv: tuple[bytes, ...] = ()
    rlimits: tuple[tuple[str, int], ...] = ()
    umask: int | None = None
    timeout: float | None = None
    stdin: bool = True
    max_running: int | None = None
    max_queue: int | None = None
    peer_uids: frozenset[int] | None = None
    peer_gids: frozenset[int] | None = None

    @property
    def key(self) -> str:
        """What identifies the rule across reloads (its gate is kept by this key)."""
        return f"{self.kind}:{self.name}"

    @property
    def label(self) -> str:
        """How logs and denials name the rule."""
        return f"{self.kind} {self.name!r}"

    @property
    def needs_helper(self) -> bool:
        """Whether starting it needs more than ``posix_spawn`` can do."""
        return (
            self.uid is not None
            or self.gid is not None
            or self.cwd is not None
            or self.umask is not None
            or bool(self.rlimits)
        )

    def peer_allowed(self, uid: int, gid: int) -> bool:
        """Whether a peer with these credentials may use the rule."""
        if self.peer_uids is None and self.peer_gids is None:
            return True
        return (self.peer_uids is not None and uid in self.peer_uids) or (
            self.peer_gids is not None and gid in self.peer_gids
        )


@dataclass(frozen=True)
class Allowed:
    """What to execute: the resolved path, the final argv and environment, the rule."""

    rule: Rule
    path: bytes
    argv: tuple[bytes, ...]
    env: dict[bytes, bytes]


@dataclass(frozen=True)
class Denied:
    """A refusal; ``reason`` is one printable line."""

    reason: str


@dataclass(frozen=True)
class Policy:
    """A loaded policy: the search path and the rules, in file order."""

    source: str
    search_path: tuple[str, ...]
    rules: tuple[Rule, ...]
    #: What ``env = "inherit"`` passes on; None: the server's environment at first use
    #: (after start-up removed LISTEN_FDS and the like).
    base_env: Mapping[bytes, bytes] | None = field(default=None, repr=False)

    def decide(self, argv: tuple[bytes, ...], peer_uid: int, peer_gid: int) -> Allowed | Denied:
        """Match a request against the rules; the first rule that fits wins.

        When no rule fits, the reason given is the most specific one found: a rule
        for this program refusing the arguments or the peer says so, otherwise the
        program (or command) is simply not allowed.
        """
        first = argv[0]
        if b"/" not in first:
            for rule in self.rules:
                if rule.kind == "command" and rule.name.encode() == first:
                    return self._decide_command(rule, argv, peer_uid, peer_gid)
        path = self._resolve_request(first)
        if isinstance(path, Denied):
            return path
        closest: str | None = None
        for rule in self.rules:
            if rule.kind != "allow" or self._program_path(rule) != path:
                continue
            # The peer first: a peer the rule is not for learns nothing of its arguments.
            if not rule.peer_allowed(peer_uid, peer_gid):
                problem: str | None = f"peer uid {peer_uid} gid {peer_gid} may not use {rule.label}"
            else:
                problem = _args_problem(rule, argv[1:])
            if problem is None:
                return Allowed(rule, path.encode(), argv, self.environment(rule))
            closest = closest or problem
        return Denied(closest or f"program {printable(path.encode())} is not allowed")

    def _decide_command(
        self, rule: Rule, argv: tuple[bytes, ...], peer_uid: int, peer_gid: int
    ) -> Allowed | Denied:
        params = argv[1:]
        if not rule.peer_allowed(peer_uid, peer_gid):
            return Denied(f"peer uid {peer_uid} gid {peer_gid} may not use {rule.label}")
        if len(params) != rule.params:
            return Denied(
                f"command {rule.name!r} takes {rule.params} parameter(s), got {len(params)}"
            )
        if rule.params_regex is not None:
            problem = _regex_problem(rule.params_regex, params, "parameter")
            if problem:
                return Denied(f"command {rule.name!r}: {problem}")
        final = tuple(
            _PLACEHOLDER.sub(lambda m: params[int(m.group(1)) - 1], item) for item in rule.template
        )
        path = self._resolve_request(final[0])
        if isinstance(path, Denied):
            return path
        return Allowed(rule, path.encode(), final, self.environment(rule))

    def _resolve_request(self, program: bytes) -> str | Denied:
        try:
            name = program.decode()
        except UnicodeDecodeError:
            return Denied(f"program {printable(program)} is not allowed")
        if name.startswith("/"):
            return os.path.normpath(name)
        if "/" in name:
            return Denied(f"relative program path {printable(program)} is not allowed")
        found = self.which(name)
        if found is None:
            return Denied(f"program {printable(program)} is not in the policy's search path")
        return found

    def _program_path(self, rule: Rule) -> str | None:
        if rule.program.startswith("/"):
            return rule.program
        return self.which(rule.program)

    def which(self, name: str) -> str | None:
        """The first executable regular file called ``name`` in the search path."""
        for directory in self.search_path:
            candidate = os.path.join(directory, name)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
        return None

    def environment(self, rule: Rule) -> dict[bytes, bytes]:
        """The environment a rule's programs get."""
        if rule.env_mode == "inherit":
            env = dict(self._inherited())
        else:
            env = {}
            if rule.env_mode == "minimal":
                env[b"PATH"] = ":".join(self.search_path).encode()
                user = rule.user or _current_user()
                home = rule.home or "/"
                env.update(
                    {
                        b"HOME": home.encode(),
                        b"USER": user.encode(),
                        b"LOGNAME": user.encode(),
                        b"SHELL": (rule.shell or "/bin/sh").encode(),
                    }
                )
            for key in rule.keepenv:
                if key in self._inherited():
                    env[key] = self._inherited()[key]
        env.update(rule.setenv)
        return env

    def _inherited(self) -> Mapping[bytes, bytes]:
        return _server_environ() if self.base_env is None else self.base_env

    def describe(self) -> list[str]:
        """Human-readable lines saying what the policy allows (``--check-policy``)."""
        lines = [f"policy {self.source}: {len(self.rules)} rule(s)"]
        lines.append(f"search path: {':'.join(self.search_path)}")
        for rule in self.rules:
            lines.append(f"{rule.label}:")
            if rule.kind == "allow":
                where = self._program_path(rule) or "NOT FOUND in the search path"
                lines.append(f"  program {rule.program} ({where})")
                if rule.args is not None:
                    lines.append(f"  arguments exactly {_show_list(rule.args)}")
                elif rule.args_prefix is not None:
                    lines.append(f"  arguments starting with {_show_list(rule.args_prefix)}")
                elif rule.args_regex is not None:
                    patterns = [p.pattern for p in rule.args_regex]
                    lines.append(f"  arguments matching {patterns}")
                else:
                    lines.append("  any arguments")
            else:
                lines.append(f"  runs {_show_list(rule.template)} with {rule.params} parameter(s)")
                found = self._resolve_request(rule.template[0])
                if isinstance(found, Denied) or not os.access(found, os.X_OK):
                    lines.append("  program NOT FOUND or not executable")
                if rule.params_regex is not None:
                    lines.append(f"  parameters matching {[p.pattern for p in rule.params_regex]}")
            lines.extend(f"  {line}" for line in _settings_lines(rule))
        return lines


_SERVER_ENVIRON: dict[bytes, bytes] | None = None


def _server_environ() -> dict[bytes, bytes]:
    global _SERVER_ENVIRON
    if _SERVER_ENVIRON is None:
        _SERVER_ENVIRON = dict(os.environb)
    return _SERVER_ENVIRON


def _current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _settings_lines(rule: Rule) -> list[str]:
    lines = []
    if rule.peer_uids is not None or rule.peer_gids is not None:
        lines.append(
            f"peers: uids {sorted(rule.peer_uids or ())} gids {sorted(rule.peer_gids or ())}"
        )
    else:
        lines.append("peers: anyone who can connect")
    if rule.uid is not None or rule.gid is not None:
        lines.append(
            f"runs as uid {rule.uid} gid {rule.gid} groups {list(rule.groups or ())}"
            + (f" ({rule.user})" if rule.user else "")
        )
    if rule.cwd:
        lines.append(f"working directory {rule.cwd}")
    env = f"environment {rule.env_mode}"
    if rule.keepenv:
        env += f", keeps {[k.decode() for k in rule.keepenv]}"
    if rule.setenv:
        env += f", sets {[k.decode() for k, _ in rule.setenv]}"
    lines.append(env)
    if rule.rlimits:
        lines.append("rlimits " + ", ".join(f"{k}={v}" for k, v in rule.rlimits))
    if rule.umask is not None:
        lines.append(f"umask {rule.umask:03o}")
    if rule.timeout is not None:
        lines.append(f"timeout {rule.timeout:g}s")
    if not rule.stdin:
        lines.append("stdin: not passed (the program reads EOF)")
    if rule.max_running is not None:
        queue = "unlimited" if rule.max_queue is None else str(rule.max_queue)
        lines.append(f"at most {rule.max_running} running, queue {queue}")
    return lines


def _args_problem(rule: Rule, args: tuple[bytes, ...]) -> str | None:
    if rule.args is not None and args != rule.args:
        return f"arguments not allowed by {rule.label} (exactly {_show_list(rule.args)})"
    if rule.args_prefix is not None and args[: len(rule.args_prefix)] != rule.args_prefix:
        return (
            f"arguments not allowed by {rule.label} "
            f"(must start with {_show_list(rule.args_prefix)})"
        )
    if rule.args_regex is not None:
        if len(args) != len(rule.args_regex):
            return (
                f"arguments not allowed by {rule.label} "
                f"({len(rule.args_regex)} expected, got {len(args)})"
            )
        problem = _regex_problem(rule.args_regex, args, "argument")
        if problem:
            return f"{problem} ({rule.label})"
    return None


def _regex_problem(
    patterns: tuple[re.Pattern[str], ...], values: Iterable[bytes], what: str
) -> str | None:
    for position, (pattern, value) in enumerate(zip(patterns, values, strict=False), 1):
        try:
            text = value.decode()
        except UnicodeDecodeError:
            return f"{what} {position} is not UTF-8"
        if pattern.fullmatch(text) is None:
            return f"{what} {position} does not match {pattern.pattern!r}"
    return None


def _show_list(values: Iterable[bytes]) -> str:
    return "[" + ", ".join(repr(printable(v)) for v in values) + "]"


# ---------------------------------------------------------------------------------------
# Loading


def load_policy(
    path: str, *, euid: int | None = None, base_env: Mapping[bytes, bytes] | None = None
) -> Policy:
    """Read and validate a policy file; :class:`PolicyError` says what is wrong and where.

    ``euid`` is the user the broker runs as (default: this process's): rules that
    switch user need root. ``base_env`` is the environment ``inherit`` passes on
    (default: the server's).
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not valid TOML: not UTF-8") from None
    return parse_policy(
        data,
        source=path,
        euid=os.geteuid() if euid is None else euid,
        base_env=base_env,
    )


def parse_policy(
    data: Mapping[str, Any],
    *,
    source: str,
    euid: int,
    base_env: Mapping[bytes, bytes] | None = None,
) -> Policy:
    """Validate a parsed policy document (see :func:`load_policy`)."""
    unknown = set(data) - {"path", "allow", "command"}
    if unknown:
        raise PolicyError(f"{source}: unknown key(s) {sorted(unknown)}")
    search_path = _string_list(data.get("path", list(DEFAULT_SEARCH_PATH)), f"{source}: path")
    for directory in search_path:
        if not directory.startswith("/"):
            raise PolicyError(f"{source}: path: {directory!r} is not absolute")
    rules: list[Rule] = []
    names: set[str] = set()
    for kind in ("allow", "command"):
        tables = data.get(kind, [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise PolicyError(f"{source}: {kind} must be an array of tables ([[{kind}]])")
        for number, table in enumerate(tables, 1):
            where = f"{source}: [[{kind}]] #{number}"
            rule = _parse_rule(kind, number, table, where, euid)
            # Commands are found by name; gates are kept across reloads by name.
            if kind == "command" or rule.max_running is not None:
                if rule.key in names:
                    raise PolicyError(
                        f"{where}: {rule.label} defined twice (give each rule its own name)"
                    )
                names.add(rule.key)
            rules.append(rule)
    return Policy(source, tuple(search_path), tuple(rules), base_env)


def _parse_rule(
    kind: Literal["allow", "command"], index: int, table: dict[str, Any], where: str, euid: int
) -> Rule:
    allowed_keys = _ALLOW_KEYS if kind == "allow" else _COMMAND_KEYS
    unknown = set(table) - allowed_keys
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {sorted(unknown)}")
    fields: dict[str, Any] = {"kind": kind, "index": index}
    if kind == "allow":
        program = _string(table.get("program"), f"{where}: program")
        if "/" in program and not program.startswith("/"):
            raise PolicyError(f"{where}: program {program!r}: a path must be absolute")
        fields["program"] = os.path.normpath(program) if program.startswith("/") else program
        fields["name"] = _string(table.get("name", program), f"{where}: name")
        constraints = [k for k in ("args", "args_prefix", "args_regex") if k in table]
        if len(constraints) > 1:
            raise PolicyError(f"{where}: use one of args, args_prefix, args_regex")
        if "args" in table:
            fields["args"] = _bytes_list(table["args"], f"{where}: args")
        if "args_prefix" in table:
            fields["args_prefix"] = _bytes_list(table["args_prefix"], f"{where}: args_prefix")
        if "args_regex" in table:
            fields["args_regex"] = _regex_list(table["args_regex"], f"{where}: args_regex")
    else:
        name = _string(table.get("name"), f"{where}: name")
        if "/" in name or not name:
            raise PolicyError(f"{where}: name {name!r} must be a non-empty word without '/'")
        fields["name"] = name
        template = _bytes_list(table.get("argv"), f"{where}: argv")
        if not template or not template[0]:
            raise PolicyError(f"{where}: argv must name a program")
        if _PLACEHOLDER.search(template[0]):
            raise PolicyError(f"{where}: argv[0] cannot be a parameter")
        used = [int(m) for item in template for m in _PLACEHOLDER.findall(item)]
        if any(n < 1 for n in used):
            raise PolicyError(f"{where}: parameters are numbered from @@1")
        params = table.get("params", max(used, default=0))
        if not isinstance(params, int) or isinstance(params, bool) or params < max(used, default=0):
            raise PolicyError(
                f"{where}: params must be an integer >= the highest placeholder "
                f"(@@{max(used, default=0)})"
            )
        fields["template"] = template
        fields["params"] = params
        if "params_regex" in table:
            patterns = _regex_list(table["params_regex"], f"{where}: params_regex")
            if len(patterns) != params:
                raise PolicyError(f"{where}: params_regex needs {params} pattern(s)")
            fields["params_regex"] = patterns
        first = template[0].decode()
        if "/" in first and not first.startswith("/"):
            raise PolicyError(f"{where}: argv[0] {first!r}: a path must be absolute")
    fields.update(_parse_settings(table, where, euid))
    return Rule(**fields)


def _parse_settings(table: dict[str, Any], where: str, euid: int) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    user = table.get("user")
    group = table.get("group")
    if user is not None:
        entry = _lookup_user(user, f"{where}: user")
        fields.update(user=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)
        fields.update(home=entry.pw_dir, shell=entry.pw_shell or "/bin/sh")
        if group is None:
            fields["groups"] = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    if group is not None:
        gid = _lookup_group(group, f"{where}: group")
        fields["gid"] = gid
        fields["groups"] = (
            tuple(os.getgrouplist(fields["user"], gid)) if user is not None else (gid,)
        )
    switching = fields.get("uid") not in (None, euid) or fields.get("gid") not in (
        None,
        _primary_gid(euid),
    )
    if switching and euid != 0:
        raise PolicyError(f"{where}: switching user or group needs the broker to run as root")
    if euid != 0:  # running as that very user already: nothing to switch
        fields.update(uid=None, gid=None, groups=None)
    if "cwd" in table:
        cwd = _string(table["cwd"], f"{where}: cwd")
        if not cwd.startswith("/"):
            raise PolicyError(f"{where}: cwd {cwd!r} is not absolute")
        fields["cwd"] = cwd
    switches = "user" in table or "group" in table
    env_mode = table.get("env", "minimal" if switches else "inherit")
    if env_mode not in ("inherit", "clear", "minimal"):
        raise PolicyError(f"{where}: env must be 'inherit', 'clear' or 'minimal'")
    fields["env_mode"] = env_mode
    setenv = table.get("setenv", {})
    if not isinstance(setenv, dict) or not all(isinstance(v, str) for v in setenv.values()):
        raise PolicyError(f"{where}: setenv must be a table of strings")
    for key in setenv:
        _env_name(key, f"{where}: setenv")
    fields["setenv"] = tuple((k.encode(), v.encode()) for k, v in setenv.items())
    keepenv = _string_list(table.get("keepenv", []), f"{where}: keepenv")
    for key in keepenv:
        _env_name(key, f"{where}: keepenv")
    fields["keepenv"] = tuple(k.encode() for k in keepenv)
    rlimits = table.get("rlimits", {})
    if not isinstance(rlimits, dict):
        raise PolicyError(f"{where}: rlimits must be a table")
    parsed = []
    for key, value in rlimits.items():
        if key not in RLIMITS:
            raise PolicyError(f"{where}: rlimits: unknown limit {key!r} (known: {sorted(RLIMITS)})")
        parsed.append((key, _size(value, f"{where}: rlimits.{key}")))
    fields["rlimits"] = tuple(parsed)
    if "umask" in table:
        umask = table["umask"]
        if isinstance(umask, str):
            try:
                umask = int(umask, 8)
            except ValueError:
                raise PolicyError(f'{where}: umask must be octal, e.g. "027"') from None
        if not isinstance(umask, int) or isinstance(umask, bool) or not 0 <= umask <= 0o777:
            raise PolicyError(f"{where}: umask must be within 000..777")
        fields["umask"] = umask
    if "timeout" in table:
        fields["timeout"] = _positive(table["timeout"], f"{where}: timeout", number=True)
    if "stdin" in table:
        if not isinstance(table["stdin"], bool):
            raise PolicyError(f"{where}: stdin must be true or false")
        fields["stdin"] = table["stdin"]
    if "max_running" in table:
        fields["max_running"] = int(_positive(table["max_running"], f"{where}: max_running"))
    if "max_queue" in table:
        if "max_running" not in table:
            raise PolicyError(f"{where}: max_queue needs max_running")
        queue = table["max_queue"]
        if not isinstance(queue, int) or isinstance(queue, bool) or queue < 0:
            raise PolicyError(f"{where}: max_queue must be an integer >= 0")
        fields["max_queue"] = queue
    if "peer_uids" in table:
        items = _list(table["peer_uids"], f"{where}: peer_uids")
        fields["peer_uids"] = frozenset(
            _lookup_user(u, f"{where}: peer_uids").pw_uid if isinstance(u, str) else _id(u, where)
            for u in items
        )
    if "peer_gids" in table:
        items = _list(table["peer_gids"], f"{where}: peer_gids")
        fields["peer_gids"] = frozenset(
            _lookup_group(g, f"{where}: peer_gids") if isinstance(g, str) else _id(g, where)
            for g in items
        )
    return fields


def _primary_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return os.getegid()


def _lookup_user(value: object, where: str) -> pwd.struct_passwd:
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            return pwd.getpwuid(value)
        if isinstance(value, str):
            return pwd.getpwnam(value)
    except KeyError:
        raise PolicyError(f"{where}: no such user {value!r}") from None
    raise PolicyError(f"{where}: a user is a name or a uid")


def _lookup_group(value: object, where: str) -> int:
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            return grp.getgrgid(value).gr_gid
        if isinstance(value, str):
            return grp.getgrnam(value).gr_gid
    except KeyError:
        raise PolicyError(f"{where}: no such group {value!r}") from None
    raise PolicyError(f"{where}: a group is a name or a gid")


def _id(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PolicyError(f"{where}: ids are names or integers >= 0, got {value!r}")
    return value


def _env_name(key: str, where: str) -> None:
    if not _ENV_NAME.fullmatch(key):
        raise PolicyError(f"{where}: {key!r} is not a valid variable name")


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise PolicyError(f"{where} must be a list")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError(f"{where} must be a non-empty string")
    if "\0" in value:
        raise PolicyError(f"{where} must not contain NUL")
    return value


def _string_list(value: object, where: str) -> list[str]:
    items = _list(value, where)
    for item in items:
        if not isinstance(item, str) or "\0" in item:
            raise PolicyError(f"{where} must be a list of strings")
    return items


def _bytes_list(value: object, where: str) -> tuple[bytes, ...]:
    return tuple(item.encode() for item in _string_list(value, where))


def _regex_list(value: object, where: str) -> tuple[re.Pattern[str], ...]:
    patterns = []
    for item in _string_list(value, where):
        try:
            patterns.append(re.compile(item, re.ASCII))
        except re.error as exc:
            raise PolicyError(f"{where}: bad regex {item!r}: {exc}") from None
    return tuple(patterns)


def _positive(value: object, where: str, *, number: bool = False) -> float:
    kinds = (int, float) if number else (int,)
    if (
        not isinstance(value, kinds)
        or isinstance(value, bool)
        or not value > 0
        or value == float("inf")
    ):
        raise PolicyError(f"{where} must be a positive {'number' if number else 'integer'}")
    return float(value) if number else int(value)


def _size(value: object, where: str) -> int:
    """An rlimit value: an integer, a size like "512M", or "unlimited"."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        number = value
    elif isinstance(value, str):
        text = value.strip().lower()
        if text == "unlimited":
            return resource.RLIM_INFINITY
        match = re.fullmatch(r"(\d+)\s*([kmgt]?)i?b?", text)
        if match:
            number = int(match.group(1)) * _SIZE_SUFFIXES[match.group(2)]
    if number is not None:
        if number > _RLIM_MAX:
            raise PolicyError(f'{where} is too large (at most {_RLIM_MAX}, or "unlimited")')
        return number
    raise PolicyError(f'{where} must be an integer >= 0, a size like "512M", or "unlimited"')
