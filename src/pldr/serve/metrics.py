"""Prometheus metrics of the server, in a registry of its own (so several apps in one
process, as in tests, do not collide): requests by status, tokens in and out, queue depth,
running slots, and histograms of time to first token and time per output token."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, waiting: Callable[[], int], running: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pldr_requests", "HTTP requests to /v1 by status code",
                                ["status"], registry=r)
        self.cancelled = Counter("pldr_requests_cancelled",
                                 "completion requests cancelled because the client left",
                                 registry=r)
        self.prompt_tokens = Counter("pldr_prompt_tokens", "prompt tokens received", registry=r)
        self.generated_tokens = Counter("pldr_generation_tokens", "tokens generated",
                                        registry=r)
        self.queue_depth = Gauge("pldr_queue_depth", "requests waiting for a slot", registry=r)
        self.queue_depth.set_function(waiting)
        self.running = Gauge("pldr_running_slots", "requests in a slot", registry=r)
        self.running.set_function(running)
        self.ttft = Histogram("pldr_time_to_first_token_seconds",
                              "time from arrival to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pldr_time_per_output_token_seconds",
                              "mean time between generated tokens of a request",
                              buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
