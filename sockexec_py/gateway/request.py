"""What the gateway accepts: the checks every request passes (Origin, Host, JSON
content type) and the exec session a validated body asks for. The shapes of bodies
are the models' (:mod:`.models`, enforced by :mod:`.api`). No I/O here.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from sockexec_py.client.wire import error_body

from .models import ExecRequest
from .settings import GatewaySettings


class HTTPError(Exception):
    """A request we refuse: becomes ``{"error": ..., "detail": ...}`` with ``status``."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def refuse_cross_site(headers: Any) -> None:
    """Refuse anything a web browser sent on behalf of a page.

    Browsers send ``Origin`` with every cross-site POST and WebSocket, and a page may
    otherwise make them to 127.0.0.1 (a "simple" request needs no preflight; DNS
    rebinding even lets it read the answer): the gateway would run programs for any
    web page its user opens. Our clients (curl, the Python client, nginx) send none.
    """
    if headers.get("origin") is not None:
        raise HTTPError(403, "forbidden", "cross-site requests (with an Origin header) are refused")


def refuse_foreign_host(headers: Any) -> None:
    """Refuse a ``Host`` that does not name this machine (for a gateway without tokens).

    DNS rebinding: a page of evil.example whose name is re-pointed at 127.0.0.1 talks
    to the gateway as its own origin, with ``Host: evil.example`` (and a browser may
    leave ``Origin`` out of a same-origin GET). A token-less gateway listens on
    loopback only, so its clients name it ``localhost`` or a loopback address.
    A request without any ``Host`` (HTTP/1.0 tools) cannot come from a browser, which
    always sends one: it is let through.
    """
    host = headers.get("host")
    if host is not None and not _loopback_host(host):
        raise HTTPError(
            421,
            "misdirected_request",
            "without tokens the gateway answers only to Host localhost, 127.0.0.1 or [::1]",
        )


def _loopback_host(host: str | None) -> bool:
    """True for ``localhost`` or a loopback address, with or without a port."""
    if not host:
        return False
    name, port = host.strip().lower(), ""
    if name.startswith("["):  # [v6]:port
        name, _, port = name[1:].partition("]")
        if port and not port.startswith(":"):
            return False
        port = port[1:]
    elif ":" in name:
        name, _, port = name.partition(":")
        if not port:
            return False
    if port and not port.isdigit():
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def require_json(headers: Any) -> None:
    """Refuse a body that does not say it is JSON.

    A web page may POST ``application/x-www-form-urlencoded``, ``multipart/form-data``
    or ``text/plain`` without a CORS preflight; a JSON type needs one. Parameters
    (``; charset=utf-8``) are fine.
    """
    media_type = (headers.get("content-type") or "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise HTTPError(
            415,
            "unsupported_media_type",
            "the body must be sent with Content-Type: application/json",
        )


def error_response(exc: HTTPError) -> JSONResponse:
    return JSONResponse(error_body(exc.error, exc.detail), status_code=exc.status)


@dataclass(frozen=True, slots=True)
class ExecCall:
    """A broker session to open: what :class:`~.sessions.SessionRunner` runs."""

    argv: list[str]
    stdin: bytes
    timeout: float


def exec_call(
    body: ExecRequest, settings: GatewaySettings, *, allow_stdin: bool = True
) -> ExecCall:
    """The session a validated exec body asks for, within the gateway's settings
    (the model checked the shape; these bounds are the operator's).

    Error handling: :class:`HTTPError` 400 naming the field.
    """
    if len(body.argv) > settings.max_argv:
        raise HTTPError(400, "bad_request", f"argv: more than {settings.max_argv} items")
    stdin = b""
    if body.stdin is not None and body.stdin_b64 is not None:
        raise HTTPError(400, "bad_request", "stdin_b64: give stdin or stdin_b64, not both")
    if not allow_stdin and (body.stdin is not None or body.stdin_b64 is not None):
        raise HTTPError(400, "bad_request", "stdin: send stdin as WebSocket messages")
    if body.stdin is not None:
        stdin = body.stdin.encode()
    if body.stdin_b64 is not None:
        try:
            stdin = base64.b64decode(body.stdin_b64, validate=True)
        except binascii.Error:
            raise HTTPError(400, "bad_request", "stdin_b64: not valid base64") from None
    timeout = settings.default_timeout if body.timeout is None else body.timeout
    if not 0 < timeout <= settings.max_timeout:
        raise HTTPError(400, "bad_request", f"timeout: must be in (0, {settings.max_timeout:g}]")
    return ExecCall(list(body.argv), stdin, float(timeout))
