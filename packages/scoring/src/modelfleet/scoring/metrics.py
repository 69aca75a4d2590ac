"""Request counters and a latency histogram, as Prometheus text and as a dict for telemetry.

Hand-written rather than prometheus_client: recording one request must cost
well under a microsecond on the hot path, and the exposition format is tiny.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Any

# seconds; fine-grained at the low end where fast models live
BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class ScoringMetrics:
    """Counters for /score: requests by status, errors, latency histogram, active version."""

    def __init__(self) -> None:
        self.requests: dict[int, int] = {}
        self.errors = 0
        self.rejected = 0
        self.bucket_counts = [0] * (len(BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.model_name = ""
        self.model_version = ""
        self.swaps = 0
        self.load_failures = 0
        #: models moved from inline (event loop) scoring to the thread pool after slow calls
        self.moved_to_pool = 0
        self._lock = threading.Lock()

    def observe(self, status: int, seconds: float) -> None:
        # called from the event loop thread only; no lock on the hot path
        self.requests[status] = self.requests.get(status, 0) + 1
        if status >= 500:
            self.errors += 1
        self.bucket_counts[bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def set_active(self, name: str, version: str) -> None:
        with self._lock:
            if self.model_version or self.model_name:
                self.swaps += 1
            self.model_name = name
            self.model_version = version

    def snapshot(self) -> dict[str, Any]:
        """Counters as plain data (the telemetry record's source)."""
        return {
            "requests": sum(self.requests.values()),
            "requests_by_status": dict(self.requests),
            "errors": self.errors,
            "rejected": self.rejected,
            "latency_buckets": list(BUCKETS),
            "latency_counts": list(self.bucket_counts),
            "latency_sum_s": self.latency_sum,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "swaps": self.swaps,
            "load_failures": self.load_failures,
            "moved_to_pool": self.moved_to_pool,
        }

    def prometheus(self, inflight: int = 0, inline: bool | None = None) -> str:
        """The Prometheus text exposition format (version 0.0.4).

        `inline`: whether the active model is scored on the event loop (None: no model).
        """
        lines = [
            "# HELP modelfleet_score_requests_total Scoring requests by HTTP status.",
            "# TYPE modelfleet_score_requests_total counter",
        ]
        for status, count in sorted(self.requests.items()):
            lines.append(f'modelfleet_score_requests_total{{code="{status}"}} {count}')
        lines += [
            "# HELP modelfleet_score_errors_total Scoring requests answered with a 5xx status.",
            "# TYPE modelfleet_score_errors_total counter",
            f"modelfleet_score_errors_total {self.errors}",
            "# HELP modelfleet_score_rejected_total Requests refused because the queue was full.",
            "# TYPE modelfleet_score_rejected_total counter",
            f"modelfleet_score_rejected_total {self.rejected}",
            "# HELP modelfleet_score_latency_seconds Time from request parsed to response ready.",
            "# TYPE modelfleet_score_latency_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip(BUCKETS, self.bucket_counts, strict=False):
            cumulative += count
            lines.append(f'modelfleet_score_latency_seconds_bucket{{le="{bound}"}} {cumulative}')
        cumulative += self.bucket_counts[-1]
        lines += [
            f'modelfleet_score_latency_seconds_bucket{{le="+Inf"}} {cumulative}',
            f"modelfleet_score_latency_seconds_sum {self.latency_sum}",
            f"modelfleet_score_latency_seconds_count {self.latency_count}",
            "# HELP modelfleet_inflight_requests Scoring requests being processed.",
            "# TYPE modelfleet_inflight_requests gauge",
            f"modelfleet_inflight_requests {inflight}",
            "# HELP modelfleet_model_swaps_total Successful hot-swaps to a new model version.",
            "# TYPE modelfleet_model_swaps_total counter",
            f"modelfleet_model_swaps_total {self.swaps}",
            "# HELP modelfleet_model_load_failures_total Model versions refused at load or warm-up.",
            "# TYPE modelfleet_model_load_failures_total counter",
            f"modelfleet_model_load_failures_total {self.load_failures}",
            "# HELP modelfleet_model_moved_to_pool_total Models moved from inline scoring to the thread pool after slow calls.",
            "# TYPE modelfleet_model_moved_to_pool_total counter",
            f"modelfleet_model_moved_to_pool_total {self.moved_to_pool}",
            "# HELP modelfleet_active_model The model version serving traffic.",
            "# TYPE modelfleet_active_model gauge",
        ]
        labels = ""
        if self.model_version or self.model_name:
            labels = f'{{name="{_label(self.model_name)}",version="{_label(self.model_version)}"}}'
            lines.append(f"modelfleet_active_model{labels} 1")
        lines += [
            "# HELP modelfleet_model_inline 1 when the active model is scored inline on the event loop, 0 in the thread pool.",
            "# TYPE modelfleet_model_inline gauge",
        ]
        if inline is not None:
            lines.append(f"modelfleet_model_inline{labels} {int(inline)}")
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
