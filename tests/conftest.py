"""Shared test helpers."""

import os

# Before anything imports TensorFlow: `tf.keras` = tf_keras, which TensorFlow
# Recommenders (tfrec.serving.retrieval) needs; `import keras` stays Keras 3. The tfrec
# CLI sets the same (tfrec/runtime.py).
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402


def assert_prepared_equal(a, b):
    """Two `PreparedData` are identical: vocabularies, sequences, timestamps, metadata."""
    assert a.item_vocab == b.item_vocab and a.user_vocab == b.user_vocab
    assert len(a.sequences) == len(b.sequences) == len(a.timestamps) == len(b.timestamps)
    for xs, ys in ((a.sequences, b.sequences), (a.timestamps, b.timestamps)):
        assert [len(x) for x in xs] == [len(y) for y in ys]
        assert {x.dtype for x in xs} | {y.dtype for y in ys} <= {np.dtype(np.int64)}
        if xs:
            np.testing.assert_array_equal(np.concatenate(xs), np.concatenate(ys))
    assert a.metadata == b.metadata
