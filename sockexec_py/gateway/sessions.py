"""Running broker sessions for the gateway's handlers and streams: one session per
request through the broker's Unix socket, counted in the metrics, its failures
turned into HTTP errors (503 broker down, 504 timeout, 502 protocol error)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import trio

from sockexec_py.client import (
    STDIN_CHUNK,
    AsyncSession,
    BrokerUnavailable,
    Collector,
    ProtocolError,
    Result,
    Timeout,
    open_unix_session,
)
from sockexec_py.errors import single_errors
from sockexec_py.events import Exited, Output

from .metrics import GatewayMetrics
from .request import ExecCall, HTTPError
from .streaming import NDJSON

#: What receives each frame of a session as it arrives.
FrameSink = Callable[[Output | Exited], Awaitable[None]]
#: What feeds a session's stdin (the WebSocket's messages).
StdinSource = Callable[[AsyncSession], Awaitable[None]]


class SessionRunner:
    """Opens broker sessions on the gateway's behalf and keeps the metrics.

    Args:
        socket_path: the broker's socket.
        metrics: where sessions, bytes and exit outcomes are counted.
        max_output: the most output (stdout and stderr together) :meth:`collect`
            holds in memory before it gives up with 413.
    """

    def __init__(self, socket_path: str, metrics: GatewayMetrics, max_output: int) -> None:
        self.socket_path = socket_path
        self.metrics = metrics
        self.max_output = max_output

    async def run(
        self,
        request: ExecCall,
        on_frame: FrameSink,
        stdin_source: StdinSource | None = None,
    ) -> None:
        """Run one broker session, handing each frame to ``on_frame`` as it arrives.

        ``stdin_source`` (WebSocket) feeds stdin concurrently; otherwise the request's
        stdin is sent and stdin closed. Failures become :class:`HTTPError` (503 broker
        down, 504 timeout, 502 protocol error). Leaving early (cancellation, an error
        in ``on_frame``) closes the connection: the broker terminates the program.
        """
        started = time.monotonic()
        metrics = self.metrics
        metrics.running.inc()
        try:
            with trio.fail_after(request.timeout), single_errors():
                if stdin_source is None and len(request.stdin) <= STDIN_CHUNK:
                    # Most requests: stdin (if any) and its close go with the request,
                    # in one send, and no task feeds it.
                    async with open_unix_session(
                        self.socket_path, request.argv, stdin=request.stdin
                    ) as session:
                        self.metrics.bytes_in.inc(len(request.stdin))
                        async for frame in session:
                            self._count(frame)
                            await on_frame(frame)
                    return
                async with (
                    open_unix_session(self.socket_path, request.argv) as session,
                    trio.open_nursery() as nursery,
                ):
                    if stdin_source is None:
                        nursery.start_soon(self.send_stdin, session, request.stdin)
                    else:
                        nursery.start_soon(stdin_source, session)
                    async for frame in session:
                        self._count(frame)
                        await on_frame(frame)
                    nursery.cancel_scope.cancel()
        except trio.TooSlowError:
            raise HTTPError(
                504, "timeout", f"the program did not finish within {request.timeout:g} s"
            ) from None
        except Timeout as exc:
            raise HTTPError(504, "timeout", str(exc)) from None
        except BrokerUnavailable as exc:
            raise HTTPError(503, "broker_unavailable", str(exc)) from None
        except ProtocolError as exc:
            raise HTTPError(502, "broker_protocol_error", str(exc)) from None
        finally:
            metrics.running.dec()
            metrics.duration.observe(time.monotonic() - started)

    async def collect(self, request: ExecCall) -> Result:
        """Run to the end and return everything at once.

        The whole output is held in memory, so it is bounded: past ``max_output``
        bytes (stdout and stderr together) the session is left, which terminates the
        program, and the answer is 413. Streams have no such limit: they hold one
        frame at a time.
        """
        collector, limit = Collector(), self.max_output
        size = 0

        async def add(frame: Output | Exited) -> None:
            nonlocal size
            if isinstance(frame, Output):
                size += len(frame.data)
                if size > limit:
                    raise HTTPError(
                        413,
                        "output_too_large",
                        f"the program's output (stdout and stderr together) exceeds {limit} "
                        f"bytes, so it was terminated; stream larger outputs (Accept: {NDJSON})",
                    )
            collector.add(frame)

        await self.run(request, add)
        return collector.result()

    async def send_stdin(self, session: AsyncSession, stdin: bytes) -> None:
        """Send ``stdin`` (split into bounded pieces by the session) and close it."""
        await session.send(stdin)
        self.metrics.bytes_in.inc(len(stdin))
        await session.close_stdin()

    def _count(self, frame: Output | Exited) -> None:
        if isinstance(frame, Output):
            self.metrics.bytes_out.inc(len(frame.data))
        else:
            self.metrics.exits.labels(frame.describe().replace("=", " ")).inc()
