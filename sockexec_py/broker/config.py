"""The server's configuration: one frozen value built by the CLI or by tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sockexec_py.protocol import ServerLimits


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything the server needs to know; defaults are the C reference's.

    Attributes mirror the command line: ``backlog`` (-q), ``mode`` (-M),
    ``max_connections`` (-m, programs running at once), ``timeout`` (-t, seconds from
    accept, 0 = unlimited), ``kill_timeout`` (-k, seconds between TERM and KILL),
    ``debug`` (-d), then the additions.
    """

    socket_path: str
    backlog: int = 100
    mode: int = 0o660
    max_connections: int = 100
    timeout: float = 60.0
    kill_timeout: float = 10.0
    debug: bool = False
    max_queued: int = 1000
    max_frame: int = 64 << 20
    max_args: int = 10_000
    max_argv_bytes: int = 2 << 20
    drain_timeout: float = 2.0
    termsig_format: Literal["name", "number"] = "name"
    #: ``--policy FILE``: None runs anything the server's user can run.
    policy_path: str | None = None
    #: Where output a client does not read yet is spilled (None: the temp dir), and
    #: how much per connection and in all (0 disables spilling).
    spool_dir: str | None = None
    max_spool: int = 64 << 20
    max_spool_total: int = 1 << 30

    def limits(self) -> ServerLimits:
        """The per-request bounds handed to the protocol state machine."""
        return ServerLimits(
            max_frame=self.max_frame, max_args=self.max_args, max_argv_bytes=self.max_argv_bytes
        )

    @property
    def grace(self) -> float:
        """From a deadline (-t, or a rule's timeout) to the last-resort cut of the
        connection: the TERM-to-KILL wait, the drain, and a second. Past it a client
        that never reads, or a program that cannot be killed (uninterruptible sleep),
        no longer holds the connection."""
        return self.kill_timeout + self.drain_timeout + 1
