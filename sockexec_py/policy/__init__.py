"""Execution policy: which programs a peer may run, as whom, with which limits.

:func:`load_policy` turns a TOML file into a :class:`Policy` (``load``);
:meth:`Policy.decide` turns a request (argv and the peer's credentials) into
:class:`Allowed`, with the :class:`ExecSpec` to start, or :class:`Denied`
(``model``); :func:`describe` says what a policy allows (``--check-policy``).

Two kinds of rules; a request naming a ``[[command]]`` uses it, otherwise the
``[[allow]]`` rules are tried in file order and the first that matches wins:

* ``[[allow]]`` — a program by absolute path or by name in the search path, with
  optional argument constraints (exact list, prefix, or one regex per position);
* ``[[command]]`` — a named command: the client sends the name and parameters, the
  rule gives the argv, ``@@1``, ``@@2``… replaced by the parameters, each one a single
  argument (there is no shell, so no quoting problem exists).

Programs are executed by the resolved absolute path; the client's ``argv[0]`` is kept.
"""

from .describe import describe
from .load import load_policy, parse_policy
from .model import (
    ALLOW_ALL,
    RLIMITS,
    AllowAll,
    Allowed,
    Denied,
    ExecSpec,
    Policy,
    PolicyError,
    Rule,
    server_environ,
)

__all__ = [
    "ALLOW_ALL",
    "RLIMITS",
    "AllowAll",
    "Allowed",
    "Denied",
    "ExecSpec",
    "Policy",
    "PolicyError",
    "Rule",
    "describe",
    "load_policy",
    "parse_policy",
    "server_environ",
]
