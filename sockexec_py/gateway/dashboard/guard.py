"""What every dashboard request passes, and the headers of every dashboard answer.

The API's rule is "a request with an ``Origin`` header is refused": a web page must
not make the gateway run programs (:func:`~sockexec_py.gateway.request.refuse_cross_site`).
The dashboard is a web page, so for it the rule becomes "refused unless same-origin
with a valid session", and stays as strict for everything else:

- ``Origin``, when present, must be the gateway's own: ``--public-origin`` when it
  is given (behind a TLS proxy the gateway cannot see the scheme browsers use),
  else the scheme of the connection and the request's ``Host`` (default ports made
  explicit). ``null`` never is.
- A change (any method but GET and HEAD) must carry an ``Origin`` (browsers send one
  with every such request; a missing one did not come from our page), and the
  session's CSRF token (form field ``csrf`` or header ``X-CSRF-Token``).
- The session cookie is ``HttpOnly`` (scripts cannot read it), ``SameSite=Strict``
  (a request started by another site carries none) and ``Secure`` when the
  connection or the public origin is ``https``. SameSite sees a *site*, and ``localhost:8080`` and
  ``localhost:9999`` are one site: the Origin check and the CSRF token are what
  keep another program's page on this machine out.
- Without tokens, the Host rule of the API applies (loopback names only: DNS
  rebinding), and a session is opened without a login, for its CSRF token.

The API itself (``/v1/...``) accepts a dashboard session only through
:meth:`Guard.api_principal`: the session cookie *and* the ``X-CSRF-Token`` header (which
no page of another origin can send without a CORS preflight that the gateway never
grants), and an Origin that is absent or our own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection, cookie_parser
from starlette.responses import Response

from sockexec_py.gateway.auth import Principal
from sockexec_py.gateway.request import HTTPError, refuse_foreign_host

from .logins import SESSION_COOKIE, Login, Logins, same_secret

#: No inline script or style anywhere, nothing from elsewhere, no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Mapping[str, str] = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # Not no-referrer: with it, browsers send "Origin: null" on our own form posts.
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
CSRF_HEADER = "x-csrf-token"
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def secure_headers(response: Response, *, private: bool = True) -> Response:
    """Add the security headers (and, for anything with job data or a CSRF token
    in it, ``Cache-Control: no-store``)."""
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    if private:
        response.headers["cache-control"] = "no-store"
    return response


def _endpoint(scheme: str, host: str) -> tuple[str, str, int] | None:
    """(scheme, host name, port) of a URL's scheme and authority, default ports
    made explicit; ``None`` when it cannot be parsed."""
    try:
        parts = urlsplit(f"{scheme}://{host}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.path or parts.query or parts.username is not None:
        return None
    if port is None:
        port = _DEFAULT_PORTS.get(scheme)
    if port is None:
        return None
    return scheme, parts.hostname, port


def parse_origin(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an ``Origin`` value (or ``--public-origin``)."""
    scheme, sep, authority = origin.strip().lower().partition("://")
    if not sep or scheme not in ("http", "https"):
        return None
    return _endpoint(scheme, authority)


@dataclass(frozen=True, slots=True)
class Visit:
    """A screened dashboard request: who it speaks for, its session and the cookie
    (``new`` when the session was opened by this request and must be set)."""

    principal: Principal
    login: Login
    session_id: str
    new: bool = False


class Guard:
    """Screens dashboard requests (and the API's requests with a session)."""

    def __init__(self, logins: Logins, public_origin: str | None = None) -> None:
        self.logins = logins
        self.public_origin = None if public_origin is None else parse_origin(public_origin)
        if public_origin is not None and self.public_origin is None:
            raise ValueError(f"not an origin (scheme://host[:port]): {public_origin!r}")

    def own_origin(self, scheme: str, headers: Headers) -> tuple[str, str, int] | None:
        """The gateway's origin as browsers see it: ``--public-origin``, else the
        connection's scheme and the ``Host`` it was asked for."""
        if self.public_origin is not None:
            return self.public_origin
        host = headers.get("host")
        if not host:
            return None
        return _endpoint({"ws": "http", "wss": "https"}.get(scheme, scheme), host.strip().lower())

    def same_origin(self, scheme: str, headers: Headers) -> bool:
        """True when the request's ``Origin`` names this gateway."""
        origin = headers.get("origin")
        theirs = None if origin is None else parse_origin(origin)
        return theirs is not None and theirs == self.own_origin(scheme, headers)

    def secure(self, connection: HTTPConnection) -> bool:
        """Whether cookies get ``Secure``: the browser reaches us over TLS."""
        origin = self.public_origin
        return connection.url.scheme in ("https", "wss") or (
            origin is not None and origin[0] == "https"
        )

    @property
    def needs_login(self) -> bool:
        return self.logins.tokens is not None

    def check_origin(self, connection: HTTPConnection, *, change: bool) -> None:
        """The Host and Origin rules (see the module's docstring); HTTPError if not."""
        headers = connection.headers
        if not self.needs_login:
            refuse_foreign_host(headers)
        present = headers.get("origin") is not None
        if (present or change) and not self.same_origin(connection.url.scheme, headers):
            raise HTTPError(
                403, "forbidden", "cross-origin requests are refused (Origin is not this gateway)"
            )

    def visit(self, connection: HTTPConnection, *, change: bool = False) -> Visit | None:
        """The session of a request that passed :meth:`check_origin`, or ``None``
        when it has none (with tokens: it must log in). Without tokens a session is
        opened for a page view (never for a change: its CSRF token is unknown)."""
        session_id = connection.cookies.get(SESSION_COOKIE)
        found = self.logins.find(session_id)
        if found is not None:
            assert session_id is not None
            return Visit(found[1], found[0], session_id)
        if self.needs_login or change:
            return None
        session_id, login = self.logins.open(None)
        principal = self.logins.find(session_id)
        assert principal is not None
        return Visit(principal[1], login, session_id, new=True)

    def check_csrf(self, visit: Visit, offered: str | None) -> None:
        if not same_secret(offered, visit.login.csrf):
            raise HTTPError(403, "forbidden", "missing or wrong CSRF token: reload the page")

    def api_principal(self, headers: Headers) -> Principal | None:
        """For the API's screen: the principal of a request made by a dashboard page
        (session cookie, its CSRF token in ``X-CSRF-Token``, an Origin absent or
        ours; without tokens, a loopback Host), else ``None`` and the API's own
        rules apply."""
        offered = headers.get(CSRF_HEADER)
        if offered is None:
            return None
        cookies = _cookies(headers)
        found = self.logins.find(cookies.get(SESSION_COOKIE))
        if found is None or not same_secret(offered, found[0].csrf):
            return None
        # The gateway's own listener speaks plain HTTP (TLS is a proxy's, and then
        # --public-origin says so).
        if headers.get("origin") is not None and not self.same_origin("http", headers):
            return None
        if not self.needs_login:
            try:
                refuse_foreign_host(headers)
            except HTTPError:
                return None
        return found[1]


def _cookies(headers: Headers) -> dict[str, str]:
    cookies: dict[str, str] = {}
    for value in headers.getlist("cookie"):
        cookies.update(cookie_parser(value))
    return cookies
