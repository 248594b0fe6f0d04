"""What the gateway accepts: the checks every request passes and the validated exec
request. No I/O here: the app (``app.py``) awaits, these only look at what arrived.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from typing import Any

from starlette.responses import JSONResponse

from sockexec_py.client.wire import error_body

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


class ExecRequest:
    """A validated ``POST /v1/exec`` (or first WebSocket message) body."""

    def __init__(self, body: Any, settings: GatewaySettings, *, allow_stdin: bool = True) -> None:
        if not isinstance(body, dict):
            raise HTTPError(400, "bad_request", "the body must be a JSON object")
        unknown = set(body) - {"argv", "stdin", "stdin_b64", "timeout"}
        if unknown:
            raise HTTPError(400, "bad_request", f"unknown field(s): {', '.join(sorted(unknown))}")
        argv = body.get("argv")
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(a, str) and "\0" not in a for a in argv)
        ):
            raise HTTPError(
                400, "bad_request", "argv must be a non-empty list of strings without NUL"
            )
        if not all(_encodable(a) for a in argv):
            raise HTTPError(400, "bad_request", "argv holds text that is not valid Unicode")
        if len(argv) > settings.max_argv:
            raise HTTPError(400, "bad_request", f"argv has more than {settings.max_argv} items")
        self.argv: list[str] = argv
        self.stdin = b""
        if "stdin" in body and "stdin_b64" in body:
            raise HTTPError(400, "bad_request", "give stdin or stdin_b64, not both")
        if not allow_stdin and ("stdin" in body or "stdin_b64" in body):
            raise HTTPError(400, "bad_request", "send stdin as WebSocket messages")
        if "stdin" in body:
            if not isinstance(body["stdin"], str):
                raise HTTPError(400, "bad_request", "stdin must be a string")
            if not _encodable(body["stdin"]):
                raise HTTPError(400, "bad_request", "stdin is not valid Unicode text")
            self.stdin = body["stdin"].encode()
        if "stdin_b64" in body:
            if not isinstance(body["stdin_b64"], str):
                raise HTTPError(400, "bad_request", "stdin_b64 must be a base64 string")
            try:
                self.stdin = base64.b64decode(body["stdin_b64"], validate=True)
            except binascii.Error:
                raise HTTPError(400, "bad_request", "stdin_b64 is not valid base64") from None
        timeout = body.get("timeout", settings.default_timeout)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout <= settings.max_timeout
        ):
            raise HTTPError(
                400, "bad_request", f"timeout must be a number in (0, {settings.max_timeout}]"
            )
        self.timeout = float(timeout)


def _encodable(text: str) -> bool:
    """False for text UTF-8 cannot encode (lone surrogates from JSON escapes)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
