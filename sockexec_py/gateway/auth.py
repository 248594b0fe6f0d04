"""Bearer-token authentication from a token file, reloaded when the file changes, and
the :class:`Principal` a request speaks for once it passed: what it may do (scoped
tokens), and its fingerprint, the only name a token has in logs and audit lines.

The token file, one token per line (blank lines and ``#`` comments ignored)::

    s3cret-full-access
    ci-7f3a  actions=run,status,monitor  names=build,test  expires=2030-01-01T00:00:00Z
    ops-2b9e actions=status,monitor

A bare token may do everything (the file of earlier versions means what it meant).
Optional fields after it, separated by spaces or tabs, narrow it: ``actions=`` (a
comma list of :data:`ACTIONS`), ``names=`` (the programs, argv[0] or policy command
names, and job names it applies to: exact names, ``prefix*``, or ``*`` for all) and
``expires=`` (RFC 3339 with an offset, or Unix time). A line that does not parse
makes the whole file invalid: at start-up that is a usage error naming the line;
when a running gateway reads it, the last good tokens stay in force (fail closed).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sockexec_py.jobs import InvalidField, parse_start_at

from .request import HTTPError
from .watched import WatchedFile

#: Audit lines: who (a token's fingerprint) did or was refused what. Never a token.
audit = logging.getLogger("sockexec_py.gateway.audit")

#: Every action a token may be scoped to (README "Scoped tokens" has the table of
#: which endpoint needs which).
ACTIONS = ("exec", "run", "cancel", "status", "monitor", "admin")
ALL_ACTIONS = frozenset(ACTIONS)


@dataclass(frozen=True, slots=True)
class NameScope:
    """The names a token's actions apply to: exact names and name prefixes
    (``build-*``); ``everything`` for ``*``."""

    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    everything: bool = False

    @classmethod
    def parse(cls, text: str) -> NameScope:
        exact: set[str] = set()
        prefixes: list[str] = []
        for item in text.split(","):
            if item == "*":
                return cls(everything=True)
            if not item or "*" in item[:-1]:
                raise ValueError(f"bad name {item!r} (a name, prefix* or *)")
            if item.endswith("*"):
                prefixes.append(item[:-1])
            else:
                exact.add(item)
        return cls(frozenset(exact), tuple(prefixes))

    def covers(self, name: str) -> bool:
        """Whether ``name`` is in scope. A name taken by a prefix may not have a
        ``..`` segment: ``/opt/jobs/../../bin/sh`` starts with ``/opt/jobs/`` but
        runs ``/bin/sh``."""
        if self.everything or name in self.exact:
            return True
        return name.startswith(self.prefixes) and ".." not in name.split("/")

    def __str__(self) -> str:
        if self.everything:
            return "*"
        return ",".join(sorted(self.exact) + [f"{prefix}*" for prefix in self.prefixes])


EVERY_NAME = NameScope(everything=True)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request speaks for: a token (named in logs by its fingerprint, never by
    itself) or, on a gateway without tokens, anyone who reaches it on loopback.

    :meth:`allows` says whether it may do ``action`` (one of :data:`ACTIONS`) on the
    program or job ``name``; with ``name=None``, on at least one name (a listing
    then narrows to :meth:`names_for`).
    """

    fingerprint: str | None
    actions: frozenset[str] = ALL_ACTIONS
    names: NameScope = EVERY_NAME
    expires: float | None = None

    def allows(self, action: str, name: str | None = None) -> bool:
        if action not in self.actions:
            return False
        return name is None or self.names.covers(name)

    def names_for(self, action: str) -> NameScope | None:
        """The names ``action`` is allowed on; ``None`` when it is allowed on none."""
        return self.names if action in self.actions else None

    def listing(self, action: str = "status") -> tuple[frozenset[str] | None, tuple[str, ...]]:
        """A listing's narrowing to the names ``action`` is allowed on, as the store's
        ``ListQuery(only_names=, only_prefixes=)`` take it: ``(None, ())`` for every
        name, ``(frozenset(), ())`` for none."""
        names = self.names_for(action)
        if names is None:
            return frozenset(), ()
        if names.everything:
            return None, ()
        return names.exact, names.prefixes

    def missing(self, action: str, name: str | None = None) -> str:
        """The scope a refusal names: ``status on 'build'``, or ``admin``."""
        return action if name is None else f"{action} on {name!r}"

    @property
    def scoped(self) -> bool:
        return self.actions != ALL_ACTIONS or not self.names.everything


