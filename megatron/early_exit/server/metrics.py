"""Prometheus metrics of the generation server (``GET /metrics``), one registry per app.

    m = ServerMetrics(num_layers=12, service=service)
    m.request("completions", 200); m.first_token(0.05); m.on_step(updates, seconds)
    body, content_type = m.render()

Metrics: ``ee_requests_total{endpoint,status}``, ``ee_generated_tokens_total``,
``ee_tokens_per_second`` (over the last ``window_s`` seconds), ``ee_queue_length``,
``ee_running_rows``, ``ee_time_to_first_token_seconds``, ``ee_request_seconds`` and
``ee_exit_layer`` (a histogram with one bucket per layer: which layer produced each token).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

__all__ = ["ServerMetrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self, num_layers: int, service=None, window_s: float = 10.0):
        self.registry = r = CollectorRegistry()
        self.window_s = window_s
        self._recent = deque()  # (time, tokens) of recent steps
        self._lock = threading.Lock()
        self.requests = Counter("ee_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.tokens = Counter("ee_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("ee_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("ee_request_seconds", "Request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.exit_layer = Histogram("ee_exit_layer", "Layer whose head produced each token",
                                    buckets=[float(k) for k in range(1, num_layers + 1)],
                                    registry=r)
        Gauge("ee_tokens_per_second", f"Tokens/s over the last {window_s:g} s",
              registry=r).set_function(self.tokens_per_second)
        if service is not None:
            Gauge("ee_queue_length", "Requests waiting for a row",
                  registry=r).set_function(lambda: service.num_waiting)
            Gauge("ee_running_rows", "Requests holding a KV row",
                  registry=r).set_function(lambda: service.num_running)

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_step(self, updates, seconds: float) -> None:
        """Called on the engine loop after each step."""
        n = 0
        for u in updates:
            n += len(u.tokens)
            for layer in u.exit_layers:
                self.exit_layer.observe(layer)
        self.tokens.inc(n)
        with self._lock:
            now = time.monotonic()
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        with self._lock:
            now = time.monotonic()
            return sum(n for t, n in self._recent if t >= now - self.window_s) / self.window_s

    def render(self):
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
