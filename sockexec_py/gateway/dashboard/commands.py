"""The run form's commands: the ``[[command]]`` rules of the policy file given to the
gateway (``--policy FILE``), read-only, and the check of a submitted form.

The broker decides what runs (its own ``--policy``); the gateway reads the file to
show the named commands with one field per parameter, and checks the parameters
against ``params_regex`` before submitting, so a wrong value is a message on the
form instead of a failed job. The file is re-read when it changes (one ``stat`` a
page), and a file that becomes unreadable or invalid keeps the last good commands.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from sockexec_py.policy import PolicyError, load_policy

log = logging.getLogger("sockexec_py.gateway")


@dataclass(frozen=True, slots=True)
class Command:
    """A named command: its name (the job's argv[0] and queue), and one pattern per
    parameter (``None`` where the rule has no ``params_regex``)."""

    name: str
    patterns: tuple[re.Pattern[str] | None, ...]

    def problem(self, params: list[str]) -> str | None:
        """Why the broker's policy would refuse ``params``, or ``None``: the same
        count and the same whole-value match (the rule's patterns, ASCII mode)."""
        if len(params) != len(self.patterns):
            return f"{self.name} takes {len(self.patterns)} parameter(s), got {len(params)}"
        for position, (pattern, value) in enumerate(zip(self.patterns, params, strict=True), 1):
            if "\x00" in value:
                return f"parameter {position} holds a NUL byte"
            if pattern is not None and pattern.fullmatch(value) is None:
                return f"parameter {position} does not match {pattern.pattern}"
        return None


class Commands:
    """The named commands of a policy file (none without one)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._identity: tuple[int, int, int, int] | None = None
        self._commands: dict[str, Command] = {}
        self.error: str | None = None
        if path is not None:
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if identity == self._identity:
                return
            policy = load_policy(self.path)
        except (OSError, PolicyError) as exc:
            self.error = str(exc) if isinstance(exc, PolicyError) else f"{self.path}: {exc}"
            log.warning("dashboard: cannot read the policy, keeping the last commands: %s", exc)
            return
        self._identity, self.error = identity, None
        self._commands = {}
        for rule in policy.rules:
            if rule.kind != "command":
                continue
            patterns = rule.params_regex or (None,) * rule.params
            self._commands[rule.name] = Command(rule.name, tuple(patterns))

    def all(self) -> list[Command]:
        if self.path is not None:
            self._load()
        return list(self._commands.values())

    def get(self, name: str) -> Command | None:
        if self.path is not None:
            self._load()
        return self._commands.get(name)
