"""Dashboard logins: a token typed once, exchanged for a session cookie.

Sessions live on the server only, in memory: the cookie carries a random 256-bit id
and nothing else. What the server keeps per session is what maps it to a
:class:`~sockexec_py.gateway.auth.Principal`: the token that was typed (or nothing
on a gateway without tokens). The principal is derived from that token again on
every request (:meth:`Logins.principal`), so a token removed from the token file,
or given other scopes (issue 16), takes effect on the sessions opened with it at
once; the session never outlives its token.

Bounded: at most ``max_logins`` sessions (the least recently used one is dropped
for a new one), each expiring ``idle`` seconds after its last use and ``lifetime``
seconds after the login, whatever its use. The store is indexed by a hash of the
id, so the ids themselves are not kept, and lookups compare digests, not secrets.

Each session has its own CSRF token, sent back by the page with every change
(a form field or the ``X-CSRF-Token`` header).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sockexec_py.gateway.auth import ANONYMOUS, Principal, TokenStore

#: Cookie holding the session id.
SESSION_COOKIE = "sockexec_session"
#: Cookie of the login form's CSRF token (double submit: before any session exists).
LOGIN_COOKIE = "sockexec_login"


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


def same_secret(offered: str | None, expected: str) -> bool:
    """Constant-time comparison of a token sent by the page with ours (an empty one
    never matches)."""
    if not offered or not expected:
        return False
    return hmac.compare_digest(offered.encode(), expected.encode())


@dataclass(slots=True)
class Login:
    """One session: its token (``None`` on a gateway without tokens), its CSRF
    token and its times (``clock`` seconds)."""

    token: str | None
    csrf: str
    created: float
    used: float


class Logins:
    """The sessions of one gateway.

    Args:
        tokens: the gateway's tokens, or ``None`` (loopback, no tokens: every session
            speaks for :data:`~sockexec_py.gateway.auth.ANONYMOUS`).
        max_logins: sessions kept at most.
        idle: seconds a session lives after its last use.
        lifetime: seconds a session lives after its login.
    """

    def __init__(
        self,
        tokens: TokenStore | None,
        *,
        max_logins: int = 1000,
        idle: float = 8 * 3600.0,
        lifetime: float = 24 * 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tokens = tokens
        self.max_logins = max_logins
        self.idle = idle
        self.lifetime = lifetime
        self.clock = clock
        self._logins: OrderedDict[bytes, Login] = OrderedDict()

    def __len__(self) -> int:
        return len(self._logins)

    def check_token(self, token: str) -> Principal | None:
        """The principal of a token typed on the login page, or of a session's
        token at each request (``None``: unknown or expired, so a session ends
        when its token expires)."""
        if self.tokens is None:
            return ANONYMOUS
        if not token or any(ch in token for ch in "\r\n"):
            return None
        principal = self.tokens.check(f"Bearer {token}")
        if principal is None or self.tokens.expired(principal):
            return None
        return principal

    def open(self, token: str | None) -> tuple[str, Login]:
        """A new session for a checked token; returns its id (the cookie's value).

        A login always makes a new id (a session id planted before the login is
        never promoted: no session fixation)."""
        now = self.clock()
        session_id = secrets.token_urlsafe(32)
        login = Login(token, secrets.token_urlsafe(32), now, now)
        self._logins[_digest(session_id)] = login
        self._expire(now)
        while len(self._logins) > self.max_logins:
            self._logins.popitem(last=False)
        return session_id, login

    def find(self, session_id: str | None) -> tuple[Login, Principal] | None:
        """The live session of a cookie and who it speaks for, or ``None`` (unknown,
        expired, or its token is no longer valid: then it is closed)."""
        if not session_id or len(session_id) > 128:
            return None
        key = _digest(session_id)
        login = self._logins.get(key)
        if login is None:
            return None
        now = self.clock()
        if now - login.used > self.idle or now - login.created > self.lifetime:
            del self._logins[key]
            return None
        principal = ANONYMOUS if login.token is None else self.check_token(login.token)
        if principal is None:
            del self._logins[key]
            return None
        login.used = now
        self._logins.move_to_end(key)
        return login, principal

    def close(self, session_id: str | None) -> None:
        if session_id:
            self._logins.pop(_digest(session_id), None)

    def _expire(self, now: float) -> None:
        """Drop expired sessions from the least recently used end (each used one
        moved to the other end, so the scan stops at the first live one)."""
        while self._logins:
            key, login = next(iter(self._logins.items()))
            if now - login.used <= self.idle and now - login.created <= self.lifetime:
                return
            del self._logins[key]
