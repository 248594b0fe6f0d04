"""One job's broker session: stdin in, output stored and parsed, the exit pair out.

What happens on the wire for one job, apart from the runner's bookkeeping (queues,
limits, the store): :func:`run_session` drives the session of a
:class:`RunningJob`, and :func:`terminate_session` is the one way to stop it early.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import replace

import trio

from sockexec_py.client import AsyncSession, open_async_session
from sockexec_py.events import Exited, Output

from .model import (
    CANCELLED_RUNNING_REASON,
    MAX_REASON_BYTES,
    Job,
    broken_session_reason,
    cancelled_unconfirmed_reason,
    refusal_reason,
    timeout_reason,
)
from .output import RunOutput
from .progress import ProgressParser

__all__ = ["RunningJob", "one_line", "progress_loop", "run_session", "terminate_session"]

log = logging.getLogger("sockexec_py.jobs")


class RunningJob:
    """One running job: its session's cancel scope and what it produced so far."""

    def __init__(self, job: Job, output: RunOutput) -> None:
        self.job = job
        self.output = output
        #: What the program reads, sent once connected (read with the claim).
        self.stdin = b""
        # Created now, entered by the job's task: a cancel that comes before the
        # session is even connected still applies.
        self.session_scope = trio.CancelScope()
        self.cancel_requested = False
        #: Set with ``cancel_requested`` (a step waiting for the broker stops).
        self.cancelled = trio.Event()
        #: The open session, once connected (to ask the broker for a terminate).
        self.session: AsyncSession | None = None
        #: Set when a terminate got no exit pair within this grace (seconds).
        self.terminate_timed_out: float | None = None
        self.parser = ProgressParser()
        self.progress_dirty = trio.Event()
        self.done = trio.Event()
        self.final: Job | None = None

    def snapshot(self) -> Job:
        """The job as it is now: the stored record with live sizes and progress."""
        output = self.output
        return replace(
            self.job,
            stdout_bytes=output.stdout_bytes,
            stderr_bytes=output.stderr_bytes,
            dropped_bytes=output.dropped_bytes,
            truncated=output.truncated,
            progress=self.parser.progress,
        )


async def terminate_session(run: RunningJob, grace: float) -> None:
    """Have the broker terminate a running job's program and wait for its end.

    The session asks the broker in-band (:meth:`AsyncSession.terminate`): TERM to
    the program's group, KILL after the broker's ``-k``, and the exit pair still
    comes, so the job ends with its termsig. A job not yet connected terminates as
    soon as it is (:func:`run_session` looks at ``cancel_requested``). Only if the
    end does not come within ``grace`` seconds (a broker that hangs) is the
    connection closed; the broker then terminates the program anyway, but the
    termsig is unknown and the reason says so.
    """
    run.cancel_requested = True
    run.cancelled.set()
    if run.session is not None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await run.session.terminate()
    with trio.move_on_after(grace):
        await run.done.wait()
    if not run.done.is_set():
        run.terminate_timed_out = grace
        run.session_scope.cancel()


def one_line(exc: BaseException) -> str:
    """The first leaf of an exception group, as one line."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return (str(exc) or type(exc).__name__).splitlines()[0]


async def run_session(
    run: RunningJob,
    socket_path: str,
    stdin: bytes,
    *,
    on_connected: Callable[[], object],
    alongside: Callable[[RunningJob], Awaitable[object]],
) -> tuple[Exited | None, str | None]:
    """Run the job's program through the broker: send ``stdin`` then close it, store
    and parse the output as it comes, within the job's timeout. ``alongside(run)``
    runs as a task while the session is open (the runner saves progress there).

    Returns the exit pair (``None`` when the session was closed first: cancel,
    timeout, or a connection that ended early) and the reason to record.
    Error handling: :class:`~sockexec_py.client.BrokerUnavailable` from the connect
    (the program never started) propagates bare; errors once connected propagate
    (in an exception group when a task raised them).
    Resource handling: the session is closed on every way out, so the broker
    terminates the program if it still runs.
    """
    job = run.job
    exited: Exited | None = None
    stderr_head = bytearray()
    with run.session_scope, trio.move_on_after(job.timeout or math.inf) as deadline:
        async with open_async_session(socket_path, job.argv) as session:
            on_connected()
            run.session = session
            if run.cancel_requested:  # asked while we connected
                await session.terminate()

            async def feed() -> None:
                await session.send(stdin)
                await session.close_stdin()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run.output.run_writer)
                nursery.start_soon(alongside, run)
                nursery.start_soon(feed)
                async for frame in session:
                    if isinstance(frame, Output):
                        await run.output.write(frame.kind, frame.data)
                        if frame.kind == "stderr" and len(stderr_head) < MAX_REASON_BYTES:
                            stderr_head += frame.data[:MAX_REASON_BYTES]
                        run.parser.feed(frame.data, frame.kind)
                        run.progress_dirty.set()
                    else:
                        exited = frame
                # The program may have ended without reading its stdin.
                nursery.cancel_scope.cancel()
    run.session = None
    if run.cancel_requested:
        if exited is None and run.terminate_timed_out is not None:
            return None, cancelled_unconfirmed_reason(run.terminate_timed_out)
        return exited, CANCELLED_RUNNING_REASON
    if deadline.cancelled_caught:
        return exited, timeout_reason(job.timeout or 0)
    if exited is not None:
        return exited, refusal_reason(exited.exitcode, bytes(stderr_head))
    return None, broken_session_reason("the connection closed before the exit pair")


async def progress_loop(
    run: RunningJob,
    snapshot: Callable[[], Job],
    save: Callable[[Job, bool], Awaitable[None]],
    interval: float,
    event_interval: float,
) -> None:
    """Persist a running session's sizes and progress (run it ``alongside``):
    ``save(job, event)`` with ``event`` true when the progress changed (at most once
    per ``event_interval``), the sizes alone at most once per ``interval``. A failed
    save is logged: the job goes on."""
    last_progress = run.parser.progress
    last_saved = -math.inf
    while True:
        await run.progress_dirty.wait()
        run.progress_dirty = trio.Event()
        job = snapshot()
        changed = job.progress != last_progress
        if changed or trio.current_time() - last_saved >= interval:
            try:
                await save(job, changed)
            except Exception as exc:  # never the job's end: it goes on
                log.error("cannot save the progress of job %s: %s", run.job.id, exc)
            last_saved, last_progress = trio.current_time(), job.progress
        else:
            run.progress_dirty.set()  # the sizes, after the interval
        await trio.sleep(event_interval)
