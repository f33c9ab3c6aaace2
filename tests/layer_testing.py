"""One layer test for every Keras layer of tfrec, in the style of keras-hub's `run_layer_test`.

`run_layer_test` checks the output shape and dtype, the number of weights, that
every trainable weight gets a gradient, a symbolic call with unknown batch and
sequence length, and the serialisation round trips, each with the same outputs
for the same weights:

- `get_config` -> `from_config` (JSON-plain config, equal config);
- `serialize_keras_object` -> `deserialize_keras_object` (registered class);
- `keras.saving` save to a `.keras` file and `load_model` (config, build and
  weights restored by Keras itself, no weights copied by hand).

Test modules import it (`from layer_testing import run_layer_test`; pytest puts
`tests/` on the path) instead of keeping their own copies.
"""

import json

import keras
import numpy as np
import tensorflow as tf


def _map(inputs, fn):
    return {k: fn(v) for k, v in inputs.items()} if isinstance(inputs, dict) else fn(inputs)


def _input_shape(x):
    """Per-example shape with unknown lengths: the last dim of float arrays is kept."""
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating) and x.ndim >= 2:
        return (None,) * (x.ndim - 2) + (x.shape[-1],)
    return (None,) * (x.ndim - 1)


def symbolic_like(inputs):
    """KerasTensors with unknown batch and sequence lengths (last dim of float inputs kept)."""
    return _map(inputs, lambda x: keras.KerasTensor((None,) + _input_shape(x), dtype=np.asarray(x).dtype.name))


def keras_inputs_like(inputs):
    """`keras.Input`s matching `inputs` (same structure), for a functional model."""
    return _map(inputs, lambda x: keras.Input(_input_shape(x), dtype=np.asarray(x).dtype.name))


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def assert_same_outputs(restored, layer, inputs, expected, atol=1e-6):
    """`restored`, given `layer`'s weights, maps `inputs` to `expected`."""
    restored(inputs)  # build
    restored.set_weights(layer.get_weights())
    np.testing.assert_allclose(to_numpy(restored(inputs)), expected, atol=atol)


def assert_keras_file_round_trip(layer, inputs, expected, path, atol=1e-6):
    """`layer` inside a functional model, saved to `path` (.keras) and loaded: same outputs."""
    symbolic = keras_inputs_like(inputs)
    model = keras.Model(symbolic, layer(symbolic))
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    assert any(type(sub) is type(layer) for sub in loaded.layers)
    np.testing.assert_allclose(to_numpy(loaded(inputs)), expected, atol=atol)
    return loaded


def run_layer_test(cls, init_kwargs, inputs, expected_output_shape, expected_num_trainable_weights, tmp_path):
    """Shared checks for every layer (see module docstring); returns `(layer, outputs)`."""
    keras.utils.set_random_seed(0)
    layer = cls(**init_kwargs)
    output = layer(inputs)
    assert layer.built
    assert tuple(output.shape) == tuple(expected_output_shape)
    assert keras.backend.standardize_dtype(output.dtype) == "float32"
    assert len(layer.trainable_weights) == expected_num_trainable_weights > 0
    assert layer.non_trainable_weights == []
    names = [w.path for w in layer.weights]
    assert len(set(names)) == len(names), f"duplicate weight paths: {names}"
    expected = to_numpy(output)
    assert np.all(np.isfinite(expected))

    # Every trainable weight is connected to the output.
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(inputs, training=False)))
    grads = tape.gradient(loss, layer.trainable_variables)
    missing = [v.path for v, g in zip(layer.trainable_variables, grads) if g is None]
    assert not missing, f"weights without gradient: {missing}"

    # Symbolic call with unknown batch / sequence length.
    symbolic = cls(**init_kwargs)(symbolic_like(inputs))
    assert len(symbolic.shape) == len(expected_output_shape)
    assert symbolic.shape[-1] == expected_output_shape[-1]

    # get_config -> from_config: same config, and same outputs with the same weights.
    config = layer.get_config()
    json.dumps(config)  # plain JSON
    clone = cls.from_config(config)
    assert clone.get_config() == config
    assert_same_outputs(clone, layer, inputs, expected)

    # serialize_keras_object -> deserialize_keras_object (registered class).
    serialized = keras.saving.serialize_keras_object(layer)
    restored = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert type(restored) is cls
    assert restored.get_config() == config
    assert_same_outputs(restored, layer, inputs, expected)

    # .keras file: save, load, same outputs.
    assert_keras_file_round_trip(layer, inputs, expected, tmp_path / f"{cls.__name__}.keras")
    return layer, expected
