"""Server-side batching: length-aware merging and concurrent batches of one signature."""

import threading

import numpy as np
import pytest
import tensorflow as tf

from export.server.batching import BatchScheduler
from export.server.config import BatchingOptions, parse_batching_parameters
from export.server.servable import PythonServable, Signature


class RowSums(PythonServable):
    """Sums each row of int `x` (padding 0 changes nothing) and records the shape of every model call."""

    signatures = {"serving_default": Signature.of(
        "serving_default", {"x": tf.TensorSpec([None, None], tf.int64)}, {"sum": tf.TensorSpec([None], tf.int64)})}

    def __init__(self, *args, barrier=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.barrier = [], barrier

    def compute(self, signature, inputs):
        self.calls.append(tuple(inputs["x"].shape))
        if self.barrier is not None:
            self.barrier.wait()  # raises BrokenBarrierError unless enough calls run at once
        return {"sum": inputs["x"].sum(axis=1)}


def _run_concurrently(servable, requests):
    results, errors = [None] * len(requests), []
    start = threading.Barrier(len(requests))

    def call(i):
        start.wait()
        try:
            results[i] = servable.run("serving_default", {"x": requests[i]})["sum"].tolist()
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return results


def _serve(options, **kwargs):
    scheduler = BatchScheduler(options)
    servable = RowSums("sums", **kwargs)
    servable.attach_batching(scheduler)
    return servable, scheduler


@pytest.mark.parametrize("ratio, expected_calls", [
    (0.0, [(3, 8)]),  # TF Serving's rule: everything padded to the longest request
    (2.0, [(1, 8), (2, 3)]),  # 8 is more than 2x the others: it runs alone, 2 and 3 merge (padded to 3)
])
def test_max_padding_ratio_bounds_the_length_spread_of_a_batch(ratio, expected_calls):
    options = BatchingOptions(max_batch_size=8, batch_timeout_micros=500_000, num_batch_threads=1,
                              pad_variable_length_inputs=True, max_padding_ratio=ratio)
    servable, scheduler = _serve(options)
    requests = [np.arange(1, n + 1, dtype=np.int64)[None, :] for n in (2, 3, 8)]
    try:
        results = _run_concurrently(servable, requests)
    finally:
        servable.close()
        scheduler.close()
    assert results == [[3], [6], [36]]  # each caller gets its own row's answer
    assert sorted(servable.calls) == expected_calls


def test_one_signature_runs_several_batches_at_once():
    # max_batch_size 1: each request is its own batch; compute blocks until two calls run together,
    # which happens only if the signature's batches run in parallel (num_batch_threads=2).
    options = BatchingOptions(max_batch_size=1, batch_timeout_micros=0, num_batch_threads=2)
    servable, scheduler = _serve(options, barrier=threading.Barrier(2, timeout=10))
    try:
        results = _run_concurrently(servable, [np.array([[1, 2]]), np.array([[3, 4]])])
    finally:
        servable.close()
        scheduler.close()
    assert results == [[3], [7]]


def test_max_padding_ratio_parameter():
    assert parse_batching_parameters("max_padding_ratio { value: 2.5 }").max_padding_ratio == 2.5
    assert BatchingOptions().max_padding_ratio == 0  # off by default (TF Serving's behaviour)
    with pytest.raises(ValueError, match="max_padding_ratio must be 0 .* or >= 1"):
        BatchingOptions(max_padding_ratio=0.5)


def test_serve_sets_tensorflow_thread_pools():
    """`tfrec serve --tensorflow_intra_op_parallelism/--tensorflow_inter_op_parallelism` (TF Serving's flags)."""
    import subprocess
    import sys

    code = ("from export.commands import set_tensorflow_threads; set_tensorflow_threads(1, 1); "
            "import tensorflow as tf; tf.constant(1) + 1; "
            "print(tf.config.threading.get_intra_op_parallelism_threads(), "
            "tf.config.threading.get_inter_op_parallelism_threads())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["1", "1"]
