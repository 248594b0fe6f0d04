"""How a connection is reported: the audit line of a request under a policy, and
its line in the SIGUSR1 dump. Both read a :class:`~.connection.Connection`'s state
and change nothing."""

from __future__ import annotations

import enum
import time
from typing import Protocol

from sockexec_py.policy import Rule
from sockexec_py.replies import printable

from .pairs import PairWriter
from .spawn import Program

__all__ = ["audit_line", "dump_line"]


class Connection(Protocol):
    """What the lines show of a :class:`~.connection.Connection` (which imports
    this module)."""

    number: int
    peer_pid: int
    peer_uid: int
    accepted: float
    argv: tuple[bytes, ...] | None
    rule: Rule | None
    outcome: str
    program: Program | None
    writer: PairWriter
    bytes_in: int

    @property
    def phase(self) -> enum.Enum: ...


def audit_line(conn: Connection) -> str:
    """Who, what, which rule, the outcome and how long (after ``audit``)."""
    assert conn.argv is not None
    rule = conn.rule
    argv = [a.decode("utf-8", "backslashreplace") for a in conn.argv]
    return (
        f"conn={conn.number} peer_uid={conn.peer_uid} peer_pid={conn.peer_pid} "
        f"rule={f'{rule.kind}:{rule.name}' if rule else '-'} argv={argv} "
        f"outcome={conn.outcome} duration={time.monotonic() - conn.accepted:.3f}s"
    )


def dump_line(conn: Connection) -> str:
    """One line for the SIGUSR1 dump."""
    program = conn.program
    pid = program.pid if program else "-"
    argv0 = printable(program.argv[0]) if program else "-"
    spool = conn.writer.spool
    return (
        f"conn={conn.number} peer_pid={conn.peer_pid} peer_uid={conn.peer_uid} "
        f"pid={pid} argv0={argv0} age={time.monotonic() - conn.accepted:.1f}s "
        f"in={conn.bytes_in} out={conn.writer.bytes_out} "
        f"spooled={spool.pending if spool is not None else 0} state={conn.phase.value}"
    )
