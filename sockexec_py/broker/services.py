"""What a connection uses of its server, and the phases it goes through (shared by
the task-driven :mod:`.connection` and the callback-driven :mod:`.oneshot`)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .admission import Admission
from .config import ServerConfig
from .hangup import HangupMonitor
from .spool import SpoolBudget
from .supervisor import Supervisor

__all__ = ["Cancellable", "Phase", "Services"]


class Cancellable(Protocol):
    """What cuts the request and queued phases short: a cancel scope, or the one-shot
    driver (:mod:`.oneshot`) while it reads the request."""

    def cancel(self) -> None: ...


class Phase(enum.Enum):
    REQUEST = "request"
    QUEUED = "queued"
    RUNNING = "running"
    DRAINING = "draining"
    CLOSING = "closing"


@dataclass(frozen=True, slots=True)
class Services:
    """What a connection uses of its server."""

    config: ServerConfig
    admission: Admission
    supervisor: Supervisor
    hangups: HangupMonitor
    spool_budget: SpoolBudget
    shutting_down: Callable[[], bool]
