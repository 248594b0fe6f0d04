"""Row 7: the one-shot of row 1 through the HTTP gateway (``POST /v1/exec``).

Sequential requests of ``true`` on one keep-alive connection, against the broker's
own sequential figure (row 1, measured just before when selected); then the same
through Hypercorn only (a gateway with ``--no-exec-lane``), to show what the
front door's exec lane gives in the same run.
"""

from __future__ import annotations

import http.client
import json
import time

from .client import BenchError
from .many import CpuMeter, cpu_text
from .measure import Context, Daemon, Row, ms, quantile

#: Issue 14's target: the gateway's rate over the broker's own (row 1).
TARGET = 0.75


def _rate(ctx: Context, port: int) -> tuple[float, list[float]]:
    """Requests per second on one keep-alive connection, and their latencies."""
    body = json.dumps({"argv": ["true"]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}

    def post() -> None:
        conn.request("POST", "/v1/exec", body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200 or json.loads(data).get("exitcode") != 0:
            raise BenchError(f"gateway answered {response.status}: {data[:200]!r}")

    try:
        for _ in range(20):
            post()
        latencies: list[float] = []
        start = time.perf_counter()
        deadline = start + ctx.config.seq_seconds
        while True:
            t0 = time.perf_counter()
            post()
            t1 = time.perf_counter()
            latencies.append(t1 - t0)
            if t1 >= deadline:
                break
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    latencies.sort()
    return len(latencies) / elapsed, latencies


def gateway_one_shot(ctx: Context, broker: Daemon, port: int, plain: int | None = None) -> Row:
    """Row 7: ``seq_seconds`` of requests to the gateway on 127.0.0.1:``port``, then
    as many to the one on ``plain`` (Hypercorn only), if given."""
    cpu = CpuMeter(broker)
    cpu.resume()
    rate, latencies = _rate(ctx, port)
    cpu.pause()
    shares = cpu.shares()
    reference = ctx.seq_rate
    ours = f"{rate:.0f} requests/s (p50 {ms(quantile(latencies, 0.5))})"
    data = {"rate": rate, "p50": quantile(latencies, 0.5), "runs": len(latencies), **shares}
    if plain is not None:
        plain_rate, plain_latencies = _rate(ctx, plain)
        ours += f"; Hypercorn only {plain_rate:.0f}/s ({rate / plain_rate:.2f}x)"
        data.update(plain_rate=plain_rate, plain_p50=quantile(plain_latencies, 0.5))
    return Row(
        "7",
        "HTTP gateway one-shot `true` (keep-alive)",
        ours=ours,
        limit=f"{reference:.0f} runs/s (broker direct, row 1)" if reference else "n/a",
        ratio=f"{rate / reference:.2f}x" if reference else "n/a",
        target=f">= {TARGET:.2f}x",
        result=("met" if rate / reference >= TARGET else "MISSED") if reference else "measured",
        cpu=cpu_text(shares),
        data=data,
    )
