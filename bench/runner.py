"""The run: which daemons each group of measures needs, started and stopped around it.

Rows 1-5 share one broker (``-m 100 -t 600``) and, for rows 1-4, one C sockexec
with the same flags; row 6 gets a fresh broker with ``-m 1000`` (and a fresh C
sockexec); row 7 a broker behind the HTTP gateway; row 8 a broker with the run-as
policy. Our brokers and the gateway come from ``sockexec_py.testing`` (started as
users start them, from ``--broker-pythonpath``); the C sockexec from
:mod:`bench.reference`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from sockexec_py.testing import BrokerProcess, GatewayProcess, HarnessError

from . import gateway, roundtrips, runas, sessions, streaming
from .client import BenchError
from .config import MEASURES, REFERENCE_MEASURES, ROOT, Config
from .measure import Context, Row
from .reference import Reference, ReferenceDaemon, ReferenceError

Log = Callable[[str], None]


@contextlib.contextmanager
def profiled(profile_dir: Path | None, fmt: str, pid: int, name: str) -> Iterator[None]:
    """Record process ``pid`` with py-spy while the block runs (no-op without a dir)."""
    if profile_dir is None:
        yield
        return
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    ext = {"flamegraph": "svg", "speedscope": "json", "raw": "txt"}[fmt]
    out = profile_dir / f"{name}.{ext}"
    with open(profile_dir / f"{name}.py-spy.log", "wb") as log:
        record = ["record", "--pid", str(pid), "--rate", "250", "--format", fmt]
        proc = subprocess.Popen(
            [pyspy, *record, "--nonblocking", "-o", str(out)],
            stdout=log,
            stderr=log,
        )
    time.sleep(0.5)  # let py-spy attach before the measure starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Bench:
    """Runs the selected measures and collects the rows (and notes on the C side).

    Args:
        reference: the C sockexec to run rows 1-4 and 6 against, or ``None``.
        broker_pythonpath: the checkout whose ``python -m sockexec_py`` is measured.
        broker_args: flags added to every broker's (``-q``), and to the C sockexec's.
    """

    def __init__(
        self,
        config: Config,
        workdir: Path,
        only: set[str],
        profile_dir: Path | None,
        profile_format: str,
        log: Log,
        broker_pythonpath: Path = ROOT,
        broker_args: Sequence[str] = (),
        reference: Reference | None = None,
    ) -> None:
        self.ctx = Context(config, workdir, log, shutil.which("true") or "/bin/true")
        self.only = only
        self.profile_dir = profile_dir
        self.profile_format = profile_format
        self.log = log
        self.broker_pythonpath = broker_pythonpath
        self.broker_args = list(broker_args)
        self.reference = reference
        self.rows: dict[str, Row] = {}
        self.notes: list[str] = []

    def run(self) -> list[Row]:
        main = [k for k in ("1", "2", "3", "4", "5") if k in self.only]
        if main:
            with contextlib.ExitStack() as stack:
                broker = stack.enter_context(self._broker("broker", "-m", "100", "-t", "600"))
                ref = self._reference(stack, "sockexec-c", main, "-m", "100", "-t", "600")
                steps: dict[str, Callable[[], Row]] = {
                    "1": lambda: roundtrips.sequential(self.ctx, broker, ref),
                    "2": lambda: roundtrips.concurrent(self.ctx, broker, ref),
                    "3": lambda: streaming.stream(self.ctx, broker, ref),
                    "4": lambda: streaming.duplex(self.ctx, broker, ref),
                    "5": lambda: streaming.slow_reader(self.ctx, broker),
                }
                for key in main:
                    self._run_measure(key, steps[key], broker)
        if "6" in self.only:
            with contextlib.ExitStack() as stack:
                broker = stack.enter_context(
                    self._broker("broker-m1000", "-m", "1000", "-t", "120")
                )
                ref = self._reference(stack, "sockexec-c-m1000", ["6"], "-m", "1000", "-t", "120")
                self._run_measure("6", lambda: sessions.sessions(self.ctx, broker, ref), broker)
        if "7" in self.only:
            with self._broker("broker-gw", "-m", "100", "-t", "600") as broker:
                # PYTHONSAFEPATH: the gateway imports from --broker-pythonpath, not
                # from our working directory (python -m puts the cwd first).
                env = dict(os.environ, PYTHONSAFEPATH="1")
                with contextlib.ExitStack() as stack:
                    gw = stack.enter_context(
                        GatewayProcess(broker.path, pythonpath=self.broker_pythonpath, env=env)
                    )
                    self.log(f"gateway on port {gw.port}")
                    try:  # the same through Hypercorn only (a checkout without the lane: none)
                        plain: int | None = stack.enter_context(
                            GatewayProcess(
                                broker.path,
                                "--no-exec-lane",
                                pythonpath=self.broker_pythonpath,
                                env=env,
                            )
                        ).port
                    except HarnessError:
                        plain = None
                    self._run_measure(
                        "7",
                        lambda: gateway.gateway_one_shot(self.ctx, broker, gw.port, plain),
                        broker,
                    )
        if "8" in self.only:
            if os.geteuid() != 0:
                self.rows["8"] = runas.not_root_row()
            else:
                with runas.run_as_policy(self.ctx.workdir) as (policy, cwd):
                    args = ("-m", "100", "-t", "600", "--policy", str(policy))
                    with self._broker("broker-runas", *args) as broker:
                        self._run_measure(
                            "8", lambda: runas.run_as_cost(self.ctx, broker, cwd), broker
                        )
        return [self.rows.get(k) or Row(k, "(not selected)", result="skipped") for k in MEASURES]

    def _broker(self, name: str, *args: str) -> BrokerProcess:
        broker = BrokerProcess(
            self.ctx.workdir / f"{name}.sock",
            [*args, *self.broker_args],
            pythonpath=self.broker_pythonpath,
        )
        self.log(f"{name} pid {broker.pid} on {broker.path}")
        return broker

    def _reference(
        self, stack: contextlib.ExitStack, name: str, keys: Sequence[str], *args: str
    ) -> ReferenceDaemon | None:
        """The C sockexec for ``keys``, stopped when ``stack`` closes; ``None`` when
        it is off, not needed by these keys, or did not start (a note says why)."""
        if self.reference is None or self.reference.binary is None:
            return None
        if not set(keys) & set(REFERENCE_MEASURES) & self.only:
            return None
        try:
            daemon = ReferenceDaemon(
                self.reference.binary, self.ctx.workdir / f"{name}.sock", [*args, *self.broker_args]
            )
        except ReferenceError as exc:
            self.notes.append(f"C sockexec ({' '.join(args)}): not measured: {exc}")
            return None
        self.log(f"C sockexec pid {daemon.pid} on {daemon.path}")

        def stop() -> None:
            ended = daemon.stop()
            self.log(f"C sockexec ({' '.join(args)}) {ended}")
            if ended != "ended on SIGTERM":
                self.notes.append(f"C sockexec ({' '.join(args)}) {ended}.")

        stack.callback(stop)
        return daemon

    def _run_measure(self, key: str, measure: Callable[[], Row], broker: BrokerProcess) -> None:
        self.log(f"measure {key} ...")
        start = time.perf_counter()
        try:
            with profiled(self.profile_dir, self.profile_format, broker.pid, f"measure-{key}"):
                row = measure()
            broker.check_alive()
        except (BenchError, HarnessError, OSError) as exc:
            row = Row(key, f"measure {key}", ours=f"FAILED: {exc}", result="FAILED", ok=False)
        self.rows[key] = row
        self.log(f"measure {key}: {row.ours} ({time.perf_counter() - start:.1f} s)")
