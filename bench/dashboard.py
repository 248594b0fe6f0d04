"""The dashboard's targets (issue 17), measured against a real broker, gateway and
headless chromium.

    python -m bench.dashboard [--history N] [--output-bytes N] [--loads N] [--json FILE]

(a) Server time of the jobs list (``GET /``, the first page, 50 rows) with a history
    of ``--history`` finished jobs (1,000,000; built straight into the store's schema
    by :func:`bench.jobs_history.build_history`, cached under ``--cache``): p50/p99 of the
    gateway's own ``Server-Timing`` and of the whole request seen by a client, for
    the first page, a state filter, a name filter and a page deep in the history
    (target: <= 50 ms).
(b) First paint of that page in headless chromium: the median over ``--loads``
    navigations (10) of the Paint Timing's first-contentful-paint, with the
    Navigation Timing's response start and DOM content loaded (target: <= 300 ms).
(c) A job printing ``--output-bytes`` (10 MiB) of coloured lines, followed from its
    first byte by its page: the DOM size when it ended (elements, lines in the
    output pane, characters kept), the time until the page had it all, and the
    longest gap between two ticks of a 50 ms timer in the page (how long the page
    stayed unresponsive at worst).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from bench.jobs_common import Row, quantile, report
from bench.jobs_history import add_history_options, build_history
from sockexec_py.testing import BrokerProcess, GatewayProcess
from sockexec_py.testing.browser import chromium

#: Navigation and Paint Timing of the page just loaded, in ms from its start.
_TIMINGS = """
const nav = performance.getEntriesByType('navigation')[0];
const fcp = performance.getEntriesByName('first-contentful-paint')[0];
return {fcp: fcp ? fcp.startTime : null, response_start: nav.responseStart,
        dom_content_loaded: nav.domContentLoadedEventEnd, load: nav.loadEventEnd,
        server: nav.serverTiming.map(t => t.duration)[0] ?? null};
"""
#: A 50 ms timer in the page, recording the longest gap between its ticks.
_TICKER = """
window.benchGap = 0; let last = performance.now();
setInterval(() => { const now = performance.now();
  window.benchGap = Math.max(window.benchGap, now - last - 50); last = now; }, 50);
"""
_DOM = """
const output = document.getElementById('output');
return {elements: document.getElementsByTagName('*').length,
        output_lines: output.childElementCount, output_chars: output.textContent.length,
        gap_ms: window.benchGap, note: document.getElementById('output-status').textContent};
"""


def _get(port: int, path: str) -> tuple[float, float]:
    """(client ms, server ms) of one GET on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    began = time.perf_counter()
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    client = (time.perf_counter() - began) * 1000
    if response.status != 200:
        raise RuntimeError(f"GET {path}: {response.status}")
    timing = response.getheader("server-timing") or "app;dur=nan"
    return client, float(timing.partition("dur=")[2])


def bench_server(port: int, requests: int) -> tuple[list[Row], dict[str, Any]]:
    # A page deep in the history: follow the cursor a few pages down.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/v1/jobs?limit=1000&state=succeeded")
    cursor = json.loads(conn.getresponse().read())["next_cursor"]
    conn.close()
    pages = {
        "first page": "/",
        "state=failed": "/?state=failed",
        "name=script-7": "/?name=script-7",
        "page 2 of succeeded": f"/?state=succeeded&cursor={cursor}",
    }
    for path in pages.values():  # warm: caches and reader pools as in service
        for _ in range(20):
            _get(port, path)
    rows, figures = [], {}
    for label, path in pages.items():
        samples = [_get(port, path) for _ in range(requests)]
        server = [s for _, s in samples]
        client = [c for c, _ in samples]
        figures[label] = {
            "server_p50_ms": statistics.median(server),
            "server_p99_ms": quantile(server, 0.99),
            "client_p50_ms": statistics.median(client),
            "client_p99_ms": quantile(client, 0.99),
        }
        p99 = figures[label]["server_p99_ms"]
        rows.append(
            Row(
                f"(a) list {label}: server p50 / p99 (client p99)",
                f"{figures[label]['server_p50_ms']:.1f} / {p99:.1f} ms "
                f"({figures[label]['client_p99_ms']:.1f})",
                "<= 50 ms",
                p99 <= 50,
            )
        )
    return rows, figures


