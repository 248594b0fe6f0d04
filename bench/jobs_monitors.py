"""Issue 16's monitor row (part (a) of ``python -m bench.jobs_two``): a thousand
monitor WebSockets on raw sockets, each counting when every ``finished`` event
reached it. They are read by one epoll loop in a process of their own: as trio
tasks of the bench's process they cost more CPU than the gateway's sends to them
and their own lag was measured as the gateway's."""

from __future__ import annotations

import argparse
import base64
import json
import math
import multiprocessing
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from sockexec_py.testing import GatewayProcess

from .jobs_common import all_ended, quantile, row, stamp, submit_at_rate

#: Linux's SO_TIMESTAMPNS (the socket module does not name it): each read says when
#: its bytes reached the socket.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESTAMP_SPACE = socket.CMSG_SPACE(16)

#: Every monitor gets the same messages: each is decoded once, into what a monitor
#: keeps of it (the client's work is not what the bench measures).
_DECODED: dict[bytes, Decoded] = {}


@dataclass(frozen=True, slots=True)
class Decoded:
    """What a monitor keeps of a message: the ``finished`` events' jobs with their
    time (s), the last event id (0: none), ``ready``, overflows."""

    finished: tuple[tuple[str, float], ...]
    last_id: int
    ready: bool
    overflows: int


def decode(payload: bytes) -> Decoded:
    decoded = _DECODED.get(payload)
    if decoded is None:
        loaded = json.loads(payload)
        items = loaded if isinstance(loaded, list) else [loaded]
        ids = [item["id"] for item in items if "id" in item]
        decoded = _DECODED[payload] = Decoded(
            tuple((i["job"], stamp(i["time"])) for i in items if i["type"] == "finished"),
            ids[-1] if ids else 0,
            any(item["type"] == "ready" for item in items),
            sum(1 for item in items if item["type"] == "overflow"),
        )
    return decoded


def frame_size(head: bytes) -> int:
    """The whole size of the WebSocket frame that starts ``head`` (0: its header is
    not all there yet)."""
    if len(head) < 2:
        return 0
    length = head[1] & 0x7F
    if length < 126:
        return 2 + length
    if length == 126:
        return 4 + int.from_bytes(head[2:4], "big") if len(head) >= 4 else 0
    return 10 + int.from_bytes(head[2:10], "big") if len(head) >= 10 else 0


class Monitor:
    """One monitor connection on a raw non-blocking socket: the handshake, then
    frames parsed with the least work (only ``finished`` events are decoded)."""

    def __init__(self, port: int, query: str = "", stamps: bool = False) -> None:
        self.port = port
        self.query = query
        self.stamps = stamps
        self.finished: dict[str, float] = {}  # job id -> delay (s)
        #: job id -> delay (s) until its message was in this socket (the kernel's
        #: receive timestamp): the gateway's delivery without this process's lag. An
        #: upper bound: a segment that waits unread long enough is merged with the
        #: next, which gives both the later stamp.
        self.arrived: dict[str, float] = {}
        self.arrival = 0.0  # when the bytes being parsed came (0: unknown, use now)
        self.last_id = 0
        self.messages = 0
        self.ready = False
        self.overflows = 0
        self.buffer = bytearray()
        self.sock = self.connect()

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        key = base64.b64encode(os.urandom(16)).decode()
        params = [f"since={self.last_id}"] if self.last_id else []
        params += [self.query] if self.query else []
        target = "/v1/monitor" + ("?" + "&".join(params) if params else "")
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key}\r\n\r\n".encode()
        )
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(65536)
        del buffer[: buffer.index(b"\r\n\r\n") + 4]
        sock.setblocking(False)
        if self.stamps:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.buffer = buffer
        self._parse()  # the first messages may have come with the answer
        return sock

    def readable(self) -> bool:
        """Read what came; False once the gateway closed (then :meth:`connect` again)."""
        if self.stamps:
            return self._read_stamped()
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return True
        if not data:
            return False
        # The common case: one whole text message, parsed without the buffer.
        head = data[1] if not self.buffer and len(data) >= 4 and data[0] == 0x81 else 255
        if head < 126 and len(data) == 2 + head:
            self._message(data[2:])
            return True
        if head == 126 and len(data) == 4 + int.from_bytes(data[2:4], "big"):
            self._message(data[4:])
            return True
        self.buffer += data
        return self._parse()

    def _read_stamped(self) -> bool:
        """Read frame by frame, each with the kernel's time of its arrival. A TCP
        read is stamped with the arrival of the last segment it takes, so a read of
        two messages would date the first one as late as the second: the frame's
        header is peeked first and only that frame is read (two calls a message,
        which is why this is only done when asked)."""
        while True:
            try:
                if self.buffer:  # the rest of a frame begun in an earlier read
                    size = max(frame_size(bytes(self.buffer[:10])) - len(self.buffer), 0)
                else:
                    head = self.sock.recv(10, socket.MSG_PEEK)
                    if not head:
                        return False
                    size = frame_size(head)
                data, ancillary, _, _ = self.sock.recvmsg(size or 65536, _TIMESTAMP_SPACE)
            except BlockingIOError:
                return True
            if not data:
                return False
            for level, kind, value in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS) and len(value) >= 16:
                    seconds, nanoseconds = struct.unpack("qq", value[:16])
                    self.arrival = seconds + nanoseconds / 1e9
            self.buffer += data
            if not self._parse():
                return False
            self.arrival = 0.0

    def _parse(self) -> bool:
        """The whole frames in the buffer; False after a close frame."""
        buffer = self.buffer
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
                return False
            self._message(payload)
        return True

    def _message(self, payload: bytes) -> None:
        now = time.time()
        arrival = self.arrival or now
        self.messages += 1
        decoded = decode(payload)
        for job, at in decoded.finished:
            self.finished[job] = now - at
            self.arrived[job] = arrival - at
        if decoded.last_id:
            self.last_id = decoded.last_id
        self.ready = self.ready or decoded.ready
        self.overflows += decoded.overflows


