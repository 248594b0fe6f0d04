"""Session events: small immutable values passed between the sans-IO state machines
and the I/O edges (server, clients). Nothing here does I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OutputKind = Literal["stdout", "stderr"]


@dataclass(frozen=True, slots=True)
class ArgvReady:
    """The request's argv is complete: the program may be started.

    ``argv`` is a non-empty tuple of arguments without NUL bytes; there is no way to
    build a partial one, so there is no spawn with a partial argv.
    """

    argv: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class StdinData:
    """Bytes for the program's stdin (possibly part of a larger netstring)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StdinClosed:
    """The program's stdin must be closed: the client sent ``0:,`` or half-closed."""


@dataclass(frozen=True, slots=True)
class TerminateRequested:
    """The client asks for the program to be terminated (TERM, then KILL after ``-k``);
    it still wants the exit pair. Nothing more comes from it."""


@dataclass(frozen=True, slots=True)
class InputEnded:
    """The client will send nothing more (end of its byte stream)."""


@dataclass(frozen=True, slots=True)
class Output:
    """A chunk of the program's stdout or stderr."""

    kind: OutputKind
    data: bytes


@dataclass(frozen=True, slots=True)
class Exited:
    """How the program ended: exactly one of ``exitcode`` or ``termsig`` is set.

    ``termsig`` is the signal name without ``SIG`` (``"TERM"``) as the server sent it,
    or the number as text when the server was run with ``--termsig-format number``.
    """

    exitcode: int | None = None
    termsig: str | None = None

    def __post_init__(self) -> None:
        if (self.exitcode is None) == (self.termsig is None):
            raise ValueError("Exited needs exactly one of exitcode or termsig")

    def describe(self) -> str:
        """``exitcode=0`` or ``termsig=TERM``: how logs and audit lines say it."""
        if self.termsig is not None:
            return f"termsig={self.termsig}"
        return f"exitcode={self.exitcode}"


ServerEvent = ArgvReady | StdinData | StdinClosed | TerminateRequested | InputEnded
ClientEvent = Output | Exited
