"""Smoke test of the benchmark (``python -m bench --tiny``), so that it cannot rot.

It runs every measure in a configuration of a few seconds and checks only what must
hold on any machine: the table has all its rows, every session succeeded and every
byte count is exact. Never a timing: figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_tiny_runs_every_measure(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--json", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("#  measure"))
    table_keys = [line.split()[0] for line in lines[header + 2 : header + 9]]
    assert table_keys == ["1", "2", "3", "4", "5", "6", "7"], proc.stdout

    payload = json.loads(report.read_text())
    config = payload["config"]
    rows = {row["key"]: row for row in payload["rows"]}
    assert sorted(rows) == ["1", "2", "3", "4", "5", "6", "7"]
    for key in "123456":
        assert rows[key]["ok"], rows[key]
        assert rows[key]["result"] in ("met", "MISSED"), rows[key]

    assert rows["1"]["data"]["runs"] > 0
    assert rows["2"]["data"]["errors"] == 0
    assert rows["2"]["data"]["runs"] > 0
    # Byte counts are checked against the exact sizes inside the bench (a mismatch
    # fails the measure); the sizes it reports are the configured ones.
    assert rows["3"]["data"]["bytes"] == config["stream_bytes"]
    assert rows["4"]["data"]["bytes"] == config["duplex_bytes"]
    assert rows["5"]["data"]["delivered_bytes"] == config["slow_bytes"]
    assert rows["6"]["data"]["succeeded"] == config["sessions"]
    assert rows["6"]["data"]["errors"] == 0
    assert rows["7"]["result"] == "measured"
    assert rows["7"]["data"]["runs"] > 0  # every request answered 200 with exitcode 0
