"""Sizes and durations of a run: the presets (full, ``--quick``, ``--tiny``), the
measures and their targets, and the size syntax of the command line."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
#: The C sockexec's sources and build script, beside the repository (see its README).
REFERENCE_DIR = ROOT.parent / "shared" / "reference"
MiB = 1 << 20
GiB = 1 << 30
RECV_SIZE = 256 * 1024
STDIN_CHUNK = 64 * 1024
END_OF_STDIN = b"0:,"


@dataclass(frozen=True)
class Config:
    """Sizes and durations of one run (``--quick``, ``--tiny`` and flags set them)."""

    seq_seconds: float = 10.0
    limit_seconds: float = 5.0
    conc_clients: int = 16
    conc_seconds: float = 10.0
    stream_bytes: int = GiB
    duplex_bytes: int = 512 * MiB
    slow_bytes: int = GiB
    slow_idle: float = 6.0
    sessions: int = 1000
    session_sleep: float = 3.0
    repeat: int = 3
    parser: str = "fast"


PRESETS: dict[str, Config] = {
    "full": Config(),
    "quick": Config(
        seq_seconds=4.0,
        limit_seconds=2.0,
        conc_seconds=4.0,
        stream_bytes=512 * MiB,
        duplex_bytes=256 * MiB,
        slow_bytes=256 * MiB,
        repeat=2,
    ),
    "tiny": Config(
        seq_seconds=0.3,
        limit_seconds=0.2,
        conc_clients=4,
        conc_seconds=0.3,
        stream_bytes=4 * MiB,
        duplex_bytes=2 * MiB,
        slow_bytes=4 * MiB,
        slow_idle=0.3,
        sessions=50,
        session_sleep=0.2,
        repeat=1,
    ),
}

MEASURES = ("1", "2", "3", "4", "5", "6", "7", "8")
#: The rows also run against the C sockexec when it is available.
REFERENCE_MEASURES = ("1", "2", "3", "4", "6")

TARGETS = {
    "1": 0.8,  # x the posix_spawn limit
    "2": 1.2,  # x the sequential figure of (1)
    "3": 0.4,  # x the raw pipe limit
    "4": 0.3,  # x the raw pipe limit
    "5": 4.0,  # MiB of RSS growth, at most
    "6": 64.0,  # MiB of peak RSS, at most (and every session succeeds)
    "8": 2.0,  # ms per run of a run-as rule over a plain spawn, at most (p50)
}


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``512M``, ``1G`` (binary units) -> bytes."""
    match = re.fullmatch(r"(\d+)([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 64K, 512M, 1G)")
    shift = {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2).upper()]
    return int(match.group(1)) << shift


def format_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"
