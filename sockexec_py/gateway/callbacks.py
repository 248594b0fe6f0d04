"""Callbacks over HTTP: the signature, the secret, and the delivery loop with its
retries, and the HTTP client's network backend that connects only to addresses
the URL's rule allows. Which URLs may be called and why each SSRF check is made
are :mod:`.callback_policy`'s; the records (pending, attempts, delivered)
are the jobs layer's (:mod:`sockexec_py.jobs.callbacks`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx
import trio

from sockexec_py.jobs.document import CallbackAttempt
from sockexec_py.jobs.events import Event, EventHub
from sockexec_py.jobs.store import Store

from .callback_policy import CallbackPolicy, CallbackRefused, classify
from .watched import WatchedFile

__all__ = ["Deliverer", "DeliverySettings", "secret_file", "sign"]

log = logging.getLogger("sockexec_py.gateway.callbacks")


#: The address classes a prefix may open, beyond public addresses.
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
                transport=checked_transport(rule.classes, context),
                follow_redirects=False,
                trust_env=False,
                timeout=httpx.Timeout(settings.timeout),
                # No compressed answers: their bodies are not read anyway.
                headers={"User-Agent": "sockexec-gateway", "Accept-Encoding": "identity"},
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
            error: str | None = f"no answer within {self.settings.timeout:g} s"
            with trio.move_on_after(self.settings.timeout):
                # Only the status and headers are read: the body of the answer,
                # whatever its size, is never (the connection is then closed).
                async with self._clients[rule].stream(
                    "POST", delivery.url, content=delivery.body, headers=headers
                ) as response:
                    status = response.status_code
                    error = _status_error(response)
                    retry = status >= 500 or status in (408, 429)
        except CallbackRefused as exc:
            error, retry = f"refused: {exc}", False
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except httpx.InvalidURL as exc:  # the policy took it, the client does not
            error, retry = f"refused: the HTTP client cannot use the URL: {exc}", False
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
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:  # a network error like any other: retried
                raise httpcore.ConnectError(
                    f"cannot resolve {host}: {exc.strerror or exc}"
                ) from None
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


def checked_transport(classes: frozenset[str], context: ssl.SSLContext) -> httpx.AsyncHTTPTransport:
    """An httpx transport that connects only to addresses of ``classes`` (or public)."""
    return _CheckedTransport(classes, context)
