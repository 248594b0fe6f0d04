"""The gateway's settings: one frozen value built by its CLI or by tests."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Where the broker is, where to listen, and the limits of a request.

    ``max_body`` bounds the JSON request body (and so the stdin of a one-shot
    request); ``max_output`` bounds the output (stdout and stderr together) a one-shot
    request collects before it answers; ``max_ws_stdin`` bounds the stdin sent over
    one WebSocket session;
    ``default_timeout``/``max_timeout`` bound a session's duration (the broker's own
    ``-t`` still applies).
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

    @property
    def loopback(self) -> bool:
        """True when the listen address is reachable from this machine only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