#: A gateway without tokens (loopback only): anyone there may do everything.
ANONYMOUS = Principal(None)
#: A request to an endpoint that needs no token, on a gateway with tokens: nothing.
NOBODY = Principal(None, actions=frozenset())


def fingerprint(token: bytes) -> str:
    """A short name for a token in logs and audit lines: not the token, not enough
    to guess it."""
    return "tok:" + hashlib.sha256(token).hexdigest()[:12]


class TokenFileError(Exception):
    """The token file cannot be read, holds no token, or has a line that does not
    parse (the message names the line, never the token)."""


@dataclass(frozen=True, slots=True)
class _Token:
    secret: bytes
    principal: Principal


_FIELD = re.compile(rb"([a-z]+)=(\S+)")


def _parse_line(number: int, line: bytes, path: str) -> _Token:
    token, *fields = line.split()
    where = f"token file {path} line {number}"
    actions, names, expires = ALL_ACTIONS, EVERY_NAME, None
    for field in fields:
        match = _FIELD.fullmatch(field)
        if match is None:
            raise TokenFileError(f"{where}: expected key=value after the token")
        key, value = match[1].decode(), match[2].decode("utf-8", "replace")
        if key == "actions":
            wanted = frozenset(value.split(","))
            if not wanted <= ALL_ACTIONS:
                unknown = ", ".join(sorted(wanted - ALL_ACTIONS))
                raise TokenFileError(
                    f"{where}: unknown action {unknown} (known: {', '.join(ACTIONS)})"
                )
            actions = wanted
        elif key == "names":
            try:
                names = NameScope.parse(value)
            except ValueError as exc:
                raise TokenFileError(f"{where}: names: {exc}") from None
        elif key == "expires":
            try:
                expires = parse_start_at(float(value) if _is_number(value) else value, "expires")
            except InvalidField as exc:
                raise TokenFileError(f"{where}: {exc}") from None
        else:
            raise TokenFileError(f"{where}: unknown field {key} (actions, names, expires)")
    return _Token(token, Principal(fingerprint(token), actions, names, expires))


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def parse_tokens(text: bytes, path: str) -> tuple[_Token, ...]:
    """Every token of a token file's whole text (see the module docstring).

    Error handling: :class:`TokenFileError` naming the first bad line."""
    tokens = tuple(
        _parse_line(number, line.strip(), path)
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith(b"#")
    )
    if not tokens:
        raise TokenFileError(f"token file {path} holds no token")
    return tokens


class TokenStore:
    """Tokens from a file (see the module docstring), read again when it changes
    (:class:`~.watched.WatchedFile`: one ``stat`` per request; a file that changes
    while read, is empty or does not parse keeps the last good tokens, so it fails
    closed, never "no auth"). Rewrite it by renaming a new file over it to make
    every change visible at once; an in-place rewrite is safe too when written in
    one ``write`` (one cut mid-line is not taken until it settles: a token whose
    fields are not there yet would read as a full-access one).
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._file = WatchedFile(path, parse_tokens, "token file", TokenFileError)

    def _current(self) -> tuple[_Token, ...]:
        return self._file.current()

    def check(self, authorization: str | None) -> Principal | None:
        """The principal of ``authorization`` when it is ``Bearer <a valid token>``.

        Every token is compared in constant time, and all of them are compared, so
        timing says nothing about which token nearly matched. An expired token is
        returned too (the caller refuses it with its own answer).
        """
        if not authorization or not authorization.startswith("Bearer "):
            return None
        offered = authorization[len("Bearer ") :].strip().encode()
        found: _Token | None = None
        for token in self._current():
            if hmac.compare_digest(offered, token.secret):
                found = token
        return None if found is None else found.principal

    def expired(self, principal: Principal) -> bool:
        return principal.expires is not None and principal.expires <= self.clock()


def describe_expiry(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def audit_name(principal: Principal) -> str:
    """How audit lines name who acted: the token's fingerprint, or ``anonymous``."""
    return principal.fingerprint or "anonymous"


def require(principal: Principal, action: str, name: str | None = None) -> None:
    """Refuse (403 ``missing_scope``, naming it) unless ``principal`` may do
    ``action`` on ``name``; the refusal goes to the audit log by fingerprint."""
    if not principal.allows(action, name):
        scope = principal.missing(action, name)
        audit.info("refused %s: missing scope %s", audit_name(principal), scope)
        raise HTTPError(403, "missing_scope", f"this token lacks the scope {scope}")
