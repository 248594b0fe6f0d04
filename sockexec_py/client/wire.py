"""The gateway's JSON wire format, defined once for the gateway and its client.

Frames (NDJSON/SSE lines, WebSocket messages):
``{"type": "stdout"|"stderr", "data": text}`` (or ``"data_b64"`` with
``?encoding=base64``), ``{"type": "exit", "exitcode": int|null, "termsig": str|null}``
last, or ``{"type": "error", "error": code, "detail": line, "status": http_status}``.
Error answers: ``{"error": code, "detail": line}`` with the HTTP status. No I/O here.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from typing import Any, NoReturn

from sockexec_py.errors import (
    BrokerUnavailable,
    LocalProtocolError,
    ProtocolError,
    SockexecError,
    Timeout,
)
from sockexec_py.events import Exited, Output

#: What a WebSocket client sends to close the program's stdin.
CLOSE_STDIN_MESSAGE = json.dumps({"type": "close_stdin"})
#: What a WebSocket client sends to have the program terminated (its exit still comes).
TERMINATE_MESSAGE = json.dumps({"type": "terminate"})


class GatewayRefused(ProtocolError):
    """The gateway refused the request (a 4xx answer); ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def frame_json(frame: Output | Exited, b64: bool) -> dict[str, Any]:
    """One frame as JSON: output data as text (or base64), or the exit."""
    if isinstance(frame, Output):
        if b64:
            return {"type": frame.kind, "data_b64": base64.b64encode(frame.data).decode()}
        return {"type": frame.kind, "data": frame.data.decode("utf-8", "replace")}
    return {"type": "exit", "exitcode": frame.exitcode, "termsig": frame.termsig}


def error_body(error: str, detail: str) -> dict[str, str]:
    """The body of an error answer."""
    return {"error": error, "detail": detail}


def error_frame(status: int, error: str, detail: str) -> dict[str, Any]:
    """An error in the middle of a stream (the HTTP status was already sent)."""
    return {"type": "error", "error": error, "detail": detail, "status": status}


def parse_frame(message: Any) -> Output | Exited:
    """A frame received from the gateway.

    Error handling: an ``error`` frame raises the typed error for its status (see
    :func:`raise_for_status`); anything else unexpected is a :class:`ProtocolError`.
    """
    kind = message.get("type") if isinstance(message, dict) else None
    try:
        if kind in ("stdout", "stderr"):
            if "data_b64" in message:
                return Output(kind, base64.b64decode(message["data_b64"], validate=True))
            return Output(kind, message["data"].encode())
        if kind == "exit":
            return Exited(exitcode=message["exitcode"], termsig=message["termsig"])
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    else:
        if kind == "error":
            raise_for_status(int(message.get("status", 500)), json.dumps(message).encode())
    raise ProtocolError(f"unexpected frame from the gateway: {str(message)[:100]}")


def error_text(status: int, body: bytes) -> str:
    """``413 too_large: the request body exceeds ...``, from an error answer."""
    try:
        payload = json.loads(body)
        return f"{status} {payload['error']}: {payload['detail']}"
    except (ValueError, KeyError, TypeError):
        return f"{status}: {body[:200].decode('utf-8', 'replace')}"


def raise_for_status(status: int, body: bytes) -> NoReturn:
    """The typed error for a gateway's error answer: 504 the session timed out, 503 the
    broker cannot be reached, 502 the broker broke the protocol, anything else the
    gateway refused the request (:class:`GatewayRefused`)."""
    text = error_text(status, body)
    error: SockexecError
    if status == 504:
        error = Timeout(f"gateway: {text}")
    elif status == 503:
        error = BrokerUnavailable(f"gateway: {text}")
    elif status == 502:
        error = ProtocolError(f"gateway: {text}")
    else:
        error = GatewayRefused(f"gateway refused the request: {text}", status)
    raise error


def argv_text(argv: Sequence[str | bytes]) -> list[str]:
    """argv as the JSON text the gateway takes.

    Error handling: an argument that is not UTF-8 (bytes, or a str holding lone
    surrogates, as ``sys.argv`` has for such bytes) cannot be carried as JSON text:
    :class:`LocalProtocolError` naming its index (the Unix socket carries any bytes).
    """
    text = []
    for index, arg in enumerate(argv):
        try:
            text.append(arg.decode() if isinstance(arg, bytes) else arg)
            text[-1].encode()  # lone surrogates do not encode
        except UnicodeError:
            raise LocalProtocolError(
                f"argv[{index}] is not valid UTF-8: the gateway carries argv as JSON text "
                "(use the broker's Unix socket for arbitrary bytes)"
            ) from None
    return text


def auth_headers(token: str | None) -> dict[str, str]:
    """The bearer token header, from ``token`` or ``$SOCKEXEC_TOKEN``."""
    token = token or os.environ.get("SOCKEXEC_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}
