"""The broker's side of the wire, built (rule 3 of :mod:`sockexec_py.protocol`):
output pairs, the exit pair from a wait status, the in-band error reply, and the
one-line rendering of bytes that logs and errors share. Sans-IO."""

from __future__ import annotations

import os
import signal
from typing import Literal

from .errors import EXIT_REFUSED, LocalProtocolError
from .events import Exited, OutputKind
from .netstring import encode, encode_parts

#: The largest output chunk the server sends in one pair: small enough to fit a Unix
#: socket buffer whole, so a pair is never split across two arrivals.
MAX_OUTPUT_CHUNK = 64 * 1024

_KIND_HEADERS: dict[str, bytes] = {"stdout": encode(b"stdout"), "stderr": encode(b"stderr")}
_EXITCODE = encode(b"exitcode")
_TERMSIG = encode(b"termsig")


def termsig_text(signum: int, fmt: Literal["name", "number"] = "name") -> bytes:
    """The ``termsig`` data for a signal: ``b"TERM"`` (skalibs style) or ``b"15"``."""
    if fmt == "number":
        return b"%d" % signum
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return b"%d" % signum
    return name.removeprefix("SIG").encode("ascii")


def exit_event(wait_status: int, termsig_format: Literal["name", "number"] = "name") -> Exited:
    """How a program ended, from its raw wait status: the one value the exit pair, the
    debug log and the audit line are all rendered from."""
    if os.WIFSIGNALED(wait_status):
        signum = os.WTERMSIG(wait_status)
        return Exited(termsig=termsig_text(signum, termsig_format).decode("ascii"))
    return Exited(exitcode=os.WEXITSTATUS(wait_status))


def encode_exit(exited: Exited) -> bytes:
    """The exit pair for ``exited`` (``exitcode`` or ``termsig``)."""
    if exited.termsig is not None:
        return encode_exit_pair(termsig=exited.termsig.encode("ascii"))
    return encode_exit_pair(exitcode=exited.exitcode)


def encode_output_pair(
    kind: OutputKind, data: bytes | memoryview
) -> tuple[bytes, bytes, bytes | memoryview, bytes]:
    """The buffers of one output pair, to hand to a single ``sendmsg`` (no copy)."""
    if len(data) > MAX_OUTPUT_CHUNK:
        raise LocalProtocolError(f"output chunk of {len(data)} bytes exceeds {MAX_OUTPUT_CHUNK}")
    header, payload, comma = encode_parts(data)
    return _KIND_HEADERS[kind], header, payload, comma


def encode_exit_pair(*, exitcode: int | None = None, termsig: bytes | None = None) -> bytes:
    """The final pair: ``exitcode`` with a decimal status, or ``termsig`` with a name."""
    if (exitcode is None) == (termsig is None):
        raise LocalProtocolError("exactly one of exitcode or termsig")
    if exitcode is not None:
        return _EXITCODE + encode(b"%d" % exitcode)
    assert termsig is not None
    return _TERMSIG + encode(termsig)


def printable(value: bytes) -> str:
    """Bytes as one printable line for logs and errors: a newline cannot split it.

    Undecodable bytes appear as ``\\xff``, control characters as ``\\n``, ``\\x1b``…
    """
    text = value.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def encode_error_reply(reason: str, exitcode: int = EXIT_REFUSED) -> bytes:
    """An in-band error: a ``stderr`` pair ``sockexec_py: <reason>\\n``, then the exit pair."""
    line = f"sockexec_py: {reason}\n".encode("utf-8", "backslashreplace")
    return _KIND_HEADERS["stderr"] + encode(line) + encode_exit_pair(exitcode=exitcode)


def pair_at(data: bytes | memoryview, start: int) -> tuple[int, int] | None:
    """(end, data length) of the whole pair (two netstrings, as the broker encodes
    them) at ``start`` of ``data``, or None if it is cut short."""
    end = start
    length = 0
    for _ in range(2):  # the type netstring, then the data netstring
        colon = -1
        for index in range(end, min(end + 12, len(data))):
            if data[index] == 0x3A:  # ":"
                colon = index
                break
        if colon < 0:
            return None
        length = int(bytes(data[end:colon]))
        end = colon + 1 + length + 1
        if end > len(data):
            return None
    return end, length
