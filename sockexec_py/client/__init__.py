"""Python client of the broker: one-shot and duplex, blocking and trio.

Both flavours drive the same sans-IO :class:`~sockexec_py.protocol.ClientSession`;
only the byte moving differs (:mod:`._blocking`: plain sockets; :mod:`._trio`: trio
sockets). A target is a socket path, ``unix:/path``, or — through the HTTP gateway —
``http(s)://`` / ``ws(s)://`` (:mod:`sockexec_py.gateway_client`, which needs the
``[gateway]`` extra). :func:`is_gateway` is the one place that picks the transport.

Resource handling: a session owns its connection; leaving its context (or calling
``close``) closes it, and the broker then terminates the program if it still runs.
The broker holds only bounded buffers, so a client must read while it writes:
:func:`run` and :func:`arun` send stdin and read output concurrently.

Error handling: :class:`BrokerUnavailable` (the message says whether the socket is
missing, refused, forbidden or not a socket), :class:`ProtocolError` (the peer broke
the protocol), :class:`Timeout` (the connection is closed, so the program is
terminated) and :class:`ProgramFailed` from :meth:`Result.check`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

import trio

from sockexec_py.errors import BrokerUnavailable, ProtocolError, SockexecError, Timeout

from . import _blocking, _trio
from ._blocking import Session
from ._blocking import _BlockingSession as _BlockingSession  # the gateway transport's base
from ._common import (
    Collector,
    Frame,
    OutputCallback,
    ProgramFailed,
    Result,
    is_gateway,
    parse_target,
)
from ._trio import AsyncSession, check_broker, open_unix_session

if TYPE_CHECKING:
    from sockexec_py.gateway_client import AsyncGatewaySession, GatewaySession

#: The gateway transport's names for the shared parts (sockexec_py.gateway_client).
_Collector = Collector

__all__ = [
    "AsyncSession",
    "BrokerUnavailable",
    "Frame",
    "ProgramFailed",
    "ProtocolError",
    "Result",
    "Session",
    "SockexecError",
    "Timeout",
    "arun",
    "check_broker",
    "is_gateway",
    "open_async_session",
    "open_session",
    "open_unix_session",
    "parse_target",
    "run",
]


@contextmanager
def _gateway_extra() -> Iterator[None]:
    """Say what to install when the gateway transport's dependencies are missing."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise ImportError(
            f"the gateway transport needs {exc.name}: pip install 'sockexec_py[gateway]'"
        ) from exc


def run(
    target: str,
    argv: Sequence[str | bytes],
    *,
    stdin: bytes = b"",
    timeout: float | None = None,
) -> Result:
    """Run ``argv`` to the end: send ``stdin``, close it, collect the output.

    Args:
        target: the broker's socket (path or ``unix:/path``) or the gateway's URL.
        argv: the program and its arguments (``str`` is encoded as UTF-8).
        stdin: all of the program's stdin; it is written while the output is read, so
            any size goes through a program that echoes it.
        timeout: seconds for the whole run, connect included; ``None`` waits for ever.

    Returns the :class:`Result` (call :meth:`Result.check` to raise on failure).
    Raises :class:`BrokerUnavailable`, :class:`Timeout` or :class:`ProtocolError`.
    """
    if is_gateway(target):
        with _gateway_extra():
            from sockexec_py.gateway_client import run_gateway
        result: Result = run_gateway(target, argv, stdin=stdin, timeout=timeout)
        return result
    return _blocking.run(target, argv, stdin=stdin, timeout=timeout)


def open_session(
    target: str,
    argv: Sequence[str | bytes],
    *,
    timeout: float | None = None,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
) -> Session | GatewaySession:
    """Start ``argv`` and return a duplex session: ``send(data)``, ``close_stdin()``,
    iterate its frames (``Output``, then ``Exited`` last), ``wait()`` for a
    :class:`Result`.

    Use it as a context manager: leaving it early terminates the program. ``timeout``
    bounds the whole session (then :class:`Timeout`); ``on_stdout``/``on_stderr`` are
    called with each chunk as it is iterated. Through the gateway the session is its
    WebSocket, with the same methods.
    """
    if is_gateway(target):
        with _gateway_extra():
            from sockexec_py.gateway_client import open_gateway_session
        return open_gateway_session(
            target, argv, timeout=timeout, on_stdout=on_stdout, on_stderr=on_stderr
        )
    return _blocking.open_session(
        target, argv, timeout=timeout, on_stdout=on_stdout, on_stderr=on_stderr
    )


async def arun(
    target: str,
    argv: Sequence[str | bytes],
    *,
    stdin: bytes = b"",
    timeout: float | None = None,
) -> Result:
    """The trio flavour of :func:`run` (stdin is sent by a task while output is read)."""
    if is_gateway(target):
        with _gateway_extra():
            from sockexec_py.gateway_client import run_gateway
        result: Result = await trio.to_thread.run_sync(
            lambda: run_gateway(target, argv, stdin=stdin, timeout=timeout),
            abandon_on_cancel=True,
        )
        return result
    return await _trio.arun(target, argv, stdin=stdin, timeout=timeout)


@asynccontextmanager
async def open_async_session(
    target: str,
    argv: Sequence[str | bytes],
    *,
    timeout: float | None = None,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
) -> AsyncIterator[AsyncSession | AsyncGatewaySession]:
    """The trio flavour of :func:`open_session`: ``async with`` it, ``await send()``,
    ``await close_stdin()``, ``async for frame in session``.

    Leaving the block closes the connection (the broker terminates the program if it
    still runs). ``timeout`` cancels the block and raises :class:`Timeout`; an outer
    ``trio.move_on_after``/``fail_after`` works as usual.
    """
    with _trio.deadline(timeout, "the session"):
        if is_gateway(target):
            with _gateway_extra():
                from sockexec_py.gateway_client import open_async_gateway_session
            async with open_async_gateway_session(
                target, argv, on_stdout=on_stdout, on_stderr=on_stderr
            ) as gateway_session:
                yield gateway_session
        else:
            async with open_unix_session(
                target, argv, on_stdout=on_stdout, on_stderr=on_stderr
            ) as session:
                yield session
