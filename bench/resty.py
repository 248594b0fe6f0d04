"""lua-resty-exec's late closes (issue 18): ``python -m bench.resty``.

The real lua-resty-exec 3.0.3 in a real nginx (``sockexec_py.testing.resty``), 50
parallel one-shots at a time (``echo``, ``cat`` of a few KB, ``seq 1000``, as issue
18 names them), with the library's defaults: a close that reaches it more than 1 ms
after the exit pair is its fatal ``timeout``. Counted for our broker (the final send
and close in one io_uring call, the CPU offered first), for our broker without
io_uring (``sendmsg`` then ``close``), and — with ``--reference`` — for the C
sockexec; then once more for ours with ``timeout_fatal = false``, where the count
must be 0. The variants run in interleaved rounds, so a change in the machine's load
hits them alike. A count, not a timing: the row says how many requests of how many
failed, and what else ran on the machine (the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlencode

from sockexec_py.testing import BrokerProcess, wait_until
from sockexec_py.testing.resty import REFERENCE, RestyNginx, Site, missing

PARALLEL = 50
SEQ_1000 = b"".join(b"%d\n" % i for i in range(1, 1001))
TARGET = 0.001  # at most 0.1% with the library's defaults (issue 18)


def _one(nginx: RestyNginx, host: str | None, fatal: bool, i: int) -> str:
    """One request through /r/run: 'ok', or what went wrong."""
    if i % 3 == 0:
        argv, stdin, expected = ["echo", f"hello {i}"], None, f"hello {i}\n".encode()
    elif i % 3 == 1:
        stdin = random.Random(i).randbytes(2000 + 100 * i)
        argv, expected = ["cat"], stdin
    else:
        argv, stdin, expected = ["seq", "1000"], None, SEQ_1000
    params = [("a", a) for a in argv] + ([("fatal", "1")] if fatal else [])
    try:
        status, headers, body = nginx.request(f"/r/run?{urlencode(params)}", stdin, host, 30)
    except TimeoutError:
        return "no answer within 30 s"
    if status != 200:
        return f"HTTP {status}"
    error = headers.get("X-Error")
    if error:
        return f"error {unquote(error)}"
    ok = body == expected and headers.get("X-Exitcode") == "0"
    return "ok" if ok else "wrong output"


def _round(nginx: RestyNginx, host: str | None, fatal: bool) -> Counter[str]:
    barrier = threading.Barrier(PARALLEL, timeout=60)

    def released(i: int) -> str:
        barrier.wait()
        return _one(nginx, host, fatal, i)

    with ThreadPoolExecutor(PARALLEL) as pool:
        return Counter(pool.map(released, range(PARALLEL)))


def _c_daemon(workdir: Path) -> subprocess.Popen[bytes] | None:
    """The C sockexec, built by the reference script (None if it cannot be)."""
    binary = os.environ.get("SOCKEXEC_REF")
    if not binary:
        out = workdir / "c"
        build = subprocess.run(
            ["bash", str(REFERENCE / "build-sockexec.sh"), str(out)], capture_output=True
        )
        if build.returncode != 0:
            return None
        binary = str(out / "sockexec")
    path = workdir / "c.sock"
    proc = subprocess.Popen([binary, str(path)], stderr=subprocess.DEVNULL)
    wait_until(path.exists, 10, "the C sockexec")
    return proc


def measure(rounds: int, reference: bool, progress: Callable[[str], None]) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as name:
        workdir = Path(name)
        no_uring = dict(os.environ, SOCKEXEC_NO_URING="1")
        ours = BrokerProcess(workdir / "ours.sock")
        plain = BrokerProcess(workdir / "plain.sock", env=no_uring)
        c_proc = _c_daemon(workdir) if reference else None
        sites = [Site("ours.test", ours.path), Site("plain.test", plain.path)]
        if c_proc is not None:
            sites.append(Site("c.test", workdir / "c.sock"))
        nginx = RestyNginx(workdir / "nginx", sites)
        variants: list[tuple[str, str, bool]] = [
            ("ours", "ours.test", True),
            ("ours without io_uring", "plain.test", True),
            ("ours, timeout_fatal = false", "ours.test", False),
        ]
        if c_proc is not None:
            variants.append(("C sockexec 3.1.1", "c.test", True))
        counts: dict[str, Counter[str]] = {label: Counter() for label, _, _ in variants}
        loads = []
        try:
            for number in range(rounds):
                for label, host, fatal in variants:
                    counts[label].update(_round(nginx, host, fatal))
                loads.append(os.getloadavg()[0])
                if (number + 1) % 10 == 0:
                    progress(f"{number + 1}/{rounds} rounds")
        finally:
            nginx.stop()
            ours.stop()
            plain.stop()
            if c_proc is not None:
                c_proc.kill()
                c_proc.wait()
    rows = {}
    for label, counter in counts.items():
        total = sum(counter.values())
        failed = total - counter["ok"]
        rows[label] = {"requests": total, "failed": failed, "kinds": dict(counter)}
    return {"rows": rows, "load": [min(loads), max(loads)], "parallel": PARALLEL}


def render(result: dict[str, object]) -> str:
    rows = result["rows"]
    assert isinstance(rows, dict)
    lines = [
        "| daemon | lua-resty-exec | failed / requests | rate | target |",
        "|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        rate = row["failed"] / row["requests"] if row["requests"] else float("nan")
        fatal = "timeout_fatal = false" if "false" in label else "defaults"
        target = "0" if "false" in label else ("<= 0.1%" if label == "ours" else "-")
        met = ""
        if label == "ours":
            met = " (met)" if rate <= TARGET else " (MISSED)"
        elif "false" in label:
            met = " (met)" if row["failed"] == 0 else " (MISSED)"
        lines.append(
            f"| {label.split(',')[0]} | {fatal} | {row['failed']} / {row['requests']} | "
            f"{rate:.2%} | {target}{met} |"
        )
    load = result["load"]
    assert isinstance(load, tuple | list)
    low, high = load
    lines.append(
        f"\n{result['parallel']} parallel requests per round; load average {low:.2f}-{high:.2f}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resty", description=__doc__)
    parser.add_argument("--rounds", type=int, default=200, help="rounds of 50 (200)")
    parser.add_argument("--reference", action="store_true", help="also the C sockexec")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    problems = missing()
    if problems:
        sys.stderr.write("bench.resty: " + "; ".join(problems) + "\n")
        return 1
    started = time.monotonic()

    def progress(line: str) -> None:
        sys.stderr.write(f"{line}\n")

    result = measure(args.rounds, args.reference, progress)
    print(render(result))
    print(f"({time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
