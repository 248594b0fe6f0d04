"""Helpers of the jobs tests, imported by the tests and their conftest."""

from __future__ import annotations

import trio

#: Unix time at trio time 0 in these tests (a fixed date keeps ids and times sane).
EPOCH = 1_800_000_000.0


def trio_clock() -> float:
    """Unix time tied to trio's clock: with the autojump clock, records get exact
    times and scheduled starts arrive without waiting."""
    return EPOCH + trio.current_time()
