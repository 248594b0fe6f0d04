"""The policy module without a broker: parsing, validation, and decisions."""

from __future__ import annotations

import os
import pwd
import re
import resource
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockexec_py.policy import (
    Allowed,
    Denied,
    Policy,
    PolicyError,
    describe,
    load_policy,
    parse_policy,
)

ROOT = 0
ENV = {b"PATH": b"/usr/bin:/bin", b"LANG": b"C.UTF-8", b"SECRET": b"s3"}


def policy(text: str, euid: int = ROOT, env: dict[bytes, bytes] | None = None) -> Policy:
    return parse_policy(tomllib.loads(text), source="p.toml", euid=euid, base_env=env or ENV)


def decide(p: Policy, *argv: str | bytes, uid: int = 1000, gid: int = 1000) -> Allowed | Denied:
    items = tuple(a.encode() if isinstance(a, str) else a for a in argv)
    return p.decide(items, uid, gid)


def allowed(verdict: Allowed | Denied) -> Allowed:
    assert isinstance(verdict, Allowed), verdict
    return verdict


def denied(verdict: Allowed | Denied) -> str:
    assert isinstance(verdict, Denied), verdict
    assert "\n" not in verdict.reason
    return verdict.reason


ECHO = '[[allow]]\nprogram = "echo"\n'


def test_allow_by_name_resolves_in_the_search_path_and_executes_that_path() -> None:
    p = policy(ECHO)
    verdict = allowed(decide(p, "echo", "hi"))
    assert verdict.spec.path == b"/usr/bin/echo"
    assert verdict.spec.argv == (b"echo", b"hi")  # argv[0] is the client's
    assert allowed(decide(p, "/usr/bin/echo")).spec.path == b"/usr/bin/echo"


def test_allow_by_absolute_path_matches_the_name_that_resolves_to_it() -> None:
    p = policy('[[allow]]\nprogram = "/usr/bin/echo"\n')
    assert allowed(decide(p, "echo")).spec.path == b"/usr/bin/echo"
    assert allowed(decide(p, "/usr/bin/../bin/echo")).spec.path == b"/usr/bin/echo"


def test_everything_else_is_denied_with_a_reason() -> None:
    p = policy(ECHO)
    assert denied(decide(p, "rm", "-rf", "/")) == "program /usr/bin/rm is not allowed"
    assert denied(decide(p, "/bin/echo")) == "program /bin/echo is not allowed"
    assert "relative program path" in denied(decide(p, "./echo"))
    assert "not in the policy's search path" in denied(decide(p, "no-such-program-xyz"))
    assert denied(decide(p, "ec\nho")) == "program ec\\nho is not in the policy's search path"
    assert denied(decide(p, b"\xff")) == "program \\xff is not allowed"


def test_search_path_is_the_policy_s_not_the_server_s(tmp_path: Path) -> None:
    tool = tmp_path / "echo"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    p = policy(f'path = ["{tmp_path}", "/usr/bin"]\n' + ECHO)
    assert allowed(decide(p, "echo")).spec.path == str(tool).encode()
    assert denied(decide(p, "/usr/bin/echo")) == "program /usr/bin/echo is not allowed"


@pytest.mark.parametrize(
    ("constraint", "good", "bad", "reason"),
    [
        ('args = ["-n", "x"]', ["-n", "x"], ["-n", "x", "y"], "exactly ['-n', 'x']"),
        ('args_prefix = ["-n"]', ["-n", "a", "b"], ["a", "-n"], "must start with ['-n']"),
        ('args_regex = ["[a-z]+", "\\\\d+"]', ["abc", "42"], ["abc", "42\n"], "does not match"),
        ('args_regex = ["[a-z]+"]', ["abc"], ["abc", "d"], "1 expected, got 2"),
        ("args = []", [], ["x"], "exactly []"),
    ],
)
def test_argument_constraints(
    constraint: str, good: list[str], bad: list[str], reason: str
) -> None:
    p = policy(f"{ECHO}{constraint}\n")
    allowed(decide(p, "echo", *good))
    assert reason in denied(decide(p, "echo", *bad))


