"""Callbacks over HTTP: which URLs may be called (``--callback-allow``), the checks
against server-side request forgery, the signature, and the delivery loop with
its retries. The records (pending, attempts, delivered) are the jobs layer's
(:mod:`sockexec_py.jobs.callbacks`).

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
  rebinding) cannot slip past it; TLS still verifies the certificate for the name.
- Redirects are not followed (a 3xx fails the delivery), proxies from the
  environment are not used, and each attempt is bounded by ``--callback-timeout``.

Why httpx and not h11 directly: httpx (on trio through anyio) lets the
connection's backend be replaced, which is where the address is both checked and
connected to; everything else (TLS, HTTP/1.1 framing, timeouts) stays the
maintained client's.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

import httpcore
import httpx
import trio

from sockexec_py.jobs.document import CallbackAttempt
from sockexec_py.jobs.events import Event, EventHub
from sockexec_py.jobs.store import Store

from .watched import WatchedFile

__all__ = [
    "ADDRESS_CLASSES",
    "AllowRule",
    "CallbackPolicy",
    "Deliverer",
    "DeliverySettings",
    "sign",
]

log = logging.getLogger("sockexec_py.gateway.callbacks")

#: The address classes a prefix may open, beyond public addresses.
ADDRESS_CLASSES = ("loopback", "private", "link-local")
_CLASSES_PREFIX = re.compile(r"([a-z-]+(?:,[a-z-]+)*)=(.*)", re.S)
_DOT_SEGMENT = re.compile(r"(^|/)\.{1,2}(/|$)")
_ENCODED = re.compile(r"%(2e|2f|5c)", re.I)
_DEFAULT_PORTS = {"http": 80, "https": 443}


class CallbackRefused(Exception):
    """A callback URL, or the address it resolves to, is not allowed (one line)."""


def _parts(url: str) -> tuple[SplitResult, int]:
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise CallbackRefused("the scheme must be http or https")
    if not parts.hostname:
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


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to checked addresses: resolve, check every address against
    the rule's classes, then connect to one of those very addresses."""

    def __init__(self, classes: frozenset[str]) -> None:
        self._classes = classes
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if scope.cancelled_caught:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out")
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in addresses:
            kind = classify(address)
            if kind != "public" and kind not in self._classes:
                raise CallbackRefused(
                    f"{host} resolves to {address} ({kind}), which the --callback-allow "
                    "prefix does not allow"
                )
        error: Exception = httpcore.ConnectError(f"{host} has no address")
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


class _CheckedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over :class:`_CheckedBackend` (httpx builds its pool
    without a backend argument; ours replaces it, same settings)."""

    def __init__(self, classes: frozenset[str], context: ssl.SSLContext) -> None:
        super().__init__(verify=context, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=context,
            max_connections=64,
            max_keepalive_connections=16,
            keepalive_expiry=5.0,
            network_backend=_CheckedBackend(classes),
        )


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 with the secret over ``<timestamp>.`` and the
    body's exact bytes (the timestamp is signed, so a captured request cannot be
    replayed later with a fresh one)."""
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """Each attempt's timeout; at most ``attempts`` attempts, ``backoff`` seconds
    before the second, doubling (at most 5 minutes), none later than ``deadline``
    seconds after the job ended; at most ``concurrency`` deliveries at once."""

    timeout: float = 10.0
    attempts: int = 6
    backoff: float = 1.0
    deadline: float = 3600.0
    concurrency: int = 64


