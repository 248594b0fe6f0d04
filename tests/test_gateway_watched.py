"""WatchedFile: the token file's and the callback secret's reloading, on real files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from sockexec_py.gateway.watched import WatchedFile


def upper(data: bytes, path: str) -> str:
    if not data:
        raise ValueError(f"{path} is empty")
    return data.decode().upper()


def replace(path: Path, data: bytes) -> None:
    fresh = path.with_suffix(".new")
    fresh.write_bytes(data)
    os.replace(fresh, path)


def test_changes_are_read_bad_versions_keep_the_last_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"one")
    watched = WatchedFile(str(path), upper, "the test file")
    assert watched.current() == "ONE"
    replace(path, b"two")
    assert watched.current() == "TWO"
    with caplog.at_level(logging.WARNING, logger="sockexec_py.gateway"):
        path.write_bytes(b"")  # truncated in place
        assert watched.current() == "TWO" and watched.current() == "TWO"
        path.unlink()
        assert watched.current() == "TWO" and watched.current() == "TWO"
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        f"keeping the last good version ({path} is empty)",
        f"keeping the last good version ([Errno 2] No such file or directory: '{path}')",
    ]
    path.write_bytes(b"three")
    assert watched.current() == "THREE"


def test_the_first_read_must_succeed(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=f"cannot read the test file {missing}: No such file"):
        WatchedFile(str(missing), upper, "the test file")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        WatchedFile(str(empty), upper, "the test file")