def test_rules_are_tried_in_order_and_the_first_match_wins() -> None:
    p = policy(
        '[[allow]]\nname = "short"\nprogram = "echo"\nargs = ["a"]\ntimeout = 1\n'
        '[[allow]]\nname = "any"\nprogram = "echo"\n'
    )
    assert allowed(decide(p, "echo", "a")).rule.name == "short"
    assert allowed(decide(p, "echo", "b")).rule.name == "any"


def test_peer_restrictions_by_uid_or_gid() -> None:
    p = policy(f"{ECHO}peer_uids = [0, 33]\npeer_gids = [100]\n")
    allowed(decide(p, "echo", uid=33, gid=33))
    allowed(decide(p, "echo", uid=1000, gid=100))
    assert denied(decide(p, "echo", uid=1000, gid=1000)) == (
        "peer uid 1000 gid 1000 may not use allow 'echo'"
    )
    by_name = policy(f'{ECHO}peer_uids = ["root"]\n')
    allowed(decide(by_name, "echo", uid=0, gid=0))


COMMAND = """
[[command]]
name = "greet"
argv = ["/usr/bin/printf", "%s|", "--", "@@1", "x=@@2", "@@1"]
"""


def test_named_command_substitutes_parameters_as_whole_arguments() -> None:
    p = policy(COMMAND)
    verdict = allowed(decide(p, "greet", "a b", "c"))
    assert verdict.spec.path == b"/usr/bin/printf"
    assert verdict.spec.argv == (b"/usr/bin/printf", b"%s|", b"--", b"a b", b"x=c", b"a b")
    assert "takes 2 parameter(s), got 1" in denied(decide(p, "greet", "a"))
    assert "takes 2 parameter(s), got 3" in denied(decide(p, "greet", "a", "b", "c"))


HOSTILE = ["; rm -rf /", "$(id)", "`id`", "a\nb", "--help", "-rf", "@@2", "'\"", "", "*", "\\"]


@given(
    st.lists(
        st.sampled_from(HOSTILE) | st.binary().filter(lambda b: b"\0" not in b),
        min_size=2,
        max_size=2,
    )
)
def test_hostile_parameters_arrive_as_single_literal_arguments(params: list[str | bytes]) -> None:
    p = policy(COMMAND)
    one, two = (x.encode() if isinstance(x, str) else x for x in params)
    verdict = allowed(decide(p, "greet", one, two))
    assert verdict.spec.argv == (b"/usr/bin/printf", b"%s|", b"--", one, b"x=" + two, one)


def test_named_command_parameter_patterns_and_peers() -> None:
    p = policy(COMMAND + 'params_regex = ["[a-z]+", ".*"]\npeer_uids = [1000]\n')
    allowed(decide(p, "greet", "abc", "anything at all"))
    assert "parameter 1 does not match '[a-z]+'" in denied(decide(p, "greet", "ab1", "x"))
    assert "parameter 1 is not UTF-8" in denied(decide(p, "greet", b"\xff", "x"))
    assert "may not use command 'greet'" in denied(decide(p, "greet", "a", "b", uid=5, gid=5))


def test_a_command_name_is_not_a_program_path() -> None:
    p = policy(COMMAND)
    assert "relative program path" in denied(decide(p, "./greet", "a", "b"))


def test_environment_modes() -> None:
    p = policy(
        '[[allow]]\nname = "i"\nprogram = "env"\nargs = ["i"]\nsetenv = { A = "1" }\n'
        '[[allow]]\nname = "c"\nprogram = "env"\nargs = ["c"]\nenv = "clear"\n'
        'keepenv = ["LANG", "MISSING"]\nsetenv = { A = "1" }\n'
        '[[allow]]\nname = "m"\nprogram = "env"\nargs = ["m"]\nenv = "minimal"\n'
    )
    assert allowed(decide(p, "env", "i")).spec.env == {**ENV, b"A": b"1"}
    assert allowed(decide(p, "env", "c")).spec.env == {b"LANG": b"C.UTF-8", b"A": b"1"}
    minimal = allowed(decide(p, "env", "m")).spec.env
    assert set(minimal) == {b"PATH", b"HOME", b"USER", b"LOGNAME", b"SHELL"}
    assert minimal[b"PATH"] == b"/usr/local/bin:/usr/bin:/bin"


