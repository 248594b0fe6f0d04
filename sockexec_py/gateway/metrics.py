"""Prometheus metrics of the gateway, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    """Requests by mode and status, running sessions, exit codes, durations, bytes;
    with jobs, jobs by state, queued jobs per name and run durations by end state."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sockexec_gateway_requests",
            "HTTP requests by mode (oneshot, ndjson, sse, websocket, other) and status.",
            ["mode", "status"],
            registry=self.registry,
        )
        self.lane_requests = Counter(
            "sockexec_gateway_exec_lane_requests",
            "POST /v1/exec requests answered by the front door's exec lane (the rest of "
            "the requests are answered through Hypercorn).",
            registry=self.registry,
        )
        self.running = Gauge(
            "sockexec_gateway_running_sessions",
            "Broker sessions currently open.",
            registry=self.registry,
        )
        self.exits = Counter(
            "sockexec_gateway_exits",
            "Program outcomes: exitcode N or termsig NAME.",
            ["outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "sockexec_gateway_session_seconds",
            "Duration of broker sessions.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.bytes_in = Counter(
            "sockexec_gateway_stdin_bytes", "Bytes sent to programs' stdin.", registry=self.registry
        )
        self.bytes_out = Counter(
            "sockexec_gateway_output_bytes",
            "Bytes programs wrote to stdout and stderr.",
            registry=self.registry,
        )
        self.jobs = Gauge(
            "sockexec_gateway_jobs",
            "Jobs in the store by state (read at each scrape).",
            ["state"],
            registry=self.registry,
        )
        self.queue_length = Gauge(
            "sockexec_gateway_job_queue_length",
            "Queued jobs per name (read at each scrape).",
            ["name"],
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "sockexec_gateway_job_run_seconds",
            "Run durations of finished jobs (start to end), by end state.",
            ["state"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400),
            registry=self.registry,
        )
        self.monitors = Gauge(
            "sockexec_gateway_monitors",
            "Monitors receiving live events (read at each scrape).",
            registry=self.registry,
        )
        self.monitor_overflows = Counter(
            "sockexec_gateway_monitor_overflows",
            "Monitors dropped because they fell --monitor-queue events behind.",
            registry=self.registry,
        )
        self.callbacks = Counter(
            "sockexec_gateway_callback_attempts",
            "Callback attempts by outcome (delivered, retry, failed).",
            ["outcome"],
            registry=self.registry,
        )