class Deliverer:
    """Delivers pending callbacks: those left by a previous run at start, then each
    job's as it ends (the :class:`EventHub` says which). Runs until cancelled."""

    def __init__(
        self,
        store: Store,
        hub: EventHub,
        policy: CallbackPolicy,
        secret: Callable[[], bytes],
        settings: DeliverySettings,
        clock: Callable[[], float] = time.time,
        count: Callable[[str], object] = lambda outcome: None,
    ) -> None:
        self.store = store
        self.count = count
        self.policy = policy
        self.secret = secret
        self.settings = settings
        self.clock = clock
        context = ssl.create_default_context()
        self._clients = {
            rule: httpx.AsyncClient(
                transport=_CheckedTransport(rule.classes, context),
                follow_redirects=False,
                trust_env=False,
                timeout=httpx.Timeout(settings.timeout),
                headers={"User-Agent": "sockexec-gateway"},
            )
            for rule in policy.rules
        }
        self._due: dict[str, float] = {}
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(settings.concurrency)
        hub.add_listener(self._on_event)

    def _on_event(self, event: Event) -> None:
        if event.callback:
            self._schedule(event.job_id, 0.0)

    def _schedule(self, job_id: str, at: float) -> None:
        self._due[job_id] = at
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            for job_id, at in await self.store.due_callbacks():
                self._due.setdefault(job_id, at)
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    self._wake = trio.Event()
                    now = self.clock()
                    for job_id in [job_id for job_id, at in self._due.items() if at <= now]:
                        del self._due[job_id]
                        nursery.start_soon(self._deliver, job_id)
                    delay = min(self._due.values(), default=math.inf) - now
                    with trio.move_on_after(max(0.0, delay)):
                        await self._wake.wait()
        finally:
            with trio.CancelScope(shield=True):
                for client in self._clients.values():
                    await client.aclose()

    async def _deliver(self, job_id: str) -> None:
        async with self._limiter:
            try:
                await self._attempt(job_id)
            except Exception:  # never the loop's end: the next start tries again
                log.exception("callback for job %s: the attempt failed unexpectedly", job_id)

    async def _attempt(self, job_id: str) -> None:
        delivery = await self.store.delivery(job_id)
        if delivery is None:
            return
        started = self.clock()
        status: int | None = None
        retry = True
        try:
            rule = self.policy.rule_for(delivery.url)
            stamp = int(started)
            headers = {
                "Content-Type": "application/json",
                "X-Sockexec-Timestamp": str(stamp),
                "X-Sockexec-Signature": sign(self.secret(), stamp, delivery.body),
                "X-Sockexec-Delivery": job_id,
                "X-Sockexec-Attempt": str(delivery.attempts + 1),
            }
            with trio.move_on_after(self.settings.timeout) as scope:
                response = await self._clients[rule].post(
                    delivery.url, content=delivery.body, headers=headers
                )
            if scope.cancelled_caught:
                error: str | None = f"no answer within {self.settings.timeout:g} s"
            else:
                status = response.status_code
                error = _status_error(response)
                retry = status >= 500 or status in (408, 429)
        except CallbackRefused as exc:
            error, retry = f"refused: {exc}", False
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        attempt = CallbackAttempt(started, status, error, round(self.clock() - started, 3))
        next_at = None
        if error is not None and retry and delivery.attempts + 1 < self.settings.attempts:
            first = delivery.first_at if delivery.first_at is not None else started
            next_at = started + min(300.0, self.settings.backoff * 2**delivery.attempts)
            if next_at > first + self.settings.deadline:
                next_at = None
        await self.store.record_attempt(job_id, attempt, next_at=next_at, delivered=error is None)
        self.count("delivered" if error is None else "retry" if next_at else "failed")
        if error is None:
            log.info("callback for job %s delivered (%s)", job_id, status)
        elif next_at is not None:
            log.info(
                "callback for job %s: %s; next attempt in %.1f s", job_id, error, next_at - started
            )
            self._schedule(job_id, next_at)
        else:
            log.warning("callback for job %s failed: %s", job_id, error)


def _status_error(response: httpx.Response) -> str | None:
    status = response.status_code
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        location = response.headers.get("location", "")[:200]
        return f"redirect {status} to {location!r} not followed"
    return f"HTTP {status}"


def parse_secret(data: bytes, path: str) -> bytes:
    """The HMAC secret: the file's bytes without the trailing newline.

    Error handling: ``ValueError`` (one line) when empty."""
    secret = data.rstrip(b"\r\n")
    if not secret:
        raise ValueError(f"the callback secret file {path} is empty")
    return secret


def secret_file(path: str) -> WatchedFile[bytes]:
    """The callback secret, read again when the file changes (a rotated secret
    signs the next attempt; an empty or unreadable file keeps the last one).

    Error handling: ``ValueError`` (one line) when unreadable or empty at first."""
    return WatchedFile(path, parse_secret, "the callback secret file")
