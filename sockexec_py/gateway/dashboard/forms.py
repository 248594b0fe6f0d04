"""The dashboard's forms: the run form (the policy's named commands) and the login."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .commands import Command
from .html import Markup, join, render, tag


def command_form(
    command: Command, csrf: str, values: Sequence[str] = (), error: str = ""
) -> Markup:
    fields = []
    for number, pattern in enumerate(command.patterns, 1):
        source = None if pattern is None else pattern.pattern
        fields.append(
            render(
                "field.html",
                {
                    "number": str(number),
                    "value": values[number - 1] if number <= len(values) else "",
                    "pattern": source or "",
                    "hint": f"must match {source}" if source else "any value",
                },
            )
        )
    if not fields:
        fields.append(tag("p", "No parameters.", class_="hint"))
    return render(
        "command.html",
        {"name": command.name, "csrf": csrf, "fields": join(fields), "error": error},
    )


def run_page(
    commands: Sequence[Command],
    csrf: str,
    *,
    notice: str = "",
    submitted: Mapping[str, tuple[Sequence[str], str]] | None = None,
) -> Markup:
    """``submitted``: per command name, the values and the error to show again."""
    submitted = submitted or {}
    forms = join(
        command_form(command, csrf, *submitted.get(command.name, ((), ""))) for command in commands
    )
    if not commands and not notice:
        notice = (
            "No named commands: start the gateway with --policy FILE (the broker's policy) "
            "to list its [[command]] rules here."
        )
    return render(
        "run.html", {"notice": tag("p", notice, class_="notice") if notice else "", "forms": forms}
    )


def login_page(csrf: str, next_path: str, error: str = "") -> Markup:
    return render("login.html", {"csrf": csrf, "next": next_path, "error": error})
