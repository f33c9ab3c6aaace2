"""One layer test for every Keras layer of tfrec, in the style of keras-hub's `run_layer_test`.

`run_layer_test` checks the output shape and dtype, the number of weights, that
every trainable weight gets a gradient, a symbolic call with unknown batch and
sequence length, and the serialisation round trips, each with the same outputs
for the same weights:

- `get_config` -> `from_config` (JSON-plain config, equal config);
- `serialize_keras_object` -> `deserialize_keras_object` (registered class);
- `keras.saving` save to a `.keras` file and `load_model` (config, build and
  weights restored by Keras itself, no weights copied by hand).

`assert_serialization_round_trips` is those three round trips alone, for a
layer `run_layer_test` does not fit (no trainable weights, integer outputs,
inputs it needs built a certain way). Inputs may be an array, a dict, or a
tuple of positional inputs (`layer(query, keys, mask)`); outputs a tensor or a
dict of tensors. Test modules import them (`from layer_testing import
run_layer_test`; pytest puts `tests/` on the path) instead of keeping their own copies.
"""

import json

import keras
import numpy as np
import tensorflow as tf


def _map(inputs, fn):
    """`fn` over the arrays of `inputs`: an array, a dict of arrays, or a tuple of those (positional inputs)."""
    if isinstance(inputs, tuple):
        return tuple(_map(x, fn) for x in inputs)
    return {k: fn(v) for k, v in inputs.items()} if isinstance(inputs, dict) else fn(inputs)


def call_layer(layer, inputs, **kwargs):
    """`layer(*inputs)` for a tuple of positional inputs, else `layer(inputs)`."""
    return layer(*inputs, **kwargs) if isinstance(inputs, tuple) else layer(inputs, **kwargs)


def _outputs(output):
    """`{name: array}` of a layer output: a tensor (`""`), a dict of tensors, or a tuple (`"0"`, `"1"`, ...)."""
    if isinstance(output, dict):
        return {k: to_numpy(v) for k, v in sorted(output.items())}
    if isinstance(output, (tuple, list)):
        return {str(i): to_numpy(v) for i, v in enumerate(output)}
    return {"": to_numpy(output)}


def _input_shape(x, fixed_dims=False):
    """Per-example shape with unknown lengths: the last dim of float arrays is kept
    (`fixed_dims`: every dim but the batch is kept, for layers whose sizes are static)."""
    x = np.asarray(x)
    if fixed_dims:
        return x.shape[1:]
    if np.issubdtype(x.dtype, np.floating) and x.ndim >= 2:
        return (None,) * (x.ndim - 2) + (x.shape[-1],)
    return (None,) * (x.ndim - 1)


def symbolic_like(inputs, fixed_dims=False):
    """KerasTensors with unknown batch and sequence lengths (last dim of float inputs kept)."""
    return _map(inputs, lambda x: keras.KerasTensor((None,) + _input_shape(x, fixed_dims),
                                                    dtype=np.asarray(x).dtype.name))


def keras_inputs_like(inputs, fixed_dims=False):
    """`keras.Input`s matching `inputs` (same structure), for a functional model."""
    return _map(inputs, lambda x: keras.Input(_input_shape(x, fixed_dims), dtype=np.asarray(x).dtype.name))


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def _assert_outputs_equal(got, expected, atol):
    got = _outputs(got)
    expected = expected if isinstance(expected, dict) else {"": expected}
    assert set(got) == set(expected), f"output keys {sorted(got)} != {sorted(expected)}"
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, atol=atol, err_msg=f"output {key!r}")


def assert_same_outputs(restored, layer, inputs, expected, atol=1e-6):
    """`restored`, given `layer`'s weights, maps `inputs` to `expected` (array, or dict of arrays)."""
    call_layer(restored, inputs)  # build
    restored.set_weights(layer.get_weights())
    _assert_outputs_equal(call_layer(restored, inputs), expected, atol)


def assert_keras_file_round_trip(layer, inputs, expected, path, atol=1e-6, fixed_dims=False):
    """`layer` inside a functional model, saved to `path` (.keras) and loaded: same outputs."""
    symbolic = keras_inputs_like(inputs, fixed_dims)
    model = keras.Model(list(symbolic) if isinstance(symbolic, tuple) else symbolic, call_layer(layer, symbolic))
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    assert any(type(sub) is type(layer) for sub in loaded.layers)
    _assert_outputs_equal(loaded(list(inputs) if isinstance(inputs, tuple) else inputs), expected, atol)
    return loaded