def watch(port: int, count: int, query: str, control: Connection, stamps: bool = False) -> None:
    """The monitors' process: ``count`` monitors read by one epoll loop (so that the
    clients cost little next to the gateway they measure). Says ``ready`` once all
    are live; given the ids of the jobs, reads on until every monitor has their
    ``finished`` events (at most 30 s more) and answers the tally."""
    monitors = [Monitor(port, query, stamps) for _ in range(count)]
    poll = select.epoll()
    by_fd: dict[int, Monitor | None] = {control.fileno(): None}
    for monitor in monitors:
        by_fd[monitor.sock.fileno()] = monitor
    for fd in by_fd:
        poll.register(fd, select.EPOLLIN)
    announced = False
    wanted: set[str] | None = None
    deadline = math.inf
    while True:
        for fd, _ in poll.poll(0.1):
            watched = by_fd[fd]
            if watched is None:
                wanted = set(control.recv())
                deadline = time.monotonic() + 30
                poll.unregister(fd)
            elif not watched.readable():  # closed after an overflow: again with since
                poll.unregister(fd)
                del by_fd[fd]
                watched.sock.close()
                watched.sock = watched.connect()
                by_fd[watched.sock.fileno()] = watched
                poll.register(watched.sock.fileno(), select.EPOLLIN)
        if not announced and all(m.ready for m in monitors):
            announced = True
            control.send("ready")
        if wanted is None:
            continue
        complete = sum(
            1 for m in monitors if len(m.finished) >= len(wanted) and wanted <= set(m.finished)
        )
        if complete == len(monitors) or time.monotonic() > deadline:
            control.send(
                {
                    "complete": complete,
                    "delays": [d for m in monitors for d in m.finished.values()],
                    "arrivals": [d for m in monitors for d in m.arrived.values()],
                    "messages": sum(m.messages for m in monitors),
                    "overflows": sum(m.overflows for m in monitors),
                }
            )
            return


def bench_monitors(args: argparse.Namespace, socket_path: Path, data: Path) -> list[dict[str, Any]]:
    flags: tuple[str, ...] = ("--data-dir", str(data), "--jobs-max-running", "16")
    flags += ("--jobs-limit", "true=16")
    if args.pace is not None:
        flags += ("--monitor-pace", str(args.pace))
    with GatewayProcess(socket_path, *flags) as gateway:
        gateway.log_until("listening")  # its log is drained from here on
        ours, theirs = multiprocessing.Pipe()
        process = multiprocessing.get_context("fork").Process(
            target=watch,
            args=(gateway.port, args.monitors, args.query, theirs, args.stamps),
            daemon=True,
        )
        started = time.monotonic()
        process.start()
        try:
            if not ours.poll(120) or ours.recv() != "ready":
                raise SystemExit("bench: the monitors did not all connect")
            rss_idle = gateway.rss_kib()
            began = time.monotonic()
            ids = submit_at_rate(gateway.port, args.rate, args.seconds, {"argv": ["true"]})
            submitting = time.monotonic() - began
            all_ended(gateway.port, len(ids), 120)
            rss_kib = gateway.rss_kib()
            ours.send(ids)
            if not ours.poll(60):
                raise SystemExit("bench: the monitors' process did not answer")
            tally = ours.recv()
        finally:
            process.kill()
            process.join()
        elapsed = time.monotonic() - started
    complete, delays, messages = tally["complete"], tally["delays"], tally["messages"]
    arrivals = tally["arrivals"]  # a2 less the receivers' own lag on these 2 cores
    refused = int(args.rate * args.seconds) - len(ids)
    # Submits wait for the gateway's answers: a gateway busy with its monitors
    # answers late, and fewer jobs a second reach them than asked.
    achieved = len(ids) / max(submitting, args.seconds)
    p99 = quantile(delays, 0.99) * 1000
    rss = rss_kib / 1024
    rows = [
        row(
            "a1",
            f"monitors with every finished event ({len(ids)} jobs)",
            f"{complete}/{args.monitors}",
            "all",
            complete == args.monitors,
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
            f"{rss_idle / 1024:.0f} / {rss:.0f} MiB",
            "<= 200 MiB",
            rss <= 200,
        ),
        row(
            "a4",
            "monitor overflows (reconnected with since)",
            str(tally["overflows"]),
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
            f"{messages} ({messages / args.monitors:.0f})",
            "",
            None,
        ),
        row("a7", "run time", f"{elapsed:.1f} s", "", None),
    ]
    if args.stamps:
        rows.insert(
            2,
            row(
                "a2b",
                "its bytes in the sockets (kernel stamp) p50 / p99",
                f"{quantile(arrivals, 0.5) * 1000:.1f} / {quantile(arrivals, 0.99) * 1000:.1f} ms",
                "",
                None,
            ),
        )
    return rows
