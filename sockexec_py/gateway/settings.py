"""The gateway's settings: one frozen value built by its CLI or by tests."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class JobsSettings:
    """The jobs API (on with a data dir): where its state lives and how it schedules.

    ``max_running`` jobs at once in all, ``limits.get(name, default_limit)`` per
    name, at most ``max_queue`` waiting per name (429 past it); ``output_max``
    bytes stored per job; finished jobs kept ``keep_for`` seconds and at most
    ``keep_max`` of them (None: no bound of that kind), their events as long;
    callbacks (README "Callbacks") and monitors (README "Monitor").
    """

    data_dir: str
    max_running: int = 8
    limits: Mapping[str, int] = field(default_factory=dict)
    default_limit: int = 1
    max_queue: int = 1000
    output_max: int = 64 << 20
    keep_for: float | None = 7 * 86400.0
    keep_max: int | None = None
    kill_grace: float = 15.0
    #: ``--callback-allow`` values (:class:`~.callback_policy.AllowRule` syntax); none:
    #: callbacks are refused.
    callback_allow: tuple[str, ...] = ()
    callback_secret_file: str | None = None
    callback_timeout: float = 10.0
    callback_attempts: int = 6
    callback_backoff: float = 1.0
    callback_deadline: float = 3600.0
    #: Events a monitor may have waiting before it is dropped (``overflow``).
    monitor_queue: int = 4096
    #: Seconds of the gateway's time one monitor message may take: a ``batch=1``
    #: monitor sends at most one array every (monitors connected x this), so many
    #: monitors do not crowd out the gateway's other work.
    monitor_pace: float = 250e-6


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Where the broker is, where to listen, and the limits of a request.

    ``max_body`` bounds the JSON request body (and so the stdin of a one-shot
    request); ``max_output`` bounds the output (stdout and stderr together) a one-shot
    request collects before it answers; ``max_ws_stdin`` bounds the stdin sent over
    one WebSocket session;
    ``default_timeout``/``max_timeout`` bound a session's duration (the broker's own
    ``-t`` still applies). ``policy_file`` is the broker's policy, read by the
    dashboard's run form; ``public_origin`` the dashboard's origin as browsers see it
    (behind a TLS proxy), else the request's scheme and Host.
    """

    socket_path: str
    host: str = "127.0.0.1"
    port: int = 8080
    token_file: str | None = None
    max_body: int = 8 << 20
    max_output: int = 16 << 20
    max_ws_stdin: int = 64 << 20
    max_argv: int = 1000
    default_timeout: float = 60.0
    max_timeout: float = 3600.0
    jobs: JobsSettings | None = None
    policy_file: str | None = None
    public_origin: str | None = None

    @property
    def loopback(self) -> bool:
        """True when the listen address is reachable from this machine only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
