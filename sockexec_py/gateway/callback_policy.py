"""Which URLs callbacks may call (``--callback-allow``), and the checks against
server-side request forgery made where the connection is opened (the delivery
itself is :mod:`.callbacks`').

SSRF, and why each rule:

- A URL must match an allowed prefix: scheme, host and port exactly, and its path
  must start with the prefix's path (no ``.`` or ``..`` segments and no encoded
  ``.`` or ``/``, which a server would normalise past the prefix). No user info.
  Without ``--callback-allow`` a submit with a callback is refused (400).
- The host's addresses are resolved at each connection and every one is checked:
  loopback, link-local (cloud metadata services live there) and private (RFC
  1918, unique-local, CGNAT, documentation ranges...) are refused unless the
  prefix names that class (``loopback,private=https://ci.internal/hooks/``);
  multicast, unspecified, broadcast and reserved addresses are always refused.
- The connection goes to the address that was checked: the check runs inside the
  HTTP client's network backend (httpcore's, under httpx), which connects to the
  checked address itself, so a name that resolves differently a moment later (DNS
  rebinding) cannot slip past it; TLS still verifies the certificate for the name
  (that backend is :mod:`.callbacks`', which alone imports the HTTP client: a
  gateway without ``--callback-allow`` never loads it).
- Redirects are not followed (a 3xx fails the delivery), proxies from the
  environment are not used, and each attempt is bounded by ``--callback-timeout``.

Why httpx and not h11 directly: httpx (on trio through anyio) lets the
connection's backend be replaced, which is where the address is both checked and
connected to; everything else (TLS, HTTP/1.1 framing, timeouts) stays the
maintained client's.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

__all__ = [
    "ADDRESS_CLASSES",
    "AllowRule",
    "CallbackPolicy",
    "CallbackRefused",
    "classify",
]

ADDRESS_CLASSES = ("loopback", "private", "link-local")
_CLASSES_PREFIX = re.compile(r"([a-z-]+(?:,[a-z-]+)*)=(.*)", re.S)
_DOT_SEGMENT = re.compile(r"(^|/)\.{1,2}(/|$)")
_ENCODED = re.compile(r"%(2e|2f|5c)", re.I)
_DEFAULT_PORTS = {"http": 80, "https": 443}


class CallbackRefused(Exception):
    """A callback URL, or the address it resolves to, is not allowed (one line)."""


def _parts(url: str) -> tuple[SplitResult, int]:
    try:
        parts = urlsplit(url)
        host = parts.hostname  # a bracketed host that is no IPv6 address raises here
    except ValueError:
        raise CallbackRefused("the URL's host cannot be parsed") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise CallbackRefused("the scheme must be http or https")
    if not host:
        raise CallbackRefused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise CallbackRefused("user info in the URL is not allowed")
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise CallbackRefused("the port is not a number from 1 to 65535") from None
    return parts, port


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One ``--callback-allow`` value: ``[CLASSES=]PREFIX``, where CLASSES is a comma
    list of :data:`ADDRESS_CLASSES` the prefix may reach besides public addresses."""

    text: str
    scheme: str
    host: str
    port: int
    path: str
    classes: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> AllowRule:
        """Error handling: ``ValueError`` with one line (a usage error)."""
        classes: frozenset[str] = frozenset()
        prefix = text
        match = _CLASSES_PREFIX.fullmatch(text)
        if match is not None and "://" not in match[1]:
            classes = frozenset(match[1].split(","))
            unknown = classes - set(ADDRESS_CLASSES)
            if unknown:
                raise ValueError(
                    f"unknown address class {', '.join(sorted(unknown))} in {text!r} "
                    f"(known: {', '.join(ADDRESS_CLASSES)})"
                )
            prefix = match[2]
        try:
            parts, port = _parts(prefix)
        except CallbackRefused as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        if parts.query or parts.fragment:
            raise ValueError(f"{text!r}: a prefix has no query or fragment")
        return cls(text, parts.scheme, parts.hostname or "", port, parts.path or "/", classes)

    def matches(self, parts: SplitResult, port: int) -> bool:
        return (
            parts.scheme == self.scheme
            and parts.hostname == self.host
            and port == self.port
            and (parts.path or "/").startswith(self.path)
        )


def classify(address: str) -> str:
    """``public``, ``loopback``, ``private``, ``link-local`` or ``forbidden``."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return "forbidden"
    if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255"):
        return "forbidden"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_global:
        return "public"
    return "private"


class CallbackPolicy:
    """The allowed prefixes (``--callback-allow``); none: callbacks are refused."""

    def __init__(self, rules: Iterable[AllowRule]) -> None:
        self.rules = tuple(rules)

    def rule_for(self, url: str) -> AllowRule:
        """The rule ``url`` falls under (the longest matching prefix).

        Error handling: :class:`CallbackRefused` saying why (names the flag)."""
        if not self.rules:
            raise CallbackRefused(
                "callbacks are off: start the gateway with --callback-allow PREFIX "
                "(and --callback-secret-file)"
            )
        parts, port = _parts(url)
        if _DOT_SEGMENT.search(parts.path) or _ENCODED.search(parts.path):
            raise CallbackRefused("the path has . or .. segments or encoded / or .")
        found = [rule for rule in self.rules if rule.matches(parts, port)]
        if not found:
            raise CallbackRefused("the URL matches no --callback-allow prefix")
        return max(found, key=lambda rule: len(rule.path))
