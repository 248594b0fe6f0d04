"""The dashboard's plumbing: how a route is screened and answered, the login and
logout, and the static files. The pages themselves are :mod:`.routes`'.

Kinds of route (see :mod:`.guard` for the rules):

- ``page``: a GET answered with HTML; without a session (with tokens) it redirects
  to the login page; errors are HTML pages;
- ``data``: a GET answered with JSON, a stream or a download; 401 without a session;
  errors are the API's JSON;
- ``change``: a POST of a form (``application/x-www-form-urlencoded``), which needs
  a same-origin ``Origin``, a session and its CSRF token; answered with a redirect
  or an HTML page.

Every answer gets the security headers (CSP and the rest, :func:`.guard.secure_headers`),
and is counted in the gateway's request metrics as mode ``dashboard``.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Literal
from urllib.parse import parse_qs, urlencode

from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from sockexec_py.gateway.request import HTTPError, error_response

from .forms import login_page
from .guard import CSRF_HEADER, Guard, Visit, secure_headers
from .html import Markup
from .logins import LOGIN_COOKIE, SESSION_COOKIE, same_secret
from .views import error_page, layout

Form = Mapping[str, list[str]]
Handler = Callable[[Request, Visit, Form], Awaitable[Response]]
Kind = Literal["page", "data", "change"]

#: The largest form body read.
MAX_FORM = 64 << 10
_STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_TITLES = {400: "Bad request", 401: "Log in", 403: "Forbidden", 404: "Not found", 409: "Conflict"}


@dataclass(frozen=True, slots=True)
class Static:
    body: bytes
    media_type: str
    etag: str


def load_static() -> dict[str, Static]:
    """The files of ``static/``, read once (they are small and never change)."""
    files = {}
    for entry in resources.files(__package__).joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _STATIC_TYPES:
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            files[entry.name] = Static(body, _STATIC_TYPES[suffix], etag)
    return files


def first(form: Form, key: str) -> str | None:
    """The first value of a form field."""
    values = form.get(key)
    return values[0] if values else None


def safe_next(path: str | None) -> str:
    """Where to go after the login: a path of this gateway, nothing else (no
    ``//host``, no scheme: an open redirect would let a link send people away)."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    if any(ord(ch) < 0x20 for ch in path):
        return "/"
    return path


class Site:
    """Screening, sessions and errors for the dashboard's routes.

    Args:
        guard: the Origin, Host, session and CSRF rules.
        count: counts an answered request (mode, status).
    """

    def __init__(self, guard: Guard, count: Callable[[str, int], None]) -> None:
        self.guard = guard
        self.count = count
        self.static = load_static()

    def html(
        self, visit: Visit | None, page: str, title: str, content: Markup, status: int = 200
    ) -> HTMLResponse:
        csrf = visit.login.csrf if visit is not None else ""
        body = layout(
            page, title, content, csrf, logout=visit is not None and self.guard.needs_login
        )
        return HTMLResponse(body, status_code=status)

    def endpoint(self, handler: Handler, kind: Kind) -> Callable[[Request], Awaitable[Response]]:
        """A Starlette endpoint running ``handler`` behind the dashboard's screen."""

        async def endpoint(request: Request) -> Response:
            visit: Visit | None = None
            change = kind == "change"
            try:
                self.guard.check_origin(request, change=change)
                visit = self.guard.visit(request, change=change)
                if visit is None and kind == "page":
                    target = request.url.path + (
                        f"?{request.url.query}" if request.url.query else ""
                    )
                    response: Response = RedirectResponse(
                        "/login?" + urlencode({"next": target}), status_code=303
                    )
                elif visit is None and change:
                    raise HTTPError(403, "forbidden", "no dashboard session: reload the page")
                elif visit is None:
                    raise HTTPError(401, "unauthorized", "log in to the dashboard first")
                else:
                    form: Form = {}
                    if change:
                        form = await read_form(request)
                        offered = first(form, "csrf") or request.headers.get(CSRF_HEADER)
                        self.guard.check_csrf(visit, offered)
                    request.state.principal = visit.principal  # for the API's handlers
                    response = await handler(request, visit, form)
            except HTTPError as exc:
                response = self.error(exc, kind, visit)
            return self.finish(request, response, visit)

        return endpoint

    def error(self, exc: HTTPError, kind: Kind, visit: Visit | None) -> Response:
        if kind == "data":
            return error_response(exc)
        title = _TITLES.get(exc.status, "Error")
        return self.html(visit, "error", title, error_page(title, exc.detail), exc.status)

    def finish(self, request: Request, response: Response, visit: Visit | None) -> Response:
        if visit is not None and visit.new:
            self.set_session(request, response, visit.session_id)
        secure_headers(response)
        self.count("dashboard", response.status_code)
        return response

    def set_session(self, request: Request, response: Response, session_id: str) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            session_id,
            httponly=True,
            samesite="strict",
            secure=self.guard.secure(request),
            path="/",
        )

    # -- login, logout, static -------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        if not self.guard.needs_login:
            return self.finish(request, RedirectResponse("/", status_code=303), None)
        try:
            self.guard.check_origin(request, change=False)
        except HTTPError as exc:
            return self.finish(request, self.error(exc, "page", None), None)
        return self._login_page(request, safe_next(request.query_params.get("next")), "", 200)

    def _login_page(self, request: Request, next_path: str, error: str, status: int) -> Response:
        # Double submit: the form's token must come back with the cookie's (a page
        # of another origin can neither read nor set it).
        token = secrets.token_urlsafe(32)
        response = self.html(None, "login", "Log in", login_page(token, next_path, error), status)
        response.set_cookie(
            LOGIN_COOKIE,
            token,
            max_age=3600,
            httponly=True,
            samesite="strict",
            secure=self.guard.secure(request),
            path="/login",
        )
        return self.finish(request, response, None)

    async def login(self, request: Request) -> Response:
        try:
            self.guard.check_origin(request, change=True)
            form = await read_form(request)
            if not same_secret(first(form, "csrf"), request.cookies.get(LOGIN_COOKIE, "")):
                raise HTTPError(403, "forbidden", "the login form expired: reload the page")
        except HTTPError as exc:
            return self.finish(request, self.error(exc, "page", None), None)
        next_path = safe_next(first(form, "next"))
        token = (first(form, "token") or "").strip()
        if self.guard.logins.check_token(token) is None:
            return self._login_page(request, next_path, "That token is not valid.", 401)
        self.guard.logins.close(request.cookies.get(SESSION_COOKIE))
        session_id, _ = self.guard.logins.open(token)
        response = RedirectResponse(next_path, status_code=303)
        self.set_session(request, response, session_id)
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return self.finish(request, response, None)

    async def logout(self, request: Request, visit: Visit, form: Form) -> Response:
        self.guard.logins.close(visit.session_id)
        target = "/login" if self.guard.needs_login else "/"
        response = RedirectResponse(target, status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    async def static_file(self, request: Request) -> Response:
        found = self.static.get(request.path_params["name"])
        response: Response
        if found is None:
            response = error_response(HTTPError(404, "not_found", "no such file"))
        elif request.headers.get("if-none-match") == found.etag:
            response = Response(status_code=304, headers={"etag": found.etag})
        else:
            response = Response(found.body, media_type=found.media_type)
            response.headers["etag"] = found.etag
        response.headers["cache-control"] = "no-cache"
        secure_headers(response, private=False)
        self.count("dashboard", response.status_code)
        return response


async def read_form(request: Request) -> dict[str, list[str]]:
    """A form body (``application/x-www-form-urlencoded``, at most :data:`MAX_FORM`)."""
    media_type = (request.headers.get("content-type") or "").partition(";")[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise HTTPError(415, "unsupported_media_type", "expected a form")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_FORM:
                raise HTTPError(413, "too_large", f"the form exceeds {MAX_FORM} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise HTTPError(400, "bad_request", "the form was not sent whole") from None
    try:
        text = b"".join(chunks).decode("utf-8")
        return parse_qs(text, keep_blank_values=True, max_num_fields=200, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "bad_request", "the form is not valid") from None
