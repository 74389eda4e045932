"""Prometheus metrics. Each app owns its registry, so several servers can live in one process (tests).

Engine gauges are read at scrape time from the engine's scheduler and block manager: plain length
reads, safe enough across threads for monitoring, and no hook in the runtime is needed.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        self.engine = engine
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lmdepot_requests", "HTTP API requests by route and status code",
                                ["route", "status"], registry=r)
        self.finished = Counter("lmdepot_request_finished", "Generations by finish reason",
                                ["finish_reason"], registry=r)
        self.running = Gauge("lmdepot_num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("lmdepot_num_requests_waiting", "Sequences queued in the engine", registry=r)
        self.inflight = Gauge("lmdepot_num_requests_inflight", "Requests admitted by the server", registry=r)
        self.kv_usage = Gauge("lmdepot_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.kv_used = Gauge("lmdepot_kv_blocks_used", "KV blocks in use", registry=r)
        self.kv_total = Gauge("lmdepot_kv_blocks_total", "KV blocks in the cache", registry=r)
        self.ttft = Histogram("lmdepot_time_to_first_token_seconds", "Time from request to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lmdepot_inter_token_latency_seconds", "Time between two tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("lmdepot_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("lmdepot_generation_tokens", "Tokens generated", registry=r)
        self.rejected = Counter("lmdepot_requests_rejected", "Requests refused because the queue was full",
                                registry=r)

    def render(self, inflight: int) -> bytes:
        e = self.engine
        self.running.set(len(e.scheduler.running))
        self.waiting.set(len(e.scheduler.waiting))
        self.inflight.set(inflight)
        total, free = e.bm.num_blocks, e.bm.num_free
        self.kv_total.set(total)
        self.kv_used.set(total - free)
        self.kv_usage.set((total - free) / total if total else 0.0)
        return generate_latest(self.registry)


class RequestTimer:
    """Per-request token timing: TTFT on the first token, inter-token latency after that."""

    def __init__(self, metrics: Metrics, start: float | None = None):
        self.m, self.start, self.last = metrics, start or time.perf_counter(), None

    def token(self) -> None:
        self.tokens(1)

    def tokens(self, n: int) -> None:
        """n tokens arrived together: one latency observation (the gap to the previous arrival), n counted."""
        if n <= 0:
            return
        t = time.perf_counter()
        if self.last is None:
            self.m.ttft.observe(t - self.start)
        else:
            self.m.itl.observe(t - self.last)
        self.last = t
        self.m.generation_tokens.inc(n)
