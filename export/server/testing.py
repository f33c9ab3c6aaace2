"""Tiny servables for tests, demos and benchmarks of the model server.

- :func:`save_toy_model` writes a SavedModel version whose signatures cover the
  server's cases: a float matrix (``serving_default``), variable-length string
  histories (``tokens``), top-k with a scalar input (``recommend``), an output
  that cannot be split by rows (``count_rows``), and Classify/Regress-shaped
  signatures over serialized ``tf.Example`` s. Every numeric answer is scaled
  by ``scale``, so a response tells which version produced it.
- :func:`save_half_plus_two`: TF Serving's ``half_plus_two`` test model (``y = x / 2 + 2``).
- :class:`SleepServable` (a Python servable that waits, for shutdown tests) and
  :class:`ScaledTotal` (a composite calling another model through the server).

Example::

    >>> import os, tempfile
    >>> path = save_toy_model(os.path.join(tempfile.mkdtemp(), "toy", "1"), scale=1.0)
    >>> sorted(os.listdir(path))[:2]
    ['assets', 'fingerprint.pb']
"""

from __future__ import annotations

import time

import numpy as np

from export.server.servable import PythonServable, Signature


def save_toy_model(path: str, scale: float = 1.0) -> str:
    """Write the toy SavedModel (signatures listed in the module docstring) to ``path``."""
    import tensorflow as tf

    class Toy(tf.Module):
        def __init__(self):
            super().__init__()
            self.scale = tf.Variable(float(scale))

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def matrix(self, x):
            y = x * self.scale  # (batch, 3)
            return {"y": y, "total": tf.reduce_sum(y, axis=1)}

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.string, name="history")])
        def tokens(self, history):
            # Right-padding with "" does not change the answers: pad-invariant by design.
            count = tf.reduce_sum(tf.cast(tf.strings.length(history) > 0, tf.int32), axis=1)  # (batch,)
            last = tf.gather(history, tf.maximum(count - 1, 0), axis=1, batch_dims=1)  # (batch,)
            return {"count": count, "last": last, "last_bytes": last}

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None], tf.string, name="history"),
                tf.TensorSpec([], tf.int32, name="k"),
            ]
        )
        def recommend(self, history, k):
            batch = tf.shape(history)[0]
            items = tf.strings.as_string(tf.range(k))  # (k,)
            scores = self.scale * tf.cast(tf.range(k, 0, -1), tf.float32)  # (k,)
            return {"items": tf.tile(items[None, :], [batch, 1]), "scores": tf.tile(scores[None, :], [batch, 1])}

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def count_rows(self, x):
            return {"rows": tf.shape(x)[0], "y": x * self.scale}

        def _x(self, serialized):
            features = tf.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([1], tf.float32)})
            return features["x"][:, 0] * self.scale  # (batch,)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def classify(self, inputs):
            p = tf.sigmoid(self._x(inputs))
            scores = tf.stack([1.0 - p, p], axis=1)  # (batch, 2)
            classes = tf.tile(tf.constant([["neg", "pos"]]), [tf.shape(inputs)[0], 1])
            return {"scores": scores, "classes": classes}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def regress(self, inputs):
            return {"outputs": self._x(inputs)}

    toy = Toy()
    signatures = {
        "serving_default": toy.matrix,
        "tokens": toy.tokens,
        "recommend": toy.recommend,
        "count_rows": toy.count_rows,
        "classify": toy.classify,
        "regress": toy.regress,
    }
    tf.saved_model.save(toy, path, signatures=signatures)
    return path


def save_half_plus_two(path: str) -> str:
    """Write a SavedModel like TF Serving's ``half_plus_two`` test model to ``path``:
    ``serving_default`` maps ``x`` (float32 ``[None]``) to ``y = 0.5 * x + 2``; ``fail``
    asserts ``x > 0`` (an op error carrying TensorFlow's trace, for error tests)."""
    import tensorflow as tf

    class HalfPlusTwo(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def predict(self, x):
            return {"y": 0.5 * x + 2.0}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def fail(self, x):
            with tf.control_dependencies([tf.debugging.assert_positive(x, message="x must be positive")]):
                return {"y": tf.identity(x)}

    module = HalfPlusTwo()
    tf.saved_model.save(module, path, signatures={"serving_default": module.predict, "fail": module.fail})
    return path


def _specs(**shapes):
    import tensorflow as tf

    return {name: tf.TensorSpec(shape, dtype) for name, (shape, dtype) in shapes.items()}


class SleepServable(PythonServable):
    """Waits ``seconds`` (an input, float32 scalar) and answers ``{"slept": seconds}``."""

    def __init__(self, name, context=None, version=1):
        import tensorflow as tf

        super().__init__(name, context, version)
        self.signatures = {
            "serving_default": Signature.of(
                "serving_default", _specs(seconds=([], tf.float32)), _specs(slept=([], tf.float32))
            )
        }

    def compute(self, signature, inputs):
        time.sleep(float(inputs["seconds"]))
        return {"slept": np.float32(inputs["seconds"])}


class ScaledTotal(PythonServable):
    """A composite: asks model ``toy`` for ``total`` of ``x`` and adds one (tests the extension point)."""

    source_model = "toy"

    def __init__(self, name, context=None, version=1):
        import tensorflow as tf

        super().__init__(name, context, version)
        self.signatures = {
            "serving_default": Signature.of(
                "serving_default", _specs(x=([None, 3], tf.float32)), _specs(total_plus_one=([None], tf.float32))
            )
        }

    def compute(self, signature, inputs):
        total = self.context.predict_outputs(self.source_model, {"x": inputs["x"]})["total"]
        return {"total_plus_one": total + 1.0}
