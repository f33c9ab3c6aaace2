"""TFMA metrics for next-item models: NDCG@K, HR@K and MRR@K from a per-example rank.

The model's evaluation signature (`tfx_pipeline.serving`, `evaluate`) ranks each
example's target among all catalog items and outputs `rank` (0-based,
pessimistic: ties count against the target; a target outside the vocabulary
gets the worst rank). `TargetRankMetric` turns that rank into the per-example
gain of `tfrec.metrics.ranking_metrics_from_ranks` and averages it, so the
Evaluator's NDCG@10 is the same number `tfrec evaluate` reports for the same
scores. It is multi-model aware (candidate and baseline get their own keys), so
value and change thresholds apply to it like to any TFMA metric.

Use it in an `EvalConfig` through its module path:

    tfma.MetricsSpec(output_names=["rank"], metrics=[tfma.MetricConfig(
        class_name="TargetRankMetric", module="tfx_pipeline.tfma_metrics",
        config='{"metric": "ndcg", "k": 10}')])

gives the metric `ndcg@10`.
"""

import dataclasses

import apache_beam as beam
import numpy as np
from tensorflow_model_analysis.metrics import metric_types, metric_util

from tfrec.metrics import ranking_metrics_from_ranks
from tfx_pipeline.serving import RANK_OUTPUT

METRICS = ("ndcg", "hr", "mrr")


def metric_name(metric, k):
    """`"ndcg@10"` for `("ndcg", 10)`, the name used by `tfrec.metrics`."""
    return f"{metric}@{int(k)}"


def rank_gain(rank, metric, k):
    """Gain of one 0-based rank under `metric@k` (1/log2(r+2), 1 or 1/(r+1) inside the top k, else 0)."""
    return ranking_metrics_from_ranks(np.asarray([int(rank)]), ks=(int(k),))[metric_name(metric, k)]


class TargetRankMetric(metric_types.Metric):
    """Mean `metric@k` of the model output `rank` (see the module doc).

    Args:
        metric: `"ndcg"`, `"hr"` or `"mrr"`.
        k: int, the cut-off.
        name: metric name; default `"<metric>@<k>"`.

    Example:
    >>> TargetRankMetric("ndcg", 10).name
    'ndcg@10'
    """

    def __init__(self, metric="ndcg", k=10, name=None):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        super().__init__(
            metric_util.merge_per_key_computations(_target_rank_computations),
            metric=metric,
            k=int(k),
            name=name or metric_name(metric, k),
        )


metric_types.register_metric(TargetRankMetric)


def _target_rank_computations(
    metric, k, name, model_name="", output_name="", sub_key=None, example_weighted=False
):
    key = metric_types.MetricKey(
        name=name, model_name=model_name, output_name=output_name, sub_key=sub_key,
        example_weighted=example_weighted,
    )
    return [
        metric_types.MetricComputation(
            keys=[key], preprocessors=None, combiner=_MeanGainCombiner(key, metric, k, example_weighted)
        )
    ]


@dataclasses.dataclass
class _Accumulator:
    weight: float = 0.0
    total: float = 0.0


class _MeanGainCombiner(beam.CombineFn):
    """Weighted mean of `rank_gain(rank)` over examples."""

    def __init__(self, key, metric, k, example_weighted):
        self._key, self._metric, self._k = key, metric, int(k)
        self._example_weighted = example_weighted

    def create_accumulator(self):
        return _Accumulator()

    def add_input(self, accumulator, element):
        ranks = element.get_predictions(self._key.model_name, self._key.output_name)
        if isinstance(ranks, dict):
            raise ValueError(
                f"TargetRankMetric needs the model output {RANK_OUTPUT!r}; got outputs {sorted(ranks)}: "
                f"set output_names=[{RANK_OUTPUT!r}] in its MetricsSpec"
            )
        ranks = np.asarray(ranks).reshape(-1)
        weights = np.ones_like(ranks, dtype=np.float64)
        if self._example_weighted and element.get_example_weights(self._key.model_name) is not None:
            weights = np.broadcast_to(
                np.asarray(element.get_example_weights(self._key.model_name), np.float64).reshape(-1), ranks.shape
            )
        for rank, weight in zip(ranks, weights):
            accumulator.weight += float(weight)
            accumulator.total += float(weight) * rank_gain(rank, self._metric, self._k)
        return accumulator

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        result = next(accumulators)
        for other in accumulators:
            result.weight += other.weight
            result.total += other.total
        return result

    def extract_output(self, accumulator):
        value = accumulator.total / accumulator.weight if accumulator.weight else float("nan")
        return {self._key: value}
