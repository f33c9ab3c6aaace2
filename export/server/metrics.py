"""Prometheus metrics of the model server, through the pinned ``prometheus_client``.

Served on the REST port at ``/monitoring/prometheus/metrics`` (TF Serving's path),
text exposition format 0.0.4 (labels in alphabetical order):

- ``tfrec_serving_requests_total{model,signature,api,protocol,code}``: requests by outcome;
- ``tfrec_serving_request_latency_seconds{model,signature,api,protocol}``: histogram;
- ``tfrec_serving_batch_size{model,signature}``: rows per batched model call (histogram);
- ``tfrec_serving_in_flight_requests``: requests being served now;
- ``tfrec_serving_model_versions{model,state}``: versions per state (AVAILABLE, END, ...).

Label values are never what a client merely *sent*: the server passes the name of
a model it serves and of a signature that model has, and everything else (unknown
models, unknown signatures, malformed requests) is counted under
:data:`UNKNOWN` -- so the number of series, and the size of a scrape, is bounded by
the configured models, whatever clients send. Each server owns its own
``CollectorRegistry`` (tests run several servers in one process).

Example::

    >>> m = ServingMetrics()
    >>> m.record_request("m", "serving_default", "predict", "grpc", "OK", 0.004)
    >>> print([line for line in m.render().decode().splitlines() if line.startswith("tfrec_serving_requests_total")][0])
    tfrec_serving_requests_total{api="predict",code="OK",model="m",protocol="grpc",signature="serving_default"} 1.0
    >>> m.requests.value(("m", "serving_default", "predict", "grpc", "OK"))
    1.0
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import prometheus_client
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
UNKNOWN = "unknown"  # the one label value of every model/signature the server does not serve
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


class _Metric:
    """A labelled ``prometheus_client`` metric with read helpers (for tests and benchmarks)."""

    def __init__(self, metric, labelnames: Sequence[str]):
        self.metric, self.labelnames = metric, tuple(labelnames)

    def _child(self, labels: Sequence[str]):
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.metric._name} expects labels {self.labelnames}, got {tuple(labels)}")
        return self.metric.labels(*[str(v) for v in labels]) if self.labelnames else self.metric

    def _samples(self, labels: Sequence[str], suffix: str) -> list:
        wanted = dict(zip(self.labelnames, (str(v) for v in labels)))
        out = []
        for family in self.metric.collect():
            for sample in family.samples:
                if sample.name.endswith(suffix) and all(sample.labels.get(k) == v for k, v in wanted.items()):
                    out.append(sample)
        return out


class Counter(_Metric):
    def __init__(self, name, help_text, labelnames=(), registry=None):
        super().__init__(prometheus_client.Counter(name, help_text, labelnames, registry=registry), labelnames)

    def inc(self, labels: Sequence[str] = (), amount: float = 1.0) -> None:
        self._child(labels).inc(amount)

    def value(self, labels: Sequence[str] = ()) -> float:
        return sum(s.value for s in self._samples(labels, "_total"))


class Gauge(_Metric):
    def __init__(self, name, help_text, labelnames=(), registry=None):
        super().__init__(prometheus_client.Gauge(name, help_text, labelnames, registry=registry), labelnames)

    def inc(self, labels: Sequence[str] = (), amount: float = 1.0) -> None:
        self._child(labels).inc(amount)

    def set(self, labels: Sequence[str], value: float) -> None:
        self._child(labels).set(value)

    def value(self, labels: Sequence[str] = ()) -> float:
        return sum(s.value for s in self._samples(labels, self.metric._name))


class Histogram(_Metric):
    def __init__(self, name, help_text, labelnames=(), buckets=LATENCY_BUCKETS, registry=None):
        metric = prometheus_client.Histogram(name, help_text, labelnames, buckets=tuple(buckets), registry=registry)
        super().__init__(metric, labelnames)
        self.buckets = tuple(sorted(buckets))

    def observe(self, labels: Sequence[str], value: float) -> None:
        self._child(labels).observe(value)

    def count(self, labels: Sequence[str] = ()) -> int:
        return int(sum(s.value for s in self._samples(labels, "_count")))

    def sum(self, labels: Sequence[str] = ()) -> float:
        return float(sum(s.value for s in self._samples(labels, "_sum")))

    def counts_above(self, labels: Sequence[str], threshold: float) -> int:
        """How many observations were greater than ``threshold`` (a bucket bound)."""
        at_or_below = 0.0
        for sample in self._samples(labels, "_bucket"):
            le = float(sample.labels["le"])
            if le == threshold or (math.isclose(le, threshold)):
                at_or_below = sample.value
        return self.count(labels) - int(at_or_below)


class _VersionStates:
    """Collector of ``tfrec_serving_model_versions`` computed at scrape time."""

    def __init__(self, version_states: Optional[Callable[[], dict]]):
        self.version_states = version_states

    def collect(self):
        family = GaugeMetricFamily("tfrec_serving_model_versions", "Model versions per state.",
                                   labels=("model", "state"))
        for (model, state), count in sorted((self.version_states or dict)().items()):
            family.add_metric((model, state), count)
        yield family

    def describe(self):
        return []


class ServingMetrics:
    """The server's metrics; one instance (and ``CollectorRegistry``) per server.

    Args:
        version_states: optional callable returning ``{(model, state): count}`` at scrape time.
    """

    def __init__(self, version_states: Optional[Callable[[], dict]] = None):
        self.registry = prometheus_client.CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "tfrec_serving_requests", "Requests by model, signature, API, protocol and status code.",
            ("model", "signature", "api", "protocol", "code"), registry=self.registry,
        )
        self.latency = Histogram(
            "tfrec_serving_request_latency_seconds", "Request latency inside the server.",
            ("model", "signature", "api", "protocol"), LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "tfrec_serving_batch_size", "Rows per batched model call.", ("model", "signature"),
            BATCH_SIZE_BUCKETS, registry=self.registry,
        )
        self.in_flight = Gauge("tfrec_serving_in_flight_requests", "Requests being served now.",
                               registry=self.registry)
        self._versions = _VersionStates(version_states)
        self.registry.register(self._versions)

    def set_version_states(self, version_states: Callable[[], dict]) -> None:
        """Where ``tfrec_serving_model_versions`` reads its values at scrape time."""
        self._versions.version_states = version_states

    def record_request(self, model, signature, api, protocol, code, seconds) -> None:
        """Count one request; ``model``/``signature`` must be served names or :data:`UNKNOWN`."""
        self.requests.inc((model, signature, api, protocol, code))
        self.latency.observe((model, signature, api, protocol), seconds)

    def record_batch(self, model, signature, rows) -> None:
        self.batch_size.observe((model, signature), rows)

    def render(self) -> bytes:
        """The exposition text (``CONTENT_TYPE``)."""
        return prometheus_client.generate_latest(self.registry)
