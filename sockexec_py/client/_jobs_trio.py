"""The trio flavour of the jobs client (:mod:`.jobs` has the blocking one)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

import trio

from sockexec_py.errors import Timeout

from ._common import Frame
from ._jobs_wire import (
    _POLL,
    JobPage,
    JobStatus,
    StepSpec,
    View,
    _frame,
    _gateway,
    _list_target,
    _output_target,
    _page,
    _refuse,
    _submit_body,
)


class AsyncJob:
    """The trio flavour of :class:`Job`; bound calls with trio's cancel scopes."""

    def __init__(self, url: str, job_id: str, *, token: str | None = None) -> None:
        self.url = _gateway(url)
        self.id = job_id
        self.token = token

    def __repr__(self) -> str:
        return f"AsyncJob({self.url!r}, {self.id!r})"

    async def _call(self, method: str, target: str) -> Any:
        from . import _rest

        return await _rest.acall(self.url, method, target, token=self.token, refuse=_refuse)

    async def status(self) -> JobStatus:
        return JobStatus.from_json(await self._call("GET", f"/v1/jobs/{quote(self.id)}"))

    async def wait(self, timeout: float | None = None) -> JobStatus:
        """As :meth:`Job.wait`."""
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            while True:
                target = f"/v1/jobs/{quote(self.id)}?wait={_POLL:g}"
                status = JobStatus.from_json(await self._call("GET", target))
                if status.finished:
                    return status
        assert scope.cancelled_caught
        raise Timeout(f"job {self.id} did not finish within {timeout:g} s")

    async def cancel(self) -> JobStatus:
        return JobStatus.from_json(await self._call("POST", f"/v1/jobs/{quote(self.id)}/cancel"))

    async def delete(self) -> None:
        await self._call("DELETE", f"/v1/jobs/{quote(self.id)}")

    async def cancel_step(self, name: str) -> JobStatus:
        target = f"/v1/jobs/{quote(self.id)}/steps/{quote(name, safe='')}/cancel"
        return JobStatus.from_json(await self._call("POST", target))

    @asynccontextmanager
    async def output(
        self,
        follow: bool = True,
        *,
        stream: View = "both",
        offset: int = 0,
        step: str | None = None,
    ) -> AsyncIterator[AsyncIterator[Frame]]:
        """``async with job.output() as frames: async for frame in frames``; leaving
        the block closes the connection."""
        from . import _rest

        target = _output_target(self.id, follow, stream, offset, step)
        async with _rest.alines(self.url, target, token=self.token, refuse=_refuse) as lines:
            yield _AsyncFrames(lines)


class _AsyncFrames:
    def __init__(self, lines: AsyncIterator[Any]) -> None:
        self._lines = lines

    def __aiter__(self) -> _AsyncFrames:
        return self

    async def __anext__(self) -> Frame:
        while True:
            frame = _frame(await self._lines.__anext__())
            if frame is not None:
                return frame


async def asubmit(
    target: str,
    argv: Sequence[str | bytes] | None = None,
    *,
    stdin: bytes | str | None = None,
    name: str | None = None,
    start_at: datetime | float | str | None = None,
    timeout: float | None = None,
    labels: Mapping[str, str] | None = None,
    keep: bool = True,
    token: str | None = None,
    steps: Sequence[StepSpec] | None = None,
    mode: Literal["sequential", "parallel", "dag"] | None = None,
    callback: str | None = None,
) -> AsyncJob:
    """The trio flavour of :func:`submit`."""
    from . import _rest

    url = _gateway(target)
    body = _submit_body(
        argv,
        stdin,
        name,
        start_at,
        timeout,
        labels,
        keep,
        steps=steps,
        mode=mode,
        callback=callback,
    )
    accepted = await _rest.acall(url, "POST", "/v1/jobs", body, token=token, refuse=_refuse)
    return AsyncJob(url, accepted["id"], token=token)


async def alist_jobs(
    target: str,
    *,
    state: str | Iterable[str] | None = None,
    name: str | None = None,
    labels: Mapping[str, str] | None = None,
    created_after: datetime | float | str | None = None,
    created_before: datetime | float | str | None = None,
    sort: Literal["created", "started", "ended"] = "created",
    order: Literal["desc", "asc"] = "desc",
    limit: int = 50,
    cursor: str | None = None,
    token: str | None = None,
) -> JobPage:
    """The trio flavour of :func:`list_jobs`."""
    from . import _rest

    query = _list_target(
        state, name, labels, created_after, created_before, sort, order, limit, cursor
    )
    return _page(await _rest.acall(_gateway(target), "GET", query, token=token, refuse=_refuse))
