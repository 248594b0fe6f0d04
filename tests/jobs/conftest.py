"""Fixtures of the jobs tests: a store on a real SQLite file in tmp_path, an output
store beside it, and a runner against a real broker (``broker`` from the parent
conftest). Clocks: records use Unix time tied to trio's clock, so the autojump
clock drives scheduled starts without sleeping."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sockexec_py.jobs.output import OutputStore
from sockexec_py.jobs.runner import Runner, RunnerConfig
from sockexec_py.jobs.store import Store, open_store

from .support import trio_clock


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """pytest-trio's autojump clock, with a 1 ms threshold instead of 0.

    At 0, a run loop whose tasks all wait on a thread (every store call) polls for
    I/O with a zero timeout, over and over: a busy loop holding the GIL, which the
    store's threads then get only at each switch interval (5 ms). A store test took
    4 to 18 s that way, depending on the machine's load; the clock still jumps as
    soon as the loop has been idle for 1 ms."""
    return trio.testing.MockClock(autojump_threshold=0.001)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(tmp_path / "data", clock=trio_clock) as opened:
        yield opened


@pytest.fixture
def make_runner(tmp_path: Path) -> Callable[..., Any]:
    """Factory: ``async with make_runner(store, socket_path, **config) as runner``
    runs a runner in its own nursery for the block."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def make(store: Store, socket_path: Path | str, **config: Any) -> AsyncIterator[Runner]:
        output = OutputStore(store.data_dir / "output", cap=config.pop("cap", 64 << 20))
        runner = Runner(store, output, RunnerConfig(str(socket_path), **config))
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.run)
            yield runner
            nursery.cancel_scope.cancel()

    return make
