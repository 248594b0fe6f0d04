"""What every measure shares: the row it returns, the run's context, and the
formatting of figures."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .config import Config


class Daemon(Protocol):
    """What a measure reads of the daemon under test: ours (``BrokerProcess``) or the
    C sockexec (:class:`~bench.reference.ReferenceDaemon`)."""

    path: Path

    def cpu_seconds(self) -> tuple[float, float]: ...

    def rss_kib(self, field: str = "VmRSS") -> int: ...


@dataclass
class Row:
    """One line of the table; ``ref`` and ``vs_ref`` hold the C sockexec's figure and
    ours over it, when it ran."""

    key: str
    name: str
    ours: str = "-"
    limit: str = "-"
    ratio: str = "-"
    target: str = "-"
    result: str = "n/a"
    ref: str = "-"
    vs_ref: str = "-"
    cpu: str = "-"
    ok: bool = True
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """The run's settings, and the figures a later measure compares with."""

    config: Config
    workdir: Path
    log: Callable[[str], None]
    true_path: str
    seq_rate: float | None = None  # row 1, the reference of rows 2 and 7
    pipe_limit: float | None = None  # row 3, the limit of row 4


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def percent(share: float) -> str:
    return f"{share * 100:.0f}%"


def quantile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]