def assert_serialization_round_trips(layer, inputs, expected, tmp_path, atol=1e-6, fixed_dims=False):
    """The three round trips of a built `layer`, each with the same outputs for the same weights:

    `get_config` -> `from_config` (JSON-plain, equal config), `serialize_keras_object`
    -> `deserialize_keras_object` (registered class) and a `.keras` file. `inputs`:
    an array, a dict, or a tuple of positional inputs; `expected`: the layer's
    output on them (array; a dict of arrays for a dict-valued layer, `{"0": ..., "1": ...}`
    for a tuple-valued one). `fixed_dims`: the saved model's inputs keep every
    non-batch dim (a layer with static sizes, e.g. R2LED's route count)."""
    cls = type(layer)
    config = layer.get_config()
    json.dumps(config)  # plain JSON
    clone = cls.from_config(config)
    assert clone.get_config() == config
    assert_same_outputs(clone, layer, inputs, expected, atol)

    serialized = keras.saving.serialize_keras_object(layer)
    restored = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert type(restored) is cls
    assert restored.get_config() == config
    assert_same_outputs(restored, layer, inputs, expected, atol)

    return assert_keras_file_round_trip(layer, inputs, expected, tmp_path / f"{cls.__name__}.keras", atol,
                                        fixed_dims)


def run_layer_test(cls, init_kwargs, inputs, expected_output_shape, expected_num_trainable_weights, tmp_path,
                   expected_num_non_trainable_weights=0, atol=1e-6, fixed_dims=False):
    """Shared checks for every layer (see module docstring); returns `(layer, outputs)`.

    `inputs`: an array, a dict, or a tuple of positional inputs. `expected_output_shape`:
    a shape, or `{output name: shape}` for a layer returning a dict. `fixed_dims`:
    symbolic inputs keep every non-batch dim (see `assert_serialization_round_trips`)."""
    keras.utils.set_random_seed(0)
    layer = cls(**init_kwargs)
    output = call_layer(layer, inputs)
    assert layer.built
    outputs = _outputs(output)
    shapes = expected_output_shape if isinstance(expected_output_shape, dict) else {"": expected_output_shape}
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {k: tuple(v) for k, v in shapes.items()}
    for value in (output.values() if isinstance(output, dict) else [output]):
        assert keras.backend.standardize_dtype(value.dtype) == "float32"
    assert len(layer.trainable_weights) == expected_num_trainable_weights > 0
    assert len(layer.non_trainable_weights) == expected_num_non_trainable_weights
    names = [w.path for w in layer.weights]
    assert len(set(names)) == len(names), f"duplicate weight paths: {names}"
    expected = outputs if isinstance(output, dict) else outputs[""]
    assert all(np.all(np.isfinite(v)) for v in outputs.values())

    # Every trainable weight is connected to the output.
    with tf.GradientTape() as tape:
        again = call_layer(layer, inputs, training=False) if _takes_training(layer) else call_layer(layer, inputs)
        values = again.values() if isinstance(again, dict) else [again]
        loss = tf.add_n([tf.reduce_sum(tf.square(v)) for v in values])
    grads = tape.gradient(loss, layer.trainable_variables)
    missing = [v.path for v, g in zip(layer.trainable_variables, grads) if g is None]
    assert not missing, f"weights without gradient: {missing}"

    # Symbolic call with unknown batch / sequence length.
    symbolic = call_layer(cls(**init_kwargs), symbolic_like(inputs, fixed_dims))
    for key, value in (symbolic.items() if isinstance(symbolic, dict) else [("", symbolic)]):
        assert len(value.shape) == len(shapes[key])
        if shapes[key]:
            assert value.shape[-1] == shapes[key][-1]

    assert_serialization_round_trips(layer, inputs, expected, tmp_path, atol, fixed_dims)
    return layer, expected


def _takes_training(layer):
    import inspect

    return "training" in inspect.signature(layer.call).parameters
