"""Prometheus metrics of a serving engine, named as vLLM names its own (prefix ``lavi:``).

Gauges read at scrape time: ``lavi:num_requests_running``, ``lavi:num_requests_waiting``,
``lavi:num_slots``, ``lavi:slots_usage_perc``, ``lavi:generation_tokens_per_second`` (last 10 s).
Counters: ``lavi:prompt_tokens_total``, ``lavi:generation_tokens_total``, ``lavi:request_success_total``
(label ``finished_reason``), ``lavi:request_rejected_total`` (429s). Histograms:
``lavi:time_to_first_token_seconds``, ``lavi:e2e_request_latency_seconds``.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        for name, value, doc in (("num_requests_running", s["running"], "Requests in decode slots."),
                                 ("num_requests_waiting", s["waiting"], "Requests waiting for a slot."),
                                 ("num_slots", s["slots"], "Decode slots."),
                                 ("slots_usage_perc", s["running"] / max(s["slots"], 1), "Slots in use (0-1)."),
                                 ("generation_tokens_per_second", self._rate(), "Tokens generated, last 10 s.")):
            yield GaugeMetricFamily(f"lavi:{name}", doc, value=value)
        for name, key, doc in (("prompt_tokens", "prompt_tokens", "Prompt tokens prefilled."),
                               ("generation_tokens", "generation_tokens", "Tokens generated."),
                               ("request_rejected", "rejected", "Requests refused with a full queue.")):
            yield CounterMetricFamily(f"lavi:{name}", doc, value=s.get(key, 0))
        done = CounterMetricFamily("lavi:request_success", "Finished requests.", labels=["finished_reason"])
        for reason in ("stop", "length", "cancelled", "error"):
            done.add_metric([reason], s.get(f"finished_{reason}", 0))
        yield done

    def _rate(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        recent = [n for t, n in list(self.engine.history) if t > now - window]
        return sum(recent) / window


class Metrics:
    """``observe(request)`` once a request finished; ``render()`` -> (Prometheus text, content type)."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram("lavi:time_to_first_token_seconds", "Time to first token.", buckets=BUCKETS,
                              registry=self.registry)
        self.latency = Histogram("lavi:e2e_request_latency_seconds", "Request latency.", buckets=BUCKETS,
                                 registry=self.registry)

    def observe(self, request) -> None:
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.submitted)
        if request.finished_at is not None:
            self.latency.observe(request.finished_at - request.submitted)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), "text/plain; version=0.0.4; charset=utf-8"
