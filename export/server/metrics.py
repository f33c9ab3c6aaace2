"""Prometheus metrics of the model server, in the text exposition format (0.0.4).

Served on the REST port at ``/monitoring/prometheus/metrics`` (TF Serving's path):

- ``tfrec_serving_requests_total{model,signature,api,protocol,code}``: requests by outcome;
- ``tfrec_serving_request_latency_seconds{model,signature,api,protocol}``: histogram;
- ``tfrec_serving_batch_size{model,signature}``: rows per batched model call (histogram);
- ``tfrec_serving_in_flight_requests``: requests being served now;
- ``tfrec_serving_model_versions{model,state}``: versions per state (AVAILABLE, END, ...).

A tiny self-contained registry (counters, gauges, histograms with labels), so the
server needs no client library.

Example::

    >>> m = ServingMetrics()
    >>> m.record_request("m", "serving_default", "predict", "grpc", "OK", 0.004)
    >>> 'tfrec_serving_requests_total{model="m",signature="serving_default",api="predict",protocol="grpc",code="OK"} 1' in m.render()
    True
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Callable, Optional, Sequence

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()):
        self.name, self.help, self.labelnames = name, help_text, tuple(labelnames)
        self._lock = threading.Lock()
        self._values = {}

    def _key(self, labels: Sequence[str]) -> tuple:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name} expects labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(v) for v in labels)

    def render(self) -> list:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        with self._lock:
            items = sorted(self._values.items())
        for labels, value in items:
            lines.extend(self._render_one(labels, value))
        return lines

    def _render_one(self, labels, value) -> list:
        return [f"{self.name}{_format_labels(self.labelnames, labels)} {_number(value)}"]


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def inc(self, labels: Sequence[str] = (), amount: float = 1.0):
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, labels: Sequence[str] = ()) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)


class Gauge(Counter):
    """A value that goes up and down; ``collect`` (optional) recomputes all values at render time."""

    kind = "gauge"

    def __init__(self, name, help_text, labelnames=(), collect: Optional[Callable[[], dict]] = None):
        super().__init__(name, help_text, labelnames)
        self._collect = collect

    def set(self, labels: Sequence[str], value: float):
        with self._lock:
            self._values[self._key(labels)] = value

    def render(self) -> list:
        if self._collect is not None:
            values = {self._key(k): v for k, v in self._collect().items()}
            with self._lock:
                self._values = values
        return super().render()


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name, help_text, labelnames=(), buckets: Sequence[float] = LATENCY_BUCKETS):
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(buckets))

    def observe(self, labels: Sequence[str], value: float):
        key = self._key(labels)
        with self._lock:
            counts, total = self._values.get(key, ([0] * (len(self.buckets) + 1), 0.0))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            self._values[key] = (counts, total + value)

    def count(self, labels: Sequence[str] = ()) -> int:
        with self._lock:
            counts, _ = self._values.get(self._key(labels), ([0], 0.0))
            return sum(counts)

    def counts_above(self, labels: Sequence[str], threshold: float) -> int:
        """How many observations were greater than ``threshold`` (a bucket bound)."""
        with self._lock:
            counts, _ = self._values.get(self._key(labels), ([0] * (len(self.buckets) + 1), 0.0))
            return sum(counts[bisect.bisect_right(self.buckets, threshold):])

    def _render_one(self, labels, value) -> list:
        counts, total = value
        lines, cumulative = [], 0
        for bound, count in zip(list(self.buckets) + [math.inf], counts):
            cumulative += count
            le = _format_labels(self.labelnames, labels, f'le="{_number(bound)}"')
            lines.append(f"{self.name}_bucket{le} {cumulative}")
        plain = _format_labels(self.labelnames, labels)
        lines.append(f"{self.name}_sum{plain} {_number(total)}")
        lines.append(f"{self.name}_count{plain} {cumulative}")
        return lines


class ServingMetrics:
    """The server's metrics; one instance per server (tests run several servers in a process).

    Args:
        version_states: optional callable returning ``{(model, state): count}`` at render time.
    """

    def __init__(self, version_states: Optional[Callable[[], dict]] = None):
        self.requests = Counter(
            "tfrec_serving_requests_total", "Requests by model, signature, API, protocol and status code.",
            ("model", "signature", "api", "protocol", "code"),
        )
        self.latency = Histogram(
            "tfrec_serving_request_latency_seconds", "Request latency inside the server.",
            ("model", "signature", "api", "protocol"), LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "tfrec_serving_batch_size", "Rows per batched model call.", ("model", "signature"), BATCH_SIZE_BUCKETS
        )
        self.in_flight = Gauge("tfrec_serving_in_flight_requests", "Requests being served now.")
        self.model_versions = Gauge(
            "tfrec_serving_model_versions", "Model versions per state.", ("model", "state"), collect=version_states
        )
        self._metrics = (self.requests, self.latency, self.batch_size, self.in_flight, self.model_versions)
        self.in_flight.set((), 0)

    def record_request(self, model, signature, api, protocol, code, seconds):
        self.requests.inc((model, signature, api, protocol, code))
        self.latency.observe((model, signature, api, protocol), seconds)

    def record_batch(self, model, signature, rows):
        self.batch_size.observe((model, signature), rows)

    def render(self) -> str:
        lines = []
        for metric in self._metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
