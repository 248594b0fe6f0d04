"""Issue 16's monitor row (part (a) of ``python -m bench.jobs_two``): a thousand
monitor WebSockets on raw sockets, each counting when every ``finished`` event
reached it."""

from __future__ import annotations

import argparse
import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import trio

from sockexec_py.testing import GatewayProcess

from .jobs_common import all_ended, quantile, row, stamp, submit_at_rate


class Monitor:
    """One monitor connection on a raw socket: the handshake, then frames read with
    the least work (only ``finished`` events are decoded)."""

    def __init__(self, query: str = "") -> None:
        self.query = query
        self.finished: dict[str, float] = {}  # job id -> delay (s)
        self.last_id = 0
        self.messages = 0
        self.ready = trio.Event()
        self.overflows = 0

    async def run(self, port: int, stop: trio.Event) -> None:
        while not stop.is_set():
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            key = base64.b64encode(os.urandom(16)).decode()
            params = [f"since={self.last_id}"] if self.last_id else []
            params += [self.query] if self.query else []
            target = "/v1/monitor" + ("?" + "&".join(params) if params else "")
            await stream.send_all(
                f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Key: {key}\r\n\r\n".encode()
            )
            buffer = bytearray()
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive_some(65536)
            del buffer[: buffer.index(b"\r\n\r\n") + 4]
            async with stream:
                with trio.move_on_at(trio.current_time() + 1e9) as scope:
                    stop_task = scope
                    closed = await self._read(stream, buffer, stop, stop_task)
                if not closed:
                    return

    async def _read(
        self, stream: trio.SocketStream, buffer: bytearray, stop: trio.Event, scope: Any
    ) -> bool:
        """Read frames until the gateway closes (True) or ``stop`` (False)."""
        async with trio.open_nursery() as nursery:

            async def stopper() -> None:
                await stop.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(stopper)
            while True:
                while len(buffer) >= 2:
                    length, start = buffer[1] & 0x7F, 2
                    if length == 126:
                        if len(buffer) < 4:
                            break
                        length, start = int.from_bytes(buffer[2:4], "big"), 4
                    elif length == 127:
                        if len(buffer) < 10:
                            break
                        length, start = int.from_bytes(buffer[2:10], "big"), 10
                    if len(buffer) < start + length:
                        break
                    opcode = buffer[0] & 0x0F
                    payload = bytes(buffer[start : start + length])
                    del buffer[: start + length]
                    if opcode == 8:
                        nursery.cancel_scope.cancel()
                        return True
                    self._message(payload)
                data = await stream.receive_some(1 << 20)
                if not data:
                    nursery.cancel_scope.cancel()
                    return True
                buffer += data
        return False

    def _message(self, payload: bytes) -> None:
        now = time.time()
        self.messages += 1
        if payload.startswith(b"["):  # batch=1: an array of messages, decoded once
            for item in json.loads(payload):
                self._item(item, now)
        elif payload.startswith(b'{"id":'):
            self.last_id = int(payload[6 : payload.index(b",")])
            if b'"type":"finished"' in payload:
                event = json.loads(payload)
                self.finished[event["job"]] = now - stamp(event["time"])
        elif b'"ready"' in payload:
            self.ready.set()
        elif b'"overflow"' in payload:
            self.overflows += 1

    def _item(self, item: dict[str, Any], now: float) -> None:
        kind = item["type"]
        if "id" in item:
            self.last_id = item["id"]
            if kind == "finished":
                self.finished[item["job"]] = now - stamp(item["time"])
        elif kind == "ready":
            self.ready.set()
        elif kind == "overflow":
            self.overflows += 1


def bench_monitors(args: argparse.Namespace, socket_path: Path, data: Path) -> list[dict[str, Any]]:
    flags = ("--data-dir", str(data), "--jobs-max-running", "16", "--jobs-limit", "true=16")
    with GatewayProcess(socket_path, *flags) as gateway:
        gateway.log_until("listening")  # its log is drained from here on
        monitors = [Monitor(args.query) for _ in range(args.monitors)]
        ids: list[str] = []

        async def main() -> None:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for monitor in monitors:
                    nursery.start_soon(monitor.run, gateway.port, stop)
                for monitor in monitors:
                    await monitor.ready.wait()
                rss_idle = gateway.rss_kib()
                began = time.monotonic()
                ids.extend(
                    await trio.to_thread.run_sync(
                        submit_at_rate, gateway.port, args.rate, args.seconds, {"argv": ["true"]}
                    )
                )
                results["submitting"] = time.monotonic() - began
                await trio.to_thread.run_sync(all_ended, gateway.port, len(ids), 120)
                with trio.move_on_after(30):
                    for monitor in monitors:
                        while len(monitor.finished) < len(ids):
                            await trio.sleep(0.05)
                results["rss_idle"] = rss_idle
                results["rss"] = gateway.rss_kib()
                stop.set()

        results: dict[str, Any] = {}
        started = time.monotonic()
        trio.run(main)
        elapsed = time.monotonic() - started
    wanted = set(ids)
    complete = sum(1 for monitor in monitors if wanted <= set(monitor.finished))
    refused = int(args.rate * args.seconds) - len(ids)
    delays = [delay for monitor in monitors for delay in monitor.finished.values()]
    messages = sum(monitor.messages for monitor in monitors)
    # Submits wait for the gateway's answers: a gateway busy with its monitors
    # answers late, and fewer jobs a second reach them than asked.
    achieved = len(ids) / max(results["submitting"], args.seconds)
    p99 = quantile(delays, 0.99) * 1000
    rss = results["rss"] / 1024
    return [
        row(
            "a1",
            f"monitors with every finished event ({len(ids)} jobs)",
            f"{complete}/{len(monitors)}",
            "all",
            complete == len(monitors),
        ),
        row(
            "a2",
            "finished-event delivery p50 / p99",
            f"{quantile(delays, 0.5) * 1000:.1f} / {p99:.1f} ms",
            "p99 <= 50 ms",
            p99 <= 50,
        ),
        row(
            "a3",
            "gateway RSS idle / under load",
            f"{results['rss_idle'] / 1024:.0f} / {rss:.0f} MiB",
            "<= 200 MiB",
            rss <= 200,
        ),
        row(
            "a4",
            "monitor overflows (reconnected with since)",
            str(sum(m.overflows for m in monitors)),
            "",
            None,
        ),
        row(
            "a5", "submits that timed out (an overloaded gateway)", str(refused), "0", refused == 0
        ),
        row(
            "a5b",
            "jobs submitted per second (the rate the monitors saw)",
            f"{achieved:.0f} of {args.rate:g} asked",
            f">= {0.95 * args.rate:g}",
            achieved >= 0.95 * args.rate,
        ),
        row(
            "a6",
            "messages received by the monitors (all, per monitor)",
            f"{messages} ({messages / len(monitors):.0f})",
            "",
            None,
        ),
        row("a7", "run time", f"{elapsed:.1f} s", "", None),
    ]
