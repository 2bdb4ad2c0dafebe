"""Prometheus metrics of the service, on a private ``CollectorRegistry`` (several apps per process
— tests, benchmarks — never clash).

Exposed (``GET /metrics``, Prometheus text format)::

    reloop_requests_total{endpoint, status}        counter
    reloop_request_seconds{endpoint}               histogram (latency of the whole request)
    reloop_impressions_total / reloop_feedback_total / reloop_feedback_duplicates_total
    reloop_quarantined_total{endpoint}             counter
    reloop_model_version                           gauge
    reloop_model_swaps_total                       counter
    reloop_refused_versions_total                  counter (versions CURRENT named that were refused)
    reloop_internal_errors_total{endpoint}         counter (500 answers; logged by ``guard.ErrorLog``)
    reloop_retrains_total{outcome}                 counter
    reloop_memory_written / reloop_memory_bytes    gauges (error memory fill; 0 without a memory)
    reloop_rolling_auc / reloop_rolling_logloss    gauges over the last N feedback events
    reloop_rolling_events                          gauge (events in the window)
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from reloop.protocol.metrics import auc, logloss

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RollingWindow:
    """Labels and served predictions of the last ``size`` feedback events."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._y: deque[int] = deque(maxlen=size)
        self._p: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, labels, probs) -> None:
        with self._lock:
            self._y.extend(int(y) for y in labels)
            self._p.extend(float(p) for p in probs)

    def __len__(self) -> int:
        return len(self._y)

    def scores(self) -> tuple[float, float]:
        """(AUC, LogLoss) over the window; NaN when empty (AUC also NaN with a single class)."""
        with self._lock:
            y = np.fromiter(self._y, dtype=np.float64, count=len(self._y))
            p = np.fromiter(self._p, dtype=np.float64, count=len(self._p))
        if len(y) == 0:
            return float("nan"), float("nan")
        return auc(y, p), logloss(y, p)


class ServiceMetrics:
    def __init__(self, window: int = 10000) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "reloop_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "reloop_request_seconds", "Request latency by endpoint", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.impressions = Counter("reloop_impressions", "Impressions predicted and logged", registry=r)
        self.feedback = Counter("reloop_feedback", "Feedback events logged", registry=r)
        self.duplicates = Counter("reloop_feedback_duplicates", "Duplicate feedback events ignored", registry=r)
        self.quarantined = Counter("reloop_quarantined", "Malformed inputs quarantined", ["endpoint"], registry=r)
        self.version = Gauge("reloop_model_version", "Model version serving", registry=r)
        self.swaps = Counter("reloop_model_swaps", "Hot swaps to a newly published version", registry=r)
        self.refused = Counter(
            "reloop_refused_versions", "Published versions refused (unreadable or another model)", registry=r
        )
        self.internal_errors = Counter(
            "reloop_internal_errors", "Requests answered 500 (internal errors)", ["endpoint"], registry=r
        )
        self.retrains = Counter("reloop_retrains", "Retrains run by this process, by outcome", ["outcome"], registry=r)
        self.memory_written = Gauge(
            "reloop_memory_written", "Samples written to the error memory since its last reset", registry=r
        )
        self.memory_bytes = Gauge("reloop_memory_bytes", "Bytes of the error memory state", registry=r)
        self.rolling_auc = Gauge(
            "reloop_rolling_auc", "AUC of served predictions over the last N feedback events", registry=r
        )
        self.rolling_logloss = Gauge(
            "reloop_rolling_logloss", "LogLoss of served predictions over the last N feedback events", registry=r
        )
        self.rolling_events = Gauge("reloop_rolling_events", "Feedback events in the rolling window", registry=r)
        self.window = RollingWindow(window)

    def render(self, memory=None) -> bytes:
        """Refresh the computed gauges and return the Prometheus text exposition."""
        if memory is not None:
            self.memory_written.set(memory.n_written)
            self.memory_bytes.set(memory.nbytes)
        a, ll = self.window.scores()
        self.rolling_auc.set(a)
        self.rolling_logloss.set(ll)
        self.rolling_events.set(len(self.window))
        return generate_latest(self.registry)