def bench_paint(driver: WebDriver, base: str, loads: int) -> tuple[list[Row], dict[str, Any]]:
    samples = []
    for number in range(loads + 1):
        driver.get(base + "/")
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script(
                "return performance.getEntriesByName('first-contentful-paint').length"
            )
        )
        timings = driver.execute_script(_TIMINGS)
        if number:  # the first load opens the browser's connection and caches
            samples.append(timings)
    figures = {
        key: statistics.median(s[key] for s in samples)
        for key in ("fcp", "response_start", "dom_content_loaded", "load", "server")
    }
    figures["fcp_max"] = max(s["fcp"] for s in samples)
    rows = [
        Row(
            "(b) first contentful paint, median (max)",
            f"{figures['fcp']:.0f} ms ({figures['fcp_max']:.0f})",
            "<= 300 ms",
            figures["fcp"] <= 300,
        ),
        Row(
            "(b) response start / DOM loaded, median",
            f"{figures['response_start']:.0f} / {figures['dom_content_loaded']:.0f} ms",
        ),
    ]
    return rows, figures


def bench_output(
    driver: WebDriver, gateway: GatewayProcess, size: int
) -> tuple[list[Row], dict[str, Any]]:
    line = "\x1b[32mok\x1b[0m step of a long build, with \x1b[1msome\x1b[0m text"
    script = f"sleep 1; yes '{line}' | head -c {size}"
    status, _, body = gateway.request("POST", "/v1/jobs", {"argv": ["sh", "-c", script]})
    assert status == 202, body
    job_id = json.loads(body)["id"]
    began = time.monotonic()
    driver.get(f"{gateway.base}/jobs/{job_id}")
    driver.execute_script(_TICKER)
    WebDriverWait(driver, 300, poll_frequency=0.2).until(
        lambda d: "Output complete" in d.find_element(By.ID, "output-status").text
    )
    seconds = time.monotonic() - began
    figures = driver.execute_script(_DOM)
    driver.get("about:blank")
    gateway.request("DELETE", f"/v1/jobs/{job_id}")  # the cached history stays as built
    figures.update(bytes=size, seconds_to_complete=seconds)
    rows = [
        Row(
            f"(c) {size / (1 << 20):.0f} MiB of output: DOM elements / output lines",
            f"{figures['elements']} / {figures['output_lines']} "
            f"({figures['output_chars']:,} chars kept)",
            "bounded",
            figures["output_lines"] <= 2000,
        ),
        Row(
            "(c) longest stall of the page / time to the end",
            f"{figures['gap_ms']:.0f} ms / {seconds:.1f} s",
        ),
    ]
    return rows, figures


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=int, default=1_000_000, help="jobs in the history")
    parser.add_argument("--output-bytes", type=int, default=10 << 20, help="what (c)'s job prints")
    parser.add_argument("--requests", type=int, default=200, help="(a)'s GETs per page")
    parser.add_argument("--loads", type=int, default=10, help="(b)'s navigations")
    add_history_options(parser, "where the history is kept between runs (shared with bench.jobs)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench.dashboard") -> int:
    args = build_parser(prog).parse_args(argv)
    cache = args.cache / f"history-{args.history}"
    built = time.monotonic()
    build_history(cache, args.history)
    figures: dict[str, Any] = {"history": args.history, "history_seconds": time.monotonic() - built}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        work = Path(tmp)
        broker = BrokerProcess(work / "broker.sock", ["-t", "0"])
        try:
            keep = ("--jobs-keep", "3650d")  # the history is 30 days old: nothing is purged
            with GatewayProcess(broker.path, "--data-dir", str(cache), *keep) as gateway:
                more, figures["server"] = bench_server(gateway.port, args.requests)
                rows += more
                driver = chromium(work / "profile")
                try:
                    more, figures["paint"] = bench_paint(driver, gateway.base, args.loads)
                    rows += more
                    more, figures["output"] = bench_output(driver, gateway, args.output_bytes)
                    rows += more
                finally:
                    driver.quit()
        finally:
            broker.stop()
    return report(rows, figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
