"""WatchedFile: the token file's and the callback secret's reloading, on real files."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from sockexec_py.gateway.auth import TokenStore
from sockexec_py.gateway.watched import SETTLE, WatchedFile


def upper(data: bytes, path: str) -> str:
    if not data:
        raise ValueError(f"{path} is empty")
    return data.decode().strip().upper()


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
    replace(path, b"two\n")
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
    path.write_bytes(b"three\n")
    assert watched.current() == "THREE"


def settle(path: Path) -> None:
    """Date the file as written long enough ago to be complete."""
    old = time.time() - SETTLE - 1
    os.utime(path, (old, old))


def test_a_version_cut_mid_line_waits_until_it_settles(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"one\n")
    watched = WatchedFile(str(path), upper, "the test file")
    path.write_bytes(b"tw")  # a write in progress, cut mid-line
    assert watched.current() == "ONE"
    path.write_bytes(b"two\n")
    assert watched.current() == "TWO"
    path.write_bytes(b"three")  # no final newline, and it stays so
    assert watched.current() == "TWO"
    settle(path)
    assert watched.current() == "THREE"
    replace(path, b"four\n")  # renamed over it, a newline at its end: at once
    assert watched.current() == "FOUR"
    path.rename(path.with_suffix(".bak"))  # an editor's backup, then a new file
    path.write_bytes(b"fi")  # written in two writes: a new inode says nothing
    assert watched.current() == "FOUR"
    with path.open("ab") as rest:
        rest.write(b"ve\n")
    assert watched.current() == "FIVE"


def test_a_scoped_token_cut_after_the_token_is_not_full_access(tmp_path: Path) -> None:
    """``tok actions=status`` rewritten in place and read between two writes must
    not read as the bare ``tok`` (a full-access token)."""
    path = tmp_path / "tokens"
    path.write_bytes(b"other-token\nro-token actions=status\n")
    tokens = TokenStore(str(path))
    path.write_bytes(b"other-token\nro-token")  # the first of two writes
    principal = tokens.check("Bearer ro-token")
    assert principal is not None and principal.allows("status") and not principal.allows("exec")
    with path.open("ab") as rest:
        rest.write(b" actions=status,cancel\n")
    principal = tokens.check("Bearer ro-token")
    assert principal is not None and principal.allows("cancel") and not principal.allows("exec")


def test_the_first_read_must_succeed(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=f"cannot read the test file {missing}: No such file"):
        WatchedFile(str(missing), upper, "the test file")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        WatchedFile(str(empty), upper, "the test file")
