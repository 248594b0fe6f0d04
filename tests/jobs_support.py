"""Shared by the tests of the jobs API over HTTP: a request with a JSON answer, a
submit, a wait for a job's end by long polls, and a store file made unwritable."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sockexec_py.testing import GatewayProcess

from conftest import IN_CI

ENDED = ("succeeded", "failed", "cancelled", "lost")


def call(gateway: GatewayProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """The status and the decoded JSON answer (None when the body is empty)."""
    status, _, data = gateway.request(method, path, body)
    return status, json.loads(data) if data else None


def submit(gateway: GatewayProcess, **body: Any) -> str:
    """``POST /v1/jobs`` that must be accepted (202): the job's id."""
    status, answer = call(gateway, "POST", "/v1/jobs", body)
    assert status == 202, answer
    return str(answer["id"])


def wait(gateway: GatewayProcess, job_id: str, timeout: float = 30) -> dict[str, Any]:
    """The job (or task) once it has ended, by long polls of 5 s at most."""
    job: Any = None
    for _ in range(int(timeout / 5) + 1):
        status, job = call(gateway, "GET", f"/v1/jobs/{job_id}?wait=5")
        assert status == 200, job
        if job["state"] in ENDED:
            return dict(job)
    raise AssertionError(f"job {job_id} did not end within {timeout} s: {job}")


def immutable(path: Path, on: bool) -> None:
    """``chattr +i`` (or ``-i``) on ``path``: writes to it fail, even as root (who
    ignores chmod). Without chattr: a skip, and a failure under CI."""
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i" if on else "-i", str(path)]).returncode:
        message = "chattr +i is not available here (root ignores chmod)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
