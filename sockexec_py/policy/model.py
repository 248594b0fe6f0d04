"""The policy's rules and decisions: a request (argv and the peer's credentials) in,
:class:`Allowed` (what to execute and how: an :class:`ExecSpec`) or :class:`Denied`
(a one-line reason) out.

No sockets and no processes; the one thing a decision reads from the system is the
file system, to find a program in the policy's search path (as ``execvp`` would).
Without ``--policy`` the broker decides with :data:`ALLOW_ALL`, which allows every
request and builds the same :class:`ExecSpec`, so there is one spawn path.

The kinds of rules and how they match are told in the package's docstring.

Programs are executed by the resolved absolute path; the client's ``argv[0]`` is kept.
"""

from __future__ import annotations

import os
import pwd
import re
import resource
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from sockexec_py.replies import printable

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
#: ``@@1``, ``@@2``…: where a named command's parameters go.
PLACEHOLDER = re.compile(rb"@@(\d+)")
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

    def peer_allowed(self, uid: int, gid: int) -> bool:
        """Whether a peer with these credentials may use the rule."""
        if self.peer_uids is None and self.peer_gids is None:
            return True
        return (self.peer_uids is not None and uid in self.peer_uids) or (
            self.peer_gids is not None and gid in self.peer_gids
        )


@dataclass(frozen=True)
class ExecSpec:
    """A program to start, and how: what a decision hands to the broker's spawn.

    ``path`` is the file to execute (absolute), or None to look ``argv[0]`` up in the
    server's ``PATH`` (no policy); ``argv[0]`` is what the program sees. ``env`` is
    read-only (it may be the server's own snapshot). ``uid``/``gid``/``groups``/
    ``cwd``/``umask``/``rlimits`` are None or empty when the rule leaves them as the
    server's.
    """

    path: bytes | None
    argv: tuple[bytes, ...]
    env: Mapping[bytes, bytes]
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None
    cwd: str | None = None
    umask: int | None = None
    #: (name, RLIMIT_* number, value) triples.
    rlimits: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True)
class Allowed:
    """A request allowed: the rule that allowed it and what to execute."""

    rule: Rule
    spec: ExecSpec


@dataclass(frozen=True)
class Denied:
    """A refusal; ``reason`` is one printable line.

    ``by_policy`` is false for a request the policy allowed but that cannot wait
    (its rule's queue is full): the client is told so, not that it was denied.
    """

    reason: str
    by_policy: bool = True

    @property
    def message(self) -> str:
        """The line the client gets (after ``sockexec_py: ``)."""
        return f"denied: {self.reason}" if self.by_policy else self.reason


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
        path = self.resolve_request(first)
        if isinstance(path, Denied):
            return path
        closest: str | None = None
        for rule in self.rules:
            if rule.kind != "allow" or self.program_path(rule) != path:
                continue
            # The peer first: a peer the rule is not for learns nothing of its arguments.
            if not rule.peer_allowed(peer_uid, peer_gid):
                problem: str | None = f"peer uid {peer_uid} gid {peer_gid} may not use {rule.label}"
            else:
                problem = _args_problem(rule, argv[1:])
            if problem is None:
                return self._allowed(rule, path, argv)
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
            PLACEHOLDER.sub(lambda m: params[int(m.group(1)) - 1], item) for item in rule.template
        )
        path = self.resolve_request(final[0])
        if isinstance(path, Denied):
            return path
        return self._allowed(rule, path, final)

    def _allowed(self, rule: Rule, path: str, argv: tuple[bytes, ...]) -> Allowed:
        spec = ExecSpec(
            path=path.encode(),
            argv=argv,
            env=self.environment(rule),
            uid=rule.uid,
            gid=rule.gid,
            groups=rule.groups,
            cwd=rule.cwd,
            umask=rule.umask,
            rlimits=tuple((name, RLIMITS[name], value) for name, value in rule.rlimits),
        )
        return Allowed(rule, spec)

    def resolve_request(self, program: bytes) -> str | Denied:
        """The absolute path a requested program name stands for, or why it is refused."""
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

    def program_path(self, rule: Rule) -> str | None:
        """Where an ``[[allow]]`` rule's program is (None: not in the search path)."""
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
            env = dict(self.inherited())
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
                if key in self.inherited():
                    env[key] = self.inherited()[key]
        env.update(rule.setenv)
        return env

    def inherited(self) -> Mapping[bytes, bytes]:
        """What ``env = "inherit"`` passes on."""
        return server_environ() if self.base_env is None else self.base_env

    #: Requests decided by a policy file leave an audit line each.
    audited = True


class AllowAll:
    """The decision without ``--policy``: anything the server's user can run, looked up
    in the server's ``PATH``, in the server's environment, as the C sockexec does."""

    #: Nothing to audit: there is no policy to account for.
    audited = False
    source = "(no policy)"
    rules: tuple[Rule, ...] = ()

    def __init__(self) -> None:
        self._rule = Rule(kind="allow", name="*", index=0)

    def decide(self, argv: tuple[bytes, ...], peer_uid: int, peer_gid: int) -> Allowed:
        return Allowed(self._rule, ExecSpec(path=None, argv=argv, env=server_environ()))


#: What the broker decides with when it has no policy file.
ALLOW_ALL = AllowAll()

_SERVER_ENVIRON: dict[bytes, bytes] | None = None


def server_environ() -> Mapping[bytes, bytes]:
    """The server's environment as a plain dict, converted once (not per spawn), and
    after start-up removed what programs must not inherit (``LISTEN_FDS``…)."""
    global _SERVER_ENVIRON
    if _SERVER_ENVIRON is None:
        _SERVER_ENVIRON = dict(os.environb)
    return _SERVER_ENVIRON


def _current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _args_problem(rule: Rule, args: tuple[bytes, ...]) -> str | None:
    if rule.args is not None and args != rule.args:
        return f"arguments not allowed by {rule.label} (exactly {show_list(rule.args)})"
    if rule.args_prefix is not None and args[: len(rule.args_prefix)] != rule.args_prefix:
        return (
            f"arguments not allowed by {rule.label} (must start with {show_list(rule.args_prefix)})"
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


def show_list(values: Iterable[bytes]) -> str:
    """``['a', 'b']`` for logs and denials, each item printable."""
    return "[" + ", ".join(repr(printable(v)) for v in values) + "]"