def test_switching_user_defaults_to_a_minimal_environment_of_that_user() -> None:
    nobody = pwd.getpwnam("nobody")
    p = policy(f'{ECHO}user = "nobody"\n')
    verdict = allowed(decide(p, "echo"))
    rule = verdict.rule
    assert (rule.uid, rule.gid) == (nobody.pw_uid, nobody.pw_gid)
    assert rule.groups == tuple(os.getgrouplist("nobody", nobody.pw_gid))
    assert verdict.spec.env[b"HOME"] == nobody.pw_dir.encode()
    assert verdict.spec.env[b"USER"] == b"nobody"
    assert b"SECRET" not in verdict.spec.env


def test_user_and_group_together_set_the_groups_from_the_group() -> None:
    p = policy(f'{ECHO}user = "nobody"\ngroup = "users"\n')
    rule = allowed(decide(p, "echo")).rule
    users = __import__("grp").getgrnam("users").gr_gid
    assert rule.gid == users
    assert rule.groups == tuple(os.getgrouplist("nobody", users))


def test_switching_user_needs_root() -> None:
    with pytest.raises(PolicyError, match="needs the broker to run as root"):
        policy(f'{ECHO}user = "nobody"\n', euid=1000)
    # Naming the user the broker already runs as is fine, and switches nothing.
    nobody = pwd.getpwnam("nobody").pw_uid
    verdict = allowed(decide(policy(f'{ECHO}user = "nobody"\n', euid=nobody), "echo"))
    assert verdict.rule.uid is None and verdict.rule.groups is None
    assert (verdict.spec.uid, verdict.spec.gid, verdict.spec.groups) == (None, None, None)
    assert verdict.rule.env_mode == "minimal"


