"""The retrieval servable with new items merged at query time (issue 22 item 5; see ``export.items_add``).

``DeltaRetrievalServable`` (python platform) answers ``retrieve`` like the base
retrieval model it wraps, merging the delta file's items (brute force) into
each answer, and follows the file as ``tfrec items add`` rewrites it (no
restart, zero failed requests). Configuration::

    config { name: 'retrieval_live' model_platform: 'python'
             base_path: 'export.delta_retrieval:factory?retrieval=retrieval_scann&delta=/srv/delta/items.npz' }

served with ``--allowed_python_modules export.delta_retrieval``.

Example (not run as a doctest: ``context`` is a live serving core holding an exported
retrieval model; ``tests/test_items_add.py`` builds one):
>>> servable = factory("retrieval_live", context, retrieval="retrieval_scann", delta="items.npz")  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from export.items_add import DeltaWatcher, merge_top_k
from tfrec.serving.retrieval import RETRIEVE_SIGNATURE as RETRIEVE
from export.server.errors import ServingError
from export.server.servable import DEFAULT_SIGNATURE, PythonServable, Signature


class DeltaRetrievalServable(PythonServable):
    """``retrieve`` of a base retrieval model merged with a delta file (see the module docstring).

    Args:
        name: model name; context: the serving core.
        retrieval: ``str``, the base retrieval model's name.
        delta: ``str``, the delta file.
        reload_seconds: ``float`` (or its string), default 1.
        version: ``int``, default 1.
    """

    def __init__(self, name, context=None, retrieval="retrieval_scann", delta=None, reload_seconds="1",
                 version=1):
        super().__init__(name, context, version)
        if not retrieval or retrieval == name:
            raise ValueError(f"delta retrieval option retrieval must name another served model, got {retrieval!r}")
        if not delta:
            raise ValueError("delta retrieval option delta (the delta file) is required")
        try:
            seconds = float(reload_seconds)
        except (TypeError, ValueError):
            seconds = -1.0
        if not 0.0 <= seconds <= 3600.0:
            raise ValueError(f"delta retrieval option reload_seconds must be in [0, 3600], got {reload_seconds!r}")
        self.retrieval = str(retrieval)
        self.watcher = DeltaWatcher(delta, seconds)
        signature = Signature.of(RETRIEVE, {"queries": tf.TensorSpec([None, None], tf.float32)},
                                 {"item_ids": tf.TensorSpec([None, None], tf.string),
                                  "scores": tf.TensorSpec([None, None], tf.float32)})
        self.signatures = {RETRIEVE: signature, DEFAULT_SIGNATURE: Signature.of(
            DEFAULT_SIGNATURE, signature.inputs, signature.outputs)}

    def compute(self, signature, inputs):
        if self.context is None:
            raise ServingError.failed_precondition(f"{self.name}: the delta retrieval runs inside a model server")
        queries = np.asarray(inputs["queries"], np.float32)
        base = self.context.predict_outputs(self.retrieval, {"queries": queries}, signature=RETRIEVE)
        delta = self.watcher.current()  # one reference for the whole request
        if len(delta.tokens) and delta.vectors.shape[1] != queries.shape[1]:
            raise ServingError.invalid_argument(f"queries have {queries.shape[1]} dims, the delta items "
                                                f"{delta.vectors.shape[1]}")
        base_ids = np.asarray(base["item_ids"], dtype=object)
        item_ids, scores = merge_top_k(base_ids, base["scores"], delta, queries @ delta.vectors.T
                                       if len(delta.tokens) else None, base_ids.shape[1])
        return {"item_ids": item_ids, "scores": scores}


def factory(name, context, **options):
    """``DeltaRetrievalServable(name, context, **options)`` (options: ``retrieval``, ``delta``, ``reload_seconds``)."""
    unknown = sorted(set(options) - {"retrieval", "delta", "reload_seconds"})
    if unknown:
        raise ValueError(f"unknown delta retrieval option(s) {unknown}; known: retrieval, delta, reload_seconds")
    return DeltaRetrievalServable(name, context, **options)
