"""Bearer-token authentication from a token file, reloaded when the file changes, and
the :class:`Principal` a request speaks for once it passed."""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request speaks for: a token (named in logs by its fingerprint, never by
    itself) or, on a gateway without tokens, anyone who reaches it on loopback.

    :meth:`allows` says whether it may do ``action`` (``exec``, ``run``, ``cancel``,
    ``status``, ``monitor``, ``admin``) on the program or command ``name``; every
    principal may do everything today (scoped tokens come with issue 16).
    """

    fingerprint: str | None

    def allows(self, action: str, name: str | None = None) -> bool:
        return True


#: A gateway without tokens (loopback only).
ANONYMOUS = Principal(None)


def fingerprint(token: bytes) -> str:
    """A short name for a token in logs and audit lines: not the token, not enough
    to guess it."""
    return "tok:" + hashlib.sha256(token).hexdigest()[:12]


class TokenFileError(Exception):
    """The token file cannot be read or holds no token."""


@dataclass(frozen=True, slots=True)
class _Snapshot:
    identity: tuple[int, int, int, int]  # (dev, ino, size, mtime_ns)
    tokens: tuple[bytes, ...]


class TokenStore:
    """Tokens from a file: one per line, blank lines and ``#`` comments ignored.

    The file is checked (one ``stat``) on every request and re-read when it changed,
    so tokens can be rotated without a restart. A file that becomes unreadable or
    empty keeps the last good tokens (fail closed: never "no auth").
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._snapshot = self._load()

    def _load(self) -> _Snapshot:
        try:
            st = os.stat(self.path)
            with open(self.path, "rb") as f:
                text = f.read()
        except OSError as exc:
            raise TokenFileError(f"cannot read token file {self.path}: {exc.strerror}") from None
        tokens = tuple(
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith(b"#")
        )
        if not tokens:
            raise TokenFileError(f"token file {self.path} holds no token")
        return _Snapshot((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), tokens)

    def _current(self) -> tuple[bytes, ...]:
        try:
            st = os.stat(self.path)
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if identity != self._snapshot.identity:
                self._snapshot = self._load()
        except (OSError, TokenFileError):
            pass  # keep the last good tokens
        return self._snapshot.tokens

    def check(self, authorization: str | None) -> Principal | None:
        """The principal of ``authorization`` when it is ``Bearer <a valid token>``.

        Every token is compared in constant time, and all of them are compared, so
        timing says nothing about which token nearly matched.
        """
        if not authorization or not authorization.startswith("Bearer "):
            return None
        offered = authorization[len("Bearer ") :].strip().encode()
        found: bytes | None = None
        for token in self._current():
            if hmac.compare_digest(offered, token):
                found = token
        return None if found is None else Principal(fingerprint(found))
