"""HTML made safe by construction: every value put into a template is escaped, unless
it is :class:`Markup` (HTML this package built from escaped parts).

Why not Jinja: one more dependency for five small pages, and its autoescape is a
setting (a template can turn it off, ``|safe`` lets anything through). Here the only
way to get unescaped text into a page is to wrap it in :class:`Markup`, which only
this package's own code does, on strings built by :func:`render`, :func:`tag` or
:func:`join` from escaped parts. Templates are ``string.Template`` files
(``$name`` placeholders) shipped in ``templates/``; there is no logic in them.

Attribute values are always quoted in the templates and ``escape`` turns ``"`` and
``'`` into entities, so a value cannot leave its attribute; URLs are built with
:func:`urllib.parse.urlencode` before they are escaped. No value ever reaches a
``<script>``: pages carry data for the script in ``data-*`` attributes.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from string import Template


class Markup(str):
    """A string of HTML that is safe to insert as it is."""

    __slots__ = ()


def escape(value: object) -> Markup:
    """``value`` as HTML text (``None`` is empty); :class:`Markup` passes unchanged."""
    if isinstance(value, Markup):
        return value
    if value is None:
        return Markup("")
    return Markup(html.escape(str(value), quote=True))


@cache
def _template(name: str) -> Template:
    text = resources.files(__package__).joinpath("templates", name).read_text("utf-8")
    return Template(text)


def render(name: str, values: Mapping[str, object]) -> Markup:
    """The template ``templates/NAME`` with every ``$placeholder`` filled with its
    escaped value. A missing value is a bug: ``KeyError``."""
    return Markup(_template(name).substitute({key: escape(v) for key, v in values.items()}))


def tag(name: str, content: object = "", /, **attributes: object) -> Markup:
    """``<name attr="value">content</name>``, every value escaped. An attribute whose
    value is ``None`` or ``False`` is left out, ``True`` writes it bare; a trailing
    underscore is dropped (``class_``), other underscores become dashes
    (``data_job`` → ``data-job``)."""
    parts = [name]
    for key, value in attributes.items():
        if value is None or value is False:
            continue
        attribute = key.rstrip("_").replace("_", "-")
        parts.append(attribute if value is True else f'{attribute}="{escape(value)}"')
    return Markup(f"<{' '.join(parts)}>{escape(content)}</{name}>")


def join(items: Iterable[object], separator: str = "") -> Markup:
    """The items, each escaped, one after the other."""
    return Markup(escape(separator).join(escape(item) for item in items))
