"""A short run of the fuzz harness (``python -m fuzz``; the long run is in README), and
the harness's own checks, which must be able to fail."""

from __future__ import annotations

from pathlib import Path

from fuzz.__main__ import fuzz
from fuzz.broker import check_reply


def test_a_short_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    report = fuzz(tmp_path, sessions=400, seed=20261205)
    assert report.sessions == 400 and report.replies > 200
    assert report.problems == []


def test_the_reply_check_can_fail() -> None:
    good = b"6:stdout,2:hi,8:exitcode,1:0,"
    assert check_reply(good, complete=True, asked=True) is None
    assert check_reply(good[:9], complete=False, asked=True) is None  # the client left
    assert check_reply(b"", complete=True, asked=False) is None  # nothing asked
    assert check_reply(b"", complete=True, asked=True) == "no reply to a request"
    assert "closed before the exit" in str(check_reply(b"6:stdout,2:hi,", True, asked=True))
    assert "malformed" in str(check_reply(good[:9], complete=True, asked=True))
    assert "malformed" in str(check_reply(b"7:weird!!,1:x,", complete=True, asked=True))
    assert "malformed" in str(check_reply(good + b"junk", complete=True, asked=True))
