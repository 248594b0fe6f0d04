"""What a policy allows, in lines for people (``sockexec-py --check-policy FILE``)."""

from __future__ import annotations

import os

from .model import Denied, Policy, Rule, show_list


def describe(policy: Policy) -> list[str]:
    """Human-readable lines saying what the policy allows: each rule, where its program
    was found (or that it was not), and its settings."""
    lines = [f"policy {policy.source}: {len(policy.rules)} rule(s)"]
    lines.append(f"search path: {':'.join(policy.search_path)}")
    for rule in policy.rules:
        lines.append(f"{rule.label}:")
        if rule.kind == "allow":
            where = policy.program_path(rule) or "NOT FOUND in the search path"
            lines.append(f"  program {rule.program} ({where})")
            if rule.args is not None:
                lines.append(f"  arguments exactly {show_list(rule.args)}")
            elif rule.args_prefix is not None:
                lines.append(f"  arguments starting with {show_list(rule.args_prefix)}")
            elif rule.args_regex is not None:
                patterns = [p.pattern for p in rule.args_regex]
                lines.append(f"  arguments matching {patterns}")
            else:
                lines.append("  any arguments")
        else:
            lines.append(f"  runs {show_list(rule.template)} with {rule.params} parameter(s)")
            found = policy.resolve_request(rule.template[0])
            if isinstance(found, Denied) or not os.access(found, os.X_OK):
                lines.append("  program NOT FOUND or not executable")
            if rule.params_regex is not None:
                lines.append(f"  parameters matching {[p.pattern for p in rule.params_regex]}")
        lines.extend(f"  {line}" for line in _settings_lines(rule))
    return lines


def _settings_lines(rule: Rule) -> list[str]:
    lines = []
    if rule.peer_uids is not None or rule.peer_gids is not None:
        lines.append(
            f"peers: uids {sorted(rule.peer_uids or ())} gids {sorted(rule.peer_gids or ())}"
        )
    else:
        lines.append("peers: anyone who can connect")
    if rule.uid is not None or rule.gid is not None:
        lines.append(
            f"runs as uid {rule.uid} gid {rule.gid} groups {list(rule.groups or ())}"
            + (f" ({rule.user})" if rule.user else "")
        )
    if rule.cwd:
        lines.append(f"working directory {rule.cwd}")
    env = f"environment {rule.env_mode}"
    if rule.keepenv:
        env += f", keeps {[k.decode() for k in rule.keepenv]}"
    if rule.setenv:
        env += f", sets {[k.decode() for k, _ in rule.setenv]}"
    lines.append(env)
    if rule.rlimits:
        lines.append("rlimits " + ", ".join(f"{k}={v}" for k, v in rule.rlimits))
    if rule.umask is not None:
        lines.append(f"umask {rule.umask:03o}")
    if rule.timeout is not None:
        lines.append(f"timeout {rule.timeout:g}s")
    if not rule.stdin:
        lines.append("stdin: not passed (the program reads EOF)")
    if rule.max_running is not None:
        queue = "unlimited" if rule.max_queue is None else str(rule.max_queue)
        lines.append(f"at most {rule.max_running} running, queue {queue}")
    return lines