def test_settings_are_parsed() -> None:
    p = policy(
        f'{ECHO}cwd = "/tmp"\numask = "027"\ntimeout = 2.5\nstdin = false\n'
        'max_running = 2\nmax_queue = 3\nrlimits = { nofile = 256, as = "512M", cpu = 7,'
        ' core = "unlimited" }\n'
    )
    rule = p.rules[0]
    assert (rule.cwd, rule.umask, rule.timeout, rule.stdin) == ("/tmp", 0o27, 2.5, False)
    assert (rule.max_running, rule.max_queue) == (2, 3)
    assert dict(rule.rlimits) == {
        "nofile": 256,
        "as": 512 << 20,
        "cpu": 7,
        "core": resource.RLIM_INFINITY,
    }
    spec = allowed(decide(p, "echo")).spec
    assert (spec.cwd, spec.umask) == ("/tmp", 0o27)
    assert ("nofile", resource.RLIMIT_NOFILE, 256) in spec.rlimits
    assert ("as", resource.RLIMIT_AS, 512 << 20) in spec.rlimits
    plain = allowed(decide(policy(ECHO), "echo")).spec
    assert (plain.cwd, plain.umask, plain.rlimits, plain.uid) == (None, None, (), None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1", "unknown key(s) ['bogus']"),
        ("allow = 1", "allow must be an array of tables"),
        ('[[allow]]\nprogram = "echo"\nfoo = 1', "[[allow]] #1: unknown key(s) ['foo']"),
        ("[[allow]]\nname = 'x'", "[[allow]] #1: program must be a non-empty string"),
        ('[[allow]]\nprogram = "bin/echo"', "a path must be absolute"),
        ('[[allow]]\nprogram = "echo"\nargs = []\nargs_prefix = []', "use one of args"),
        ('[[allow]]\nprogram = "echo"\nargs_regex = ["("]', "bad regex '('"),
        ('[[allow]]\nprogram = "echo"\nuser = "no-such-user-xyz"', "no such user"),
        ('[[allow]]\nprogram = "echo"\ngroup = "no-such-group-xyz"', "no such group"),
        ('[[allow]]\nprogram = "echo"\ncwd = "tmp"', "cwd 'tmp' is not absolute"),
        ('[[allow]]\nprogram = "echo"\nenv = "some"', "env must be 'inherit'"),
        ('[[allow]]\nprogram = "echo"\nsetenv = { "A B" = "1" }', "not a valid variable name"),
        ('[[allow]]\nprogram = "echo"\nrlimits = { foo = 1 }', "unknown limit 'foo'"),
        ('[[allow]]\nprogram = "echo"\nrlimits = { as = "lots" }', 'a size like "512M"'),
        ('[[allow]]\nprogram = "echo"\numask = "999"', "umask must be octal"),
        ('[[allow]]\nprogram = "echo"\numask = 1024', "umask must be within"),
        ('[[allow]]\nprogram = "echo"\ntimeout = 0', "timeout must be a positive number"),
        ('[[allow]]\nprogram = "echo"\ntimeout = inf', "timeout must be a positive number"),
        ('[[allow]]\nprogram = "echo"\nstdin = "no"', "stdin must be true or false"),
        ('[[allow]]\nprogram = "echo"\nmax_running = 0', "max_running must be a positive"),
        ('[[allow]]\nprogram = "echo"\nmax_queue = 1', "max_queue needs max_running"),
        ('[[allow]]\nprogram = "echo"\npeer_uids = [-1]', "ids are names or integers >= 0"),
        ('[[command]]\nname = "a/b"\nargv = ["x"]', "must be a non-empty word without '/'"),
        ('[[command]]\nname = "a"\nargv = []', "argv must name a program"),
        ('[[command]]\nname = "a"\nargv = ["@@1"]', "argv[0] cannot be a parameter"),
        ('[[command]]\nname = "a"\nargv = ["x", "@@0"]', "numbered from @@1"),
        ('[[command]]\nname = "a"\nargv = ["x", "@@2"]\nparams = 1', "params must be an integer"),
        ('[[command]]\nname = "a"\nargv = ["x", "@@1"]\nparams_regex = []', "needs 1 pattern"),
        ('[[command]]\nname = "a"\nargv = ["x"]\n[[command]]\nname = "a"\nargv = ["y"]', "twice"),
        ('path = ["bin"]', "path: 'bin' is not absolute"),
    ],
)
def test_invalid_policies_are_refused_with_one_line_saying_where(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        policy(text)
    assert message in str(info.value)
    assert str(info.value).startswith("p.toml")
    assert "\n" not in str(info.value)


def test_load_policy_reports_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"cannot read: No such file"):
        load_policy(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[[allow]\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(str(bad))
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(str(bad))


def test_the_example_policy_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "misc" / "policy.example.toml"
    p = load_policy(str(example), euid=ROOT)
    assert p.rules
    text = "\n".join(describe(p))
    for rule in p.rules:
        assert re.search(re.escape(rule.label), text)


def test_default_environment_is_inherit_unless_the_rule_switches_user() -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    for euid in (ROOT, nobody):
        assert policy(ECHO, euid=euid).rules[0].env_mode == "inherit"
        assert policy(f'{ECHO}user = "nobody"\n', euid=euid).rules[0].env_mode == "minimal"


def test_a_peer_the_rule_is_not_for_learns_nothing_of_its_arguments() -> None:
    p = policy(f'{ECHO}args_regex = ["\\\\d+"]\npeer_uids = [0]\n')
    assert denied(decide(p, "echo", "abc", uid=5, gid=5)) == (
        "peer uid 5 gid 5 may not use allow 'echo'"
    )
    assert "does not match" in denied(decide(p, "echo", "abc", uid=0, gid=0))
    command = policy(COMMAND + 'params_regex = ["\\\\d+", ".*"]\npeer_uids = [0]\n')
    assert "may not use command 'greet'" in denied(decide(command, "greet", "x", uid=5, gid=5))


def test_patterns_match_ascii_only() -> None:
    p = policy(f'{ECHO}args_regex = ["\\\\d+"]\n')
    allowed(decide(p, "echo", "123"))
    assert "does not match" in denied(decide(p, "echo", "١٢٣"))  # Arabic-Indic digits


def test_rlimit_values_past_the_kernel_s_range_are_refused() -> None:
    with pytest.raises(PolicyError, match=r"rlimits\.as is too large"):
        policy(f'{ECHO}rlimits = {{ as = "99999999999T" }}\n')


def test_rules_with_a_queue_need_distinct_names() -> None:
    with pytest.raises(PolicyError, match="defined twice"):
        policy(f"{ECHO}max_running = 1\n{ECHO}max_running = 2\n")
    policy(f'{ECHO}max_running = 1\n{ECHO}name = "other"\nmax_running = 2\n')
