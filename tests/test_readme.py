"""The README's examples are run, so they cannot rot."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, Broker, GatewayProcess, require_tool

README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def _shell_blocks(section: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def test_gateway_curl_examples_work(gateway: GatewayProcess, tmp_path: Path) -> None:
    require_tool("curl")
    lines = [
        line
        for block in _shell_blocks(_section("HTTP gateway"))
        for line in block.splitlines()
        if line.startswith("curl ")
    ]
    assert len(lines) == 5
    outputs = []
    for line in lines:
        command = line.replace("http://127.0.0.1:8080", gateway.base)
        proc = subprocess.run(["bash", "-c", command], capture_output=True, timeout=60)
        assert proc.returncode == 0, (line, proc.stderr)
        outputs.append(proc.stdout.decode())
    uname = subprocess.run(["uname", "-s"], capture_output=True, text=True, check=True).stdout
    assert json.loads(outputs[0])["stdout"] == uname
    assert json.loads(outputs[1])["stdout"] == "HELLO"
    assert json.loads(outputs[2])["stdout_b64"] == "AQ=="
    frames = [json.loads(line) for line in outputs[3].splitlines()]
    assert {"type": "stdout", "data": "one\n"} in frames
    assert {"type": "stderr", "data": "two\n"} in frames
    assert frames[-1] == {"type": "exit", "exitcode": 0, "termsig": None}
    assert json.loads(outputs[4]) == {"status": "ok"}


def test_socat_example_works(broker: Broker, tmp_path: Path) -> None:
    require_tool("socat")
    (block, *_) = _shell_blocks(_section("Trying it"))
    line = next(line for line in block.splitlines() if "socat" in line)
    proc = subprocess.run(
        ["bash", "-c", line.replace("/tmp/sockexec.sock", str(broker.path))],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    uname = subprocess.run(["uname", "-a"], capture_output=True, check=True).stdout
    assert proc.stdout == b"6:stdout,%d:%b,8:exitcode,1:0," % (len(uname), uname)


def test_python_client_examples_run(broker: Broker) -> None:
    blocks = re.findall(r"```python\n(.*?)```", _section("Python client"), re.S)
    assert len(blocks) == 2
    for block in blocks:
        proc = subprocess.run(
            [sys.executable, "-c", f"SOCKET = {str(broker.path)!r}\n{block}"],
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr.decode()
    assert (
        b"Exited(exitcode=0" in proc.stdout and b"Output(kind='stdout', data=b'hi')" in proc.stdout
    )


def test_command_line_client_example(broker: Broker) -> None:
    (block,) = _shell_blocks(_section("Command-line clients"))
    line = block.split("#")[0].replace("/tmp/sockexec.sock", str(broker.path))
    proc = subprocess.run(["bash", "-c", line], capture_output=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, b"HELLO")


def test_policy_example_is_a_valid_policy(tmp_path: Path) -> None:
    import tomllib

    from sockexec_py.policy import Allowed, parse_policy

    (block,) = re.findall(r"```toml\n(.*?)```", _section("Policy"), re.S)
    policy = parse_policy(tomllib.loads(block), source="README", euid=0)
    verdict = policy.decide((b"thumbnail", b"a.png", b"; rm -rf /.png"), 0, 0)
    assert not isinstance(verdict, Allowed)  # the parameter pattern refuses it
    verdict = policy.decide((b"thumbnail", b"a.png", b"b.png"), 0, 0)
    assert isinstance(verdict, Allowed)
    assert verdict.spec.argv[2:] == (b"a.png", b"-resize", b"128x128", b"b.png")
    (commands,) = _shell_blocks(_section("Policy"))
    check = next(line for line in commands.splitlines() if "--check-policy" in line)
    proc = subprocess.run(
        [sys.executable, "-m", "sockexec_py", *check.split("#")[0].split()[1:]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "command 'thumbnail':" in proc.stdout


def test_jobs_examples_work(broker: Broker, tmp_path: Path) -> None:
    require_tool("curl")
    section = _section("Jobs")
    blocks = _shell_blocks(section)
    curls = [line for block in blocks for line in block.splitlines() if line.startswith("curl ")]
    assert len(curls) == 7
    with GatewayProcess(broker.path, "--data-dir", str(tmp_path / "data")) as gateway:

        def shell(line: str, job_id: str = "") -> str:
            command = line.replace("http://127.0.0.1:8080", gateway.base).replace("ID", job_id)
            command = command.replace(
                "sockexec-client ", f"{sys.executable} -m sockexec_py.client.cli "
            )
            proc = subprocess.run(["bash", "-c", command], capture_output=True, timeout=60)
            assert proc.returncode == 0, (line, proc.stderr)
            return proc.stdout.decode()

        accepted = json.loads(shell(curls[0]))
        job_id = accepted["id"]
        assert set(accepted) == {"id", "state", "position", "url"}
        job = json.loads(shell(curls[1], job_id))
        assert (job["state"], job["exitcode"], job["progress"]["title"]) == ("failed", 3, "build")
        frames = [json.loads(line) for line in shell(curls[2], job_id).splitlines()]
        assert frames[0] == {"type": "stdout", "data": "[1/2] build\nbuilt\n", "offset": 0}
        assert frames[-1]["type"] == "exit" and frames[-1]["exitcode"] == 3
        assert shell(curls[3], job_id) == "built\n"
        assert [each["id"] for each in json.loads(shell(curls[4]))["jobs"]] == [job_id]
        assert json.loads(shell(curls[5], job_id))["error"] == "conflict"  # it had ended
        assert shell(curls[6], job_id) == "204\n"
        python_blocks = re.findall(r"```python\n(.*?)```", section, re.S)
        assert len(python_blocks) == 2
        for block in python_blocks:
            proc = subprocess.run(
                [sys.executable, "-c", f"GATEWAY = {gateway.base!r}\n{block}"],
                capture_output=True,
                timeout=60,
            )
            assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout.decode().splitlines()[-1] == "succeeded"
        (cli,) = [block for block in blocks if "sockexec-client jobs" in block]
        assert shell(cli) == "exit 5\nhi\n"


def test_tasks_monitor_callbacks_and_tokens_examples(broker: Broker, tmp_path: Path) -> None:
    require_tool("curl")
    section = _section("Tasks, monitors, callbacks and scoped tokens")
    curls = [
        line
        for block in _shell_blocks(section)
        for line in block.splitlines()
        if line.startswith("curl ")
    ]
    assert len(curls) == 3
    verify, watch = re.findall(r"```python\n(.*?)```", section, re.S)
    tokens = section.split("```\nops-full-access", 1)[1].split("```", 1)[0]
    tokens = "ops-full-access" + tokens
    with GatewayProcess(broker.path, "--data-dir", str(tmp_path / "data")) as gateway:

        def shell(line: str, job_id: str = "") -> str:
            command = line.replace("http://127.0.0.1:8080", gateway.base).replace("ID", job_id)
            proc = subprocess.run(["bash", "-c", command], capture_output=True, timeout=60)
            assert proc.returncode == 0, (line, proc.stderr)
            return proc.stdout.decode()

        job_id = json.loads(shell(curls[0]))["id"]
        frames = [json.loads(line) for line in shell(curls[1], job_id).splitlines()]
        printed = "".join(frame.get("data", "") for frame in frames)  # in 1 or more frames
        assert printed == "[1/2] compile\nbuilt\n", frames
        assert frames[-1]["type"] == "exit" and frames[-1]["state"] == "succeeded", frames
        ended = json.loads(shell(curls[2], job_id))
        steps = {step["name"]: step["state"] for step in ended["steps"]}
        assert steps == {"build": "succeeded", "test": "cancelled", "ship": "skipped"}
        proc = subprocess.run(
            [sys.executable, "-c", f"GATEWAY = {gateway.base!r}\n{watch}"],
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout.decode() == "failed 1\n"
    import hashlib
    import hmac
    import time

    namespace: dict[str, object] = {}
    exec(verify, namespace)
    body, stamp = b'{"id": "x"}', str(int(time.time()))
    mac = hmac.new(b"k", stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    headers = {"X-Sockexec-Timestamp": stamp, "X-Sockexec-Signature": "sha256=" + mac}
    verified = namespace["verified"]
    assert verified(b"k", headers, body) and not verified(b"k", headers, body + b" ")  # type: ignore[operator]
    from sockexec_py.gateway.auth import parse_tokens

    parsed = parse_tokens(tokens.encode(), "README")
    assert [sorted(t.principal.actions) for t in parsed][1] == ["monitor", "run", "status"]
