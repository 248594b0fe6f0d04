"""The table (text for the terminal, Markdown for ``bench/RESULTS.md``), the facts of
the machine it was measured on, and the writing of RESULTS.md.

``--results`` rewrites RESULTS.md above the hand-written notes and keeps the notes:
everything from the line starting with :data:`NOTES_HEADING` on.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .config import ROOT, Config, format_size
from .measure import Row
from .reference import Reference

COLUMNS = (
    ("#", "key"),
    ("measure", "name"),
    ("ours", "ours"),
    ("limit / reference (same run)", "limit"),
    ("ratio", "ratio"),
    ("target", "target"),
    ("result", "result"),
    ("C sockexec 3.1.1 (same run)", "ref"),
    ("ours/C", "vs_ref"),
    ("CPU % broker/progs/client/other", "cpu"),
)
_REFERENCE_COLUMNS = ("ref", "vs_ref")

LEGEND = (
    "ratio = ours / limit: higher is better (rows 1-4). Rows 5-6: lower RSS is better. "
    "Row 8: extra time per run of a run-as rule, lower is better. "
    "CPU % = CPU time over wall time during our runs (100 = one core busy) of the broker, "
    "the programs it ran, the benchmark's clients, and everything else on the machine."
)
REFERENCE_LEGEND = (
    " C sockexec: the C daemon on the same flags, its runs interleaved with ours; "
    "ours/C above 1 means ours is faster (p50/p99: ours vs C, lower is better); "
    "daemon CPU as the broker's share above."
)
NOTES_HEADING = "## Notes (written by hand"
DEFAULT_NOTES = f"{NOTES_HEADING}; `--results` rewrites everything above and keeps these)\n"


def columns(rows: Sequence[Row]) -> list[tuple[str, str]]:
    """The table's columns: the C sockexec's only when it ran for some row."""
    with_reference = any(r.ref != "-" for r in rows)
    return [c for c in COLUMNS if with_reference or c[1] not in _REFERENCE_COLUMNS]


def legend(rows: Sequence[Row]) -> str:
    return LEGEND + (REFERENCE_LEGEND if any(r.ref != "-" for r in rows) else "")


def render_text(rows: Sequence[Row], notes: Sequence[str] = ()) -> str:
    cols = columns(rows)
    cells = [[h for h, _ in cols]] + [[str(getattr(r, a)) for _, a in cols] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", legend(rows), *notes]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def render_markdown(rows: Sequence[Row], notes: Sequence[str] = ()) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    cols = columns(rows)
    lines = ["| " + " | ".join(h for h, _ in cols) + " |"]
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for row in rows:
        lines.append("| " + " | ".join(cell(str(getattr(row, a))) for _, a in cols) + " |")
    lines += ["", legend(rows)]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def machine_facts(reference: Reference | None) -> dict[str, str]:
    def run(cmd: Sequence[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    commit = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "sockexec_py"])
    if reference is None:
        c_reference = "not run (--no-reference, --tiny without --reference, or no row 1-4/6)"
    elif reference.binary is None:
        c_reference = f"not available: {reference.origin}"
    else:
        c_reference = f"{reference.binary} ({reference.origin})"
    return {
        "commit": commit + (" + uncommitted changes in sockexec_py/" if dirty else ""),
        "date": run(["date"]),
        "nproc": run(["nproc"]),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "C reference": c_reference,
    }


def _sizes(config: Config) -> str:
    return (
        f"row 1: {config.seq_seconds:g} s of round trips and {config.limit_seconds:g} s of "
        f"the spawn loop, interleaved; row 2: {config.conc_clients} clients for "
        f"{config.conc_seconds:g} s; rows 3-4: best of {config.repeat} run(s), the pipe "
        f"limit likewise; row 5: {format_size(config.slow_bytes)}, "
        f"{config.slow_idle:g} s idle; row 6: {config.sessions} x "
        f"`sleep {config.session_sleep:g}`; row 8: {config.seq_seconds:g} s of each rule, "
        "interleaved"
    )


def write_results(
    path: Path,
    command: str,
    facts: dict[str, str],
    config: Config,
    rows: Sequence[Row],
    notes: Sequence[str] = (),
) -> None:
    """Write the run at the top of ``path``, keeping its hand-written notes."""
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = ""
    at = old.find(f"\n{NOTES_HEADING}")
    kept = old[at + 1 :] if at >= 0 else DEFAULT_NOTES
    parser_note = (
        " (counts payload bytes without copying; the project's `ClientSession`, "
        "`--parser session`, costs the client enough CPU on 2 cores to lower rows 3-4)"
        if config.parser == "fast"
        else ""
    )
    text = [
        "# Benchmark results",
        "",
        "The latest full run of `bench/` (issues 3 and 14), written by the command below.",
        "Figures move with what else the machine is doing (the last column shows it as",
        "`other`) and with the VM's state from day to day, so each limit is measured in",
        "the same run, interleaved with ours: compare ratios across runs, not figures.",
        "`python -m bench.compare BASE_DIR` measures a change against a base checkout",
        "with alternating runs.",
        "",
        f"- command: `{command}`",
        f"- date: {facts['date']}",
        f"- nproc: {facts['nproc']}; Python {facts['python']}; kernel {facts['kernel']}",
        f"- broker: commit {facts['commit']}",
        f"- load average at start: {facts['load average']}",
        f"- C reference: {facts['C reference']}",
        f"- sizes: {_sizes(config)}",
        f"- client parser for rows 3-5: `{config.parser}`{parser_note}",
        "",
        render_markdown(rows, notes),
        kept,
    ]
    path.write_text("\n".join(text))
