"""Prometheus metrics of one node (text exposition format via prometheus_client).

Each app gets its own ``CollectorRegistry`` rather than the process-wide default, so several
nodes (tests, benchmarks) can live in one process without clashing series. Gauges that mirror
live state (queue depth, running sequences, evidence kept) are read at scrape time instead of
being updated on every change, so they can never drift from the engine and the store.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Decode runs at ~5-200 tokens/s: first tokens from ~10 ms (tiny prompt, idle node) to seconds
# (long prompt behind a queue); whole answers up to minutes.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# The status page's live token rate: long enough to smooth over a batch step or an answer that
# lands all at once (the sidecar counts relayed tokens when an answer is complete), short enough
# that it still says "now".
TOKEN_RATE_WINDOW_S = 10


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("proofmesh_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("proofmesh_request_latency_seconds", "HTTP request latency (streams: until the last byte)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("proofmesh_prompt_tokens", "Prompt tokens of answered requests", ["model"], registry=r)
        self.completion_tokens = Counter("proofmesh_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("proofmesh_time_to_first_token_seconds", "From submission to the first token (queue wait + prefill)",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.receipts_signed = Counter("proofmesh_receipts_signed", "Answers signed and their evidence stored", ["model"], registry=r)
        self.receipt_lookups = Counter("proofmesh_receipt_lookups", "GET /v1/receipts/{id} by result", ["result"], registry=r)
        self.queue_depth = Gauge("proofmesh_queue_depth", "Requests waiting for a batch slot", ["model"], registry=r)
        self.running = Gauge("proofmesh_running_sequences", "Sequences in the running batch", ["model"], registry=r)
        self.evidence_answers = Gauge("proofmesh_evidence_answers", "Answer files retained for audit", registry=r)
        self.evidence_bytes = Gauge("proofmesh_evidence_bytes", "Bytes the retained answer files take", registry=r)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_answer(self, model: str, prompt_tokens: int, completion_tokens: int, ttft: float) -> None:
        """One signed choice: its tokens, its time to first token, its receipt."""
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.completion_tokens.labels(model).inc(completion_tokens)
        self.ttft.labels(model).observe(ttft)
        self.receipts_signed.labels(model).inc()

    def render(self, engines: Iterable[tuple[str, int, int]], evidence: tuple[int, int]) -> bytes:
        """The exposition text, with live gauges read now: ``engines`` yields (model, queue
        depth, running), ``evidence`` is (answers kept, bytes)."""
        for model, queue_depth, running in engines:
            self.queue_depth.labels(model).set(queue_depth)
            self.running.labels(model).set(running)
        self.evidence_answers.set(evidence[0])
        self.evidence_bytes.set(evidence[1])
        return generate_latest(self.registry)


class TokenRate:
    """Tokens per second over the last ``window_s`` seconds, for the status page: one counter per
    whole second, so it holds at most ``window_s + 1`` numbers whatever the traffic, and adding
    a token is one comparison. Prometheus needs none of this (it derives rates from the
    ``proofmesh_completion_tokens`` counter); a page that renders by itself does."""

    def __init__(self, window_s: int = TOKEN_RATE_WINDOW_S):
        self.window_s = window_s
        self._per_second: deque[list[int]] = deque()  # [unix second, tokens], oldest first

    def add(self, tokens: int, *, now: float | None = None) -> None:
        second = int(time.time() if now is None else now)
        if self._per_second and self._per_second[-1][0] == second:
            self._per_second[-1][1] += tokens
        else:
            self._per_second.append([second, tokens])
            self._forget_before(second - self.window_s)

    def per_second(self, *, now: float | None = None) -> float:
        """Tokens counted in the last ``window_s`` whole seconds before this one, divided by the window."""
        second = int(time.time() if now is None else now)
        self._forget_before(second - self.window_s)
        return sum(tokens for at, tokens in self._per_second if at < second) / self.window_s

    def _forget_before(self, second: int) -> None:
        while self._per_second and self._per_second[0][0] < second:
            self._per_second.popleft()
