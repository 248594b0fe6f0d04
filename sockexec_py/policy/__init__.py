"""Execution policy: which programs a peer may run, as whom, with which limits.

:func:`load_policy` turns a TOML file into a :class:`Policy`; :meth:`Policy.decide`
turns a request (argv and the peer's credentials) into :class:`Allowed` or
:class:`Denied`.
"""

from .model import (
    RLIMITS,
    Allowed,
    Denied,
    Policy,
    PolicyError,
    Rule,
    load_policy,
    parse_policy,
)

__all__ = [
    "RLIMITS",
    "Allowed",
    "Denied",
    "Policy",
    "PolicyError",
    "Rule",
    "load_policy",
    "parse_policy",
]
