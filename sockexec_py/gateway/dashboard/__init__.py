"""The web dashboard (issue 17): server-rendered pages with a small script, served
by the gateway at ``/``. :class:`Dashboard` holds it; :mod:`.routes` lists the routes,
:mod:`.guard` the security rules, :mod:`.logins` the sessions, :mod:`.live` the
live updates, :mod:`.html` the escaping templates."""

from __future__ import annotations

from .routes import Dashboard

__all__ = ["Dashboard"]
