"""Smoke test of the benchmark (``python -m bench --tiny``), so that it cannot rot.

It runs every measure in a configuration of a few seconds and checks only what must
hold on any machine: the table has all its rows, every session succeeded and every
byte count is exact. Never a timing: figures depend on the machine and its load.
A second test runs the C sockexec's column (rows 1-4 and 6) when a C sockexec is at
hand; the C daemon's own failures are counted in its column, never failing the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import reference

from conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
KEYS = ["1", "2", "3", "4", "5", "6", "7", "8"]


def run_bench(tmp_path: Path, *args: str) -> tuple[list[str], dict[str, Any]]:
    """``python -m bench --tiny ARGS``: (the lines of its table, its JSON report)."""
    report = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--json", str(report), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("#  measure"))
    table_keys = [line.split()[0] for line in lines[header + 2 : header + 2 + len(KEYS)]]
    assert table_keys == KEYS, proc.stdout
    payload: dict[str, Any] = json.loads(report.read_text())
    assert [row["key"] for row in payload["rows"]] == KEYS
    return lines, payload


def test_bench_tiny_runs_every_measure(tmp_path: Path) -> None:
    lines, payload = run_bench(tmp_path)
    config = payload["config"]
    rows = {row["key"]: row for row in payload["rows"]}
    for key in "1234568":
        assert rows[key]["ok"], rows[key]
    for key in "123456":
        assert rows[key]["result"] in ("met", "MISSED"), rows[key]
    # --tiny leaves the C sockexec out unless --reference: no column for it.
    assert not any("C sockexec 3.1.1" in line for line in lines)
    assert all(row["ref"] == "-" for row in payload["rows"])

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
    assert rows["7"]["result"] in ("met", "MISSED")  # against row 1 of the same run
    assert rows["7"]["data"]["runs"] > 0  # every request answered 200 with exitcode 0
    if os.geteuid() == 0:
        # Every run exited 0, after a check that the rule ran as nobody in its cwd
        # with its umask and limits.
        assert rows["8"]["result"] in ("met", "MISSED"), rows["8"]
        assert rows["8"]["data"]["runs"] > 0
        assert rows["8"]["data"]["plain_runs"] > 0
    else:
        assert (rows["8"]["result"], rows["8"]["ours"]) == ("skipped", "needs root")


def test_bench_tiny_reference_column(tmp_path: Path) -> None:
    found = reference.locate(build=False)
    if found.binary is None and not _skalibs_dev_installed():
        message = f"no C sockexec at hand ({found.origin}) and skalibs-dev missing"
        if IN_CI:
            pytest.fail(message + " (the test command installs it)")
        pytest.skip(message)
    lines, payload = run_bench(tmp_path, "--reference", "--only", "1,2,3,4,6")
    rows = {row["key"]: row for row in payload["rows"]}
    assert any("C sockexec 3.1.1" in line for line in lines)
    for key in "12346":
        assert rows[key]["ok"], rows[key]  # ours stays strict
        assert rows[key]["ref"] != "-", rows[key]
    for key in "12":
        data = rows[key]["data"]
        # Every C session is accounted for: a success or a counted failure.
        assert data["ref_runs"] + data["ref_failures"] > 0
    assert rows["6"]["data"]["ref_succeeded"] <= payload["config"]["sessions"]


def _skalibs_dev_installed() -> bool:
    try:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", "skalibs-dev"], capture_output=True, text=True
        )
    except OSError:
        return False
    return "install ok installed" in proc.stdout
