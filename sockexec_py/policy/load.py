"""Loading a policy file: TOML in, a validated :class:`~.model.Policy` out, or a
:class:`~.model.PolicyError` naming the file, the rule and what is wrong in one line.

Names are resolved here, once: users and groups (so a rule carries uids and gids),
supplementary groups (``getgrouplist``). Programs are looked up at decision time.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import resource
import tomllib
from collections.abc import Mapping
from typing import Any, Literal

from .model import DEFAULT_SEARCH_PATH, PLACEHOLDER, RLIMITS, Policy, PolicyError, Rule

_RLIM_MAX = (1 << 63) - 1
_SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RULE_KEYS = frozenset(
    (
        "name",
        "user",
        "group",
        "cwd",
        "env",
        "setenv",
        "keepenv",
        "rlimits",
        "umask",
        "timeout",
        "stdin",
        "max_running",
        "max_queue",
        "peer_uids",
        "peer_gids",
    )
)
_ALLOW_KEYS = _RULE_KEYS | {"program", "args", "args_prefix", "args_regex"}
_COMMAND_KEYS = _RULE_KEYS | {"argv", "params", "params_regex"}


def load_policy(
    path: str, *, euid: int | None = None, base_env: Mapping[bytes, bytes] | None = None
) -> Policy:
    """Read and validate a policy file; :class:`PolicyError` says what is wrong and where.

    ``euid`` is the user the broker runs as (default: this process's): rules that
    switch user need root. ``base_env`` is the environment ``inherit`` passes on
    (default: the server's).
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not valid TOML: not UTF-8") from None
    return parse_policy(
        data,
        source=path,
        euid=os.geteuid() if euid is None else euid,
        base_env=base_env,
    )


def parse_policy(
    data: Mapping[str, Any],
    *,
    source: str,
    euid: int,
    base_env: Mapping[bytes, bytes] | None = None,
) -> Policy:
    """Validate a parsed policy document (see :func:`load_policy`)."""
    unknown = set(data) - {"path", "allow", "command"}
    if unknown:
        raise PolicyError(f"{source}: unknown key(s) {sorted(unknown)}")
    search_path = _string_list(data.get("path", list(DEFAULT_SEARCH_PATH)), f"{source}: path")
    for directory in search_path:
        if not directory.startswith("/"):
            raise PolicyError(f"{source}: path: {directory!r} is not absolute")
    rules: list[Rule] = []
    names: set[str] = set()
    for kind in ("allow", "command"):
        tables = data.get(kind, [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise PolicyError(f"{source}: {kind} must be an array of tables ([[{kind}]])")
        for number, table in enumerate(tables, 1):
            where = f"{source}: [[{kind}]] #{number}"
            rule = _parse_rule(kind, number, table, where, euid)
            # Commands are found by name; gates are kept across reloads by name.
            if kind == "command" or rule.max_running is not None:
                if rule.key in names:
                    raise PolicyError(
                        f"{where}: {rule.label} defined twice (give each rule its own name)"
                    )
                names.add(rule.key)
            rules.append(rule)
    return Policy(source, tuple(search_path), tuple(rules), base_env)


def _parse_rule(
    kind: Literal["allow", "command"], index: int, table: dict[str, Any], where: str, euid: int
) -> Rule:
    allowed_keys = _ALLOW_KEYS if kind == "allow" else _COMMAND_KEYS
    unknown = set(table) - allowed_keys
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {sorted(unknown)}")
    fields: dict[str, Any] = {"kind": kind, "index": index}
    if kind == "allow":
        program = _string(table.get("program"), f"{where}: program")
        if "/" in program and not program.startswith("/"):
            raise PolicyError(f"{where}: program {program!r}: a path must be absolute")
        fields["program"] = os.path.normpath(program) if program.startswith("/") else program
        fields["name"] = _string(table.get("name", program), f"{where}: name")
        constraints = [k for k in ("args", "args_prefix", "args_regex") if k in table]
        if len(constraints) > 1:
            raise PolicyError(f"{where}: use one of args, args_prefix, args_regex")
        if "args" in table:
            fields["args"] = _bytes_list(table["args"], f"{where}: args")
        if "args_prefix" in table:
            fields["args_prefix"] = _bytes_list(table["args_prefix"], f"{where}: args_prefix")
        if "args_regex" in table:
            fields["args_regex"] = _regex_list(table["args_regex"], f"{where}: args_regex")
    else:
        name = _string(table.get("name"), f"{where}: name")
        if "/" in name or not name:
            raise PolicyError(f"{where}: name {name!r} must be a non-empty word without '/'")
        fields["name"] = name
        template = _bytes_list(table.get("argv"), f"{where}: argv")
        if not template or not template[0]:
            raise PolicyError(f"{where}: argv must name a program")
        if PLACEHOLDER.search(template[0]):
            raise PolicyError(f"{where}: argv[0] cannot be a parameter")
        used = [int(m) for item in template for m in PLACEHOLDER.findall(item)]
        if any(n < 1 for n in used):
            raise PolicyError(f"{where}: parameters are numbered from @@1")
        params = table.get("params", max(used, default=0))
        if not isinstance(params, int) or isinstance(params, bool) or params < max(used, default=0):
            raise PolicyError(
                f"{where}: params must be an integer >= the highest placeholder "
                f"(@@{max(used, default=0)})"
            )
        fields["template"] = template
        fields["params"] = params
        if "params_regex" in table:
            patterns = _regex_list(table["params_regex"], f"{where}: params_regex")
            if len(patterns) != params:
                raise PolicyError(f"{where}: params_regex needs {params} pattern(s)")
            fields["params_regex"] = patterns
        first = template[0].decode()
        if "/" in first and not first.startswith("/"):
            raise PolicyError(f"{where}: argv[0] {first!r}: a path must be absolute")
    fields.update(_parse_settings(table, where, euid))
    return Rule(**fields)


def _parse_settings(table: dict[str, Any], where: str, euid: int) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    user = table.get("user")
    group = table.get("group")
    if user is not None:
        entry = _lookup_user(user, f"{where}: user")
        fields.update(user=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)
        fields.update(home=entry.pw_dir, shell=entry.pw_shell or "/bin/sh")
        if group is None:
            fields["groups"] = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    if group is not None:
        gid = _lookup_group(group, f"{where}: group")
        fields["gid"] = gid
        fields["groups"] = (
            tuple(os.getgrouplist(fields["user"], gid)) if user is not None else (gid,)
        )
    switching = fields.get("uid") not in (None, euid) or fields.get("gid") not in (
        None,
        _primary_gid(euid),
    )
    if switching and euid != 0:
        raise PolicyError(f"{where}: switching user or group needs the broker to run as root")
    if euid != 0:  # running as that very user already: nothing to switch
        fields.update(uid=None, gid=None, groups=None)
    if "cwd" in table:
        cwd = _string(table["cwd"], f"{where}: cwd")
        if not cwd.startswith("/"):
            raise PolicyError(f"{where}: cwd {cwd!r} is not absolute")
        fields["cwd"] = cwd
    switches = "user" in table or "group" in table
    env_mode = table.get("env", "minimal" if switches else "inherit")
    if env_mode not in ("inherit", "clear", "minimal"):
        raise PolicyError(f"{where}: env must be 'inherit', 'clear' or 'minimal'")
    fields["env_mode"] = env_mode
    setenv = table.get("setenv", {})
    if not isinstance(setenv, dict) or not all(isinstance(v, str) for v in setenv.values()):
        raise PolicyError(f"{where}: setenv must be a table of strings")
    for key in setenv:
        _env_name(key, f"{where}: setenv")
    fields["setenv"] = tuple((k.encode(), v.encode()) for k, v in setenv.items())
    keepenv = _string_list(table.get("keepenv", []), f"{where}: keepenv")
    for key in keepenv:
        _env_name(key, f"{where}: keepenv")
    fields["keepenv"] = tuple(k.encode() for k in keepenv)
    rlimits = table.get("rlimits", {})
    if not isinstance(rlimits, dict):
        raise PolicyError(f"{where}: rlimits must be a table")
    parsed = []
    for key, value in rlimits.items():
        if key not in RLIMITS:
            raise PolicyError(f"{where}: rlimits: unknown limit {key!r} (known: {sorted(RLIMITS)})")
        parsed.append((key, _size(value, f"{where}: rlimits.{key}")))
    fields["rlimits"] = tuple(parsed)
    if "umask" in table:
        umask = table["umask"]
        if isinstance(umask, str):
            try:
                umask = int(umask, 8)
            except ValueError:
                raise PolicyError(f'{where}: umask must be octal, e.g. "027"') from None
        if not isinstance(umask, int) or isinstance(umask, bool) or not 0 <= umask <= 0o777:
            raise PolicyError(f"{where}: umask must be within 000..777")
        fields["umask"] = umask
    if "timeout" in table:
        fields["timeout"] = _positive(table["timeout"], f"{where}: timeout", number=True)
    if "stdin" in table:
        if not isinstance(table["stdin"], bool):
            raise PolicyError(f"{where}: stdin must be true or false")
        fields["stdin"] = table["stdin"]
    if "max_running" in table:
        fields["max_running"] = int(_positive(table["max_running"], f"{where}: max_running"))
    if "max_queue" in table:
        if "max_running" not in table:
            raise PolicyError(f"{where}: max_queue needs max_running")
        queue = table["max_queue"]
        if not isinstance(queue, int) or isinstance(queue, bool) or queue < 0:
            raise PolicyError(f"{where}: max_queue must be an integer >= 0")
        fields["max_queue"] = queue
    if "peer_uids" in table:
        items = _list(table["peer_uids"], f"{where}: peer_uids")
        fields["peer_uids"] = frozenset(
            _lookup_user(u, f"{where}: peer_uids").pw_uid if isinstance(u, str) else _id(u, where)
            for u in items
        )
    if "peer_gids" in table:
        items = _list(table["peer_gids"], f"{where}: peer_gids")
        fields["peer_gids"] = frozenset(
            _lookup_group(g, f"{where}: peer_gids") if isinstance(g, str) else _id(g, where)
            for g in items
        )
    return fields


def _primary_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return os.getegid()


def _lookup_user(value: object, where: str) -> pwd.struct_passwd:
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            return pwd.getpwuid(value)
        if isinstance(value, str):
            return pwd.getpwnam(value)
    except KeyError:
        raise PolicyError(f"{where}: no such user {value!r}") from None
    raise PolicyError(f"{where}: a user is a name or a uid")


def _lookup_group(value: object, where: str) -> int:
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            return grp.getgrgid(value).gr_gid
        if isinstance(value, str):
            return grp.getgrnam(value).gr_gid
    except KeyError:
        raise PolicyError(f"{where}: no such group {value!r}") from None
    raise PolicyError(f"{where}: a group is a name or a gid")


def _id(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PolicyError(f"{where}: ids are names or integers >= 0, got {value!r}")
    return value


def _env_name(key: str, where: str) -> None:
    if not _ENV_NAME.fullmatch(key):
        raise PolicyError(f"{where}: {key!r} is not a valid variable name")


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise PolicyError(f"{where} must be a list")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError(f"{where} must be a non-empty string")
    if "\0" in value:
        raise PolicyError(f"{where} must not contain NUL")
    return value


def _string_list(value: object, where: str) -> list[str]:
    items = _list(value, where)
    for item in items:
        if not isinstance(item, str) or "\0" in item:
            raise PolicyError(f"{where} must be a list of strings")
    return items


def _bytes_list(value: object, where: str) -> tuple[bytes, ...]:
    return tuple(item.encode() for item in _string_list(value, where))


def _regex_list(value: object, where: str) -> tuple[re.Pattern[str], ...]:
    patterns = []
    for item in _string_list(value, where):
        try:
            patterns.append(re.compile(item, re.ASCII))
        except re.error as exc:
            raise PolicyError(f"{where}: bad regex {item!r}: {exc}") from None
    return tuple(patterns)


def _positive(value: object, where: str, *, number: bool = False) -> float:
    kinds = (int, float) if number else (int,)
    if (
        not isinstance(value, kinds)
        or isinstance(value, bool)
        or not value > 0
        or value == float("inf")
    ):
        raise PolicyError(f"{where} must be a positive {'number' if number else 'integer'}")
    return float(value) if number else int(value)


def _size(value: object, where: str) -> int:
    """An rlimit value: an integer, a size like "512M", or "unlimited"."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        number = value
    elif isinstance(value, str):
        text = value.strip().lower()
        if text == "unlimited":
            return resource.RLIM_INFINITY
        match = re.fullmatch(r"(\d+)\s*([kmgt]?)i?b?", text)
        if match:
            number = int(match.group(1)) * _SIZE_SUFFIXES[match.group(2)]
    if number is not None:
        if number > _RLIM_MAX:
            raise PolicyError(f'{where} is too large (at most {_RLIM_MAX}, or "unlimited")')
        return number
    raise PolicyError(f'{where} must be an integer >= 0, a size like "512M", or "unlimited"')
