"""TF Serving's REST JSON formats: request bodies -> numpy arrays, outputs -> JSON.

Follows ``tensorflow_serving/util/json_tensor.cc``:

- Predict takes ``{"signature_name": ..., "instances": [...]}`` (row format: one
  element per example, a plain value/list for single-input signatures or an
  object per example with every input) or ``{"inputs": ...}`` (columnar: a
  value/list for a single input or an object of whole tensors); it answers
  ``{"predictions": [...]}`` or ``{"outputs": ...}`` respectively.
- JSON values are converted to the signature's dtype: numbers must fit without
  loss, integers must be integral, strings are UTF-8, binary strings are
  ``{"b64": "<base64>"}``. Outputs whose name ends in ``_bytes`` are written as
  ``{"b64": ...}``; float outputs use the shortest text that round-trips; NaN and
  infinities are written as ``NaN`` / ``Infinity``. One deviation: a string output
  that is not valid UTF-8 is written as ``{"b64": ...}`` (TF Serving would emit
  invalid JSON).
- Classify/Regress take ``{"context": {...}, "examples": [{feature: value}, ...]}``
  and answer ``{"results": ...}``.

Every malformed body raises ``ServingError`` INVALID_ARGUMENT (HTTP 400).

Example::

    >>> import tensorflow as tf
    >>> from export.server.servable import Signature
    >>> sig = Signature.of("s", {"x": tf.TensorSpec([None, 2], tf.float32)}, {})
    >>> arrays, fmt = predict_inputs_from_json({"instances": [[1, 2], [3, 4.5]]}, sig)
    >>> arrays["x"].tolist(), fmt
    ([[1.0, 2.0], [3.0, 4.5]], 'row')
    >>> outputs_to_json({"y": np.array([[0.2], [1.0]], np.float32)}, "row")
    {'predictions': [[0.2], [1.0]]}
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from export.server.errors import ServingError

ROW, COLUMNAR = "row", "columnar"
# Deepest JSON nesting accepted (ours): an object, 'instances' and a tensor of rank <= 30 fit;
# TF tensors of requests never need more, and numpy (so the server) stops at rank 32.
MAX_JSON_DEPTH = 32
_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_DEPTH_CHUNK = 1 << 20
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")

_INT_RANGES = {
    np.dtype(np.int8): (-(2**7), 2**7 - 1), np.dtype(np.int16): (-(2**15), 2**15 - 1),
    np.dtype(np.int32): (-(2**31), 2**31 - 1), np.dtype(np.int64): (-(2**63), 2**63 - 1),
    np.dtype(np.uint8): (0, 2**8 - 1), np.dtype(np.uint16): (0, 2**16 - 1),
    np.dtype(np.uint32): (0, 2**32 - 1), np.dtype(np.uint64): (0, 2**64 - 1),
}
_FLOAT_MANTISSA = {np.dtype(np.float16): 11, np.dtype(np.float32): 24, np.dtype(np.float64): 53}


def _text(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def _bad(message: str) -> ServingError:
    return ServingError.invalid_argument(message)


def is_base64_object(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def decode_base64(value: dict) -> bytes:
    text = value["b64"]
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"Unable to base64 decode {_text(value)}") from None


def json_depth(body: bytes) -> int:
    """Deepest ``[``/``{`` nesting of a JSON text, outside strings (vectorized: fast on large bodies).

    >>> json_depth(b'{"a": [[1, 2], "[[[["]}')
    3
    """
    text = _STRING_RE.sub(b'""', body)  # strings may hold brackets
    brackets = text.translate(None, _NOT_BRACKETS)
    del text
    depth, deepest = 0, 0
    for start in range(0, len(brackets), _DEPTH_CHUNK):  # chunks: memory stays small whatever the body
        chunk = np.frombuffer(brackets, dtype=np.uint8, count=min(_DEPTH_CHUNK, len(brackets) - start),
                              offset=start)
        levels = depth + np.cumsum(np.where((chunk == 91) | (chunk == 123), 1, -1), dtype=np.int64)  # [ {
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def parse_body(body: bytes) -> dict:
    """Parse a request body: a JSON object, with an optional string ``signature_name``.

    Nesting deeper than :data:`MAX_JSON_DEPTH` is INVALID_ARGUMENT before parsing.
    """
    if not body or not body.strip():
        raise _bad("JSON Parse error: The document is empty")
    if json_depth(body) > MAX_JSON_DEPTH:
        raise _bad(f"JSON Parse error: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise _bad(f"JSON Parse error: {err}") from None
    except RecursionError:
        raise _bad("JSON Parse error: nested too deeply") from None
    if not isinstance(doc, dict):
        raise _bad(f"JSON Value: {_text(doc)} Is not object")
    if "signature_name" in doc and not isinstance(doc["signature_name"], str):
        raise _bad(
            f"JSON Value: {_text(doc)} not formatted correctly. 'signature_name' key must be a string value."
        )
    return doc


def _scalar(value: Any, dtype: np.dtype, tf_name: str):
    def type_error():
        return _bad(f"JSON Value: {_text(value)} Type: {_json_type(value)} is not of expected type: {tf_name}")

    if dtype == object:  # DT_STRING
        if isinstance(value, str):
            try:
                return value.encode("utf-8")
            except UnicodeEncodeError:
                raise _bad(f"JSON Value: {_text(value)} is not valid UTF-8 text") from None
        if is_base64_object(value):
            return decode_base64(value)
        if isinstance(value, dict):
            raise _bad(f"JSON Value: {_text(value)} not formatted correctly for base64 data")
        raise type_error()
    if dtype.kind == "b":
        if not isinstance(value, bool):
            raise type_error()
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise type_error()
    if dtype.kind == "f":
        if isinstance(value, int):
            if abs(value) > (1 << _FLOAT_MANTISSA.get(dtype, 53)) - 1:
                raise _bad(f"Cannot convert JSON value: {value} to {tf_name} without loss of precision.")
        elif np.isfinite(value) and abs(value) > np.finfo(dtype).max:
            raise _bad(f"Cannot convert JSON value: {value} to {tf_name} without loss of precision.")
        return value
    if dtype.kind in "iu":
        low, high = _INT_RANGES[dtype]
        if not isinstance(value, int) or not low <= value <= high:
            raise type_error()
        return value
    raise _bad(f"Conversion of JSON Value: {_text(value)} to type: {tf_name} is not supported")


_type_of = np.frompyfunc(type, 1, 1)
_encode_utf8 = np.frompyfunc(lambda text: text.encode("utf-8"), 1, 1)


def _fast_array(value: Any, dtype: np.dtype, shape: List[int]):
    """``value`` converted in C loops, or ``None`` when anything is unusual (then the
    element-wise path converts it or raises the precise error). Same results as that path;
    peak memory about 3 machine words per element beyond the parsed JSON."""
    if not shape or 0 in shape:
        return None
    try:
        objects = np.array(value, dtype=object)
    except (ValueError, TypeError):
        return None
    if objects.shape != tuple(shape):
        return None  # ragged, or lists as leaves
    types = _type_of(objects)
    if dtype == object:  # DT_STRING: every leaf a str (base64 objects take the slow path)
        if not (types == str).all():
            return None
        try:
            return _encode_utf8(objects)
        except UnicodeEncodeError:  # lone surrogates: the element-wise path names the value
            return None
    if dtype.kind == "b":
        return objects.astype(bool) if (types == bool).all() else None
    is_int = types == int  # exact types: bool is not int here
    if dtype.kind in "iu":
        if not is_int.all():
            return None
        low, high = _INT_RANGES[dtype]
        try:
            wide = objects.astype(np.int64 if low < 0 else np.uint64)
        except OverflowError:
            return None
        if wide.size and (wide.min() < low or wide.max() > high):
            return None
        return wide.astype(dtype)
    if dtype.kind == "f":
        if not (is_int | (types == float)).all():
            return None
        try:
            wide = objects.astype(np.float64)
        except OverflowError:
            return None
        del objects, types
        if is_int.any() and (np.abs(wide[is_int]) > (1 << _FLOAT_MANTISSA.get(dtype, 53)) - 1).any():
            return None
        finite = np.isfinite(wide)
        if (np.abs(wide[finite]) > np.finfo(dtype).max).any():
            return None
        return wide.astype(dtype)
    return None


def json_to_array(value: Any, dtype: np.dtype, tf_name: str) -> np.ndarray:
    """A dense tensor from nested JSON lists (every leaf at the same depth, lists of equal sizes)."""
    shape = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    rank = len(shape)
    fast = _fast_array(value, dtype, shape)
    if fast is not None:
        return fast
    flat: List[Any] = []

    def fill(item, level):
        if not isinstance(item, list):
            if level != rank:
                raise _bad(
                    f"JSON Value: {_text(item)} found at incorrect level: {level + 1} in the JSON DOM. "
                    f"Expected at level: {rank}"
                )
            flat.append(_scalar(item, dtype, tf_name))
            return
        if level >= rank:
            raise _bad(f"Encountered list at unexpected level: {level} expected < {rank}")
        if len(item) != shape[level]:
            raise _bad(
                f"Encountered list at unexpected size: {len(item)} at level: {level} expected size: {shape[level]}"
            )
        for element in item:
            fill(element, level + 1)

    fill(value, 0)
    if dtype == object:
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array.reshape(shape)
    return np.array(flat, dtype=dtype).reshape(shape)


def _spec_dtype(spec) -> Tuple[np.dtype, str]:
    import tensorflow as tf

    from export.server.servable import dtype_name

    dtype = np.dtype(object) if spec.dtype == tf.string else np.dtype(spec.dtype.as_numpy_dtype)
    return dtype, dtype_name(spec.dtype)


def predict_inputs_from_json(doc: Mapping[str, Any], signature) -> Tuple[Dict[str, np.ndarray], str]:
    """Input arrays of a parsed Predict body, and its format (``"row"`` or ``"columnar"``)."""
    specs = signature.inputs
    if not specs:
        raise _bad(f"Failed to get input map for signature: {signature.name}")
    dtypes = {name: _spec_dtype(spec) for name, spec in specs.items()}
    has_instances, has_inputs = "instances" in doc, "inputs" in doc
    if has_instances and has_inputs:
        raise _bad(
            f"JSON Value: {_text(dict(doc))} Not formatted correctly expecting only one of 'inputs' or "
            "'instances' keys to exist "
        )
    if has_instances:
        return _from_instances(doc, specs, dtypes), ROW
    if has_inputs:
        return _from_inputs(doc["inputs"], specs, dtypes), COLUMNAR
    raise _bad("Missing 'inputs' or 'instances' key")


def _is_named(value: Any) -> bool:
    return isinstance(value, dict) and not is_base64_object(value)


def _from_instances(doc, specs, dtypes) -> Dict[str, np.ndarray]:
    instances = doc["instances"]
    if not isinstance(instances, list):
        raise _bad(f"JSON Value: {_text(dict(doc))} Excepting 'instances' to be an list/array")
    if not instances:
        raise _bad(f"JSON Value: {_text(dict(doc))} No values in 'instances' array")
    if not isinstance(instances[0], dict) and len(specs) > 1:
        raise _bad(
            "instances is a plain list, but expecting list of objects as multiple input tensors required as "
            f"per tensorinfo_map (inputs: {', '.join(sorted(specs))})"
        )
    named = _is_named(instances[0])
    names = sorted(specs)
    if not named and not any(isinstance(e, dict) for e in instances):  # one tensor, all rows at once
        probe, shape = instances, []
        while isinstance(probe, list) and probe:
            shape.append(len(probe))
            probe = probe[0]
        fast = _fast_array(instances, *dtypes[names[0]][:1], shape)
        if fast is not None:
            return {names[0]: fast}
    rows: Dict[str, list] = {name: [] for name in names}
    for index, element in enumerate(instances):
        if named:
            if not _is_named(element):
                raise _bad(f"Expecting object but got list at item {index} of input list")
            for key, value in element.items():
                if key not in specs:
                    raise _bad(
                        f"Failed to process element: {index} key: {key} of 'instances' list. "
                        f"Error: JSON object: does not have named input: {key}"
                    )
                try:
                    rows[key].append(json_to_array(value, *dtypes[key]))
                except ServingError as err:
                    raise _bad(
                        f"Failed to process element: {index} key: {key} of 'instances' list. Error: {err.message}"
                    ) from None
            if set(element) != set(names):
                raise _bad(
                    f"Failed to process element: {index} of 'instances' list. JSON object: {_text(element)} "
                    f"keys must be equal to: {','.join(names)}"
                )
        else:
            if _is_named(element):
                raise _bad(f"Expecting value/list but got object at item {index} of input list")
            name = names[0]
            try:
                rows[name].append(json_to_array(element, *dtypes[name]))
            except ServingError as err:
                raise _bad(f"Failed to process element: {index} of 'instances' list. Error: {err.message}") from None
    arrays = {}
    for name, items in rows.items():
        first = items[0].shape
        for item in items[1:]:
            if item.shape != first:
                raise _bad(
                    f"Expecting shape {list(first)} but got: {list(item.shape)} for input '{name}' "
                    "(every instance must have the same shape)"
                )
        arrays[name] = np.stack(items) if items[0].dtype != object else _stack_objects(items)
    return arrays


def _stack_objects(items: List[np.ndarray]) -> np.ndarray:
    out = np.empty((len(items),) + items[0].shape, dtype=object)
    for i, item in enumerate(items):
        out[i] = item[()] if item.ndim == 0 else item  # item[()]: the scalar, not a 0-d array
    return out


def _from_inputs(value, specs, dtypes) -> Dict[str, np.ndarray]:
    if not _is_named(value):
        if len(specs) > 1:
            raise _bad(
                "inputs is a plain value/list, but expecting an object as multiple input tensors required as "
                f"per tensorinfo_map (inputs: {', '.join(sorted(specs))})"
            )
        name = next(iter(specs))
        return {name: json_to_array(value, *dtypes[name])}
    for name in sorted(specs):
        if name not in value:
            raise _bad(f"Missing named input: {name} in 'inputs' object.")
    extra = sorted(set(value) - set(specs))
    if extra:  # as gRPC: every sent input must be one the signature has
        raise _bad(f"'inputs' object has input(s) {', '.join(extra)[:200]} the signature does not have "
                   f"(inputs: {', '.join(sorted(specs))})")
    arrays = {}
    for name in sorted(specs):
        arrays[name] = json_to_array(value[name], *dtypes[name])
    return arrays


def _json_values(name: str, array: np.ndarray) -> Any:
    """Nested lists of JSON-ready values for one output tensor."""
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind in "SU":
        as_bytes = name.endswith("_bytes")

        def convert(value):
            if isinstance(value, str):
                value = value.encode("utf-8")
            if not as_bytes:
                try:
                    return value.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            return {"b64": base64.b64encode(value).decode("ascii")}

        flat = [convert(v) for v in array.flat]
    elif array.dtype.kind == "f" and array.dtype != np.float64:
        flat = [float(str(v)) for v in array.flat]  # shortest text that round-trips the float32
    else:
        return array.tolist()
    if array.ndim == 1:
        return flat
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape).tolist()


def outputs_to_json(outputs: Mapping[str, np.ndarray], fmt: str) -> dict:
    """The response object of a Predict call in request format ``fmt``."""
    if not outputs:
        raise _bad("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    if fmt == COLUMNAR:
        if len(names) == 1:
            return {"outputs": _json_values(names[0], outputs[names[0]])}
        return {"outputs": {name: _json_values(name, outputs[name]) for name in names}}
    batch = None
    for name in names:
        shape = np.shape(outputs[name])
        if not shape:
            raise _bad(f"Tensor name: {name} has no shape information ")
        if batch is not None and shape[0] != batch:
            raise _bad(f"Tensor name: {name} has inconsistent batch size: {shape[0]} expecting: {batch}")
        batch = shape[0]
    values = {name: _json_values(name, outputs[name]) for name in names}
    if len(names) == 1:
        return {"predictions": values[names[0]]}
    return {"predictions": [{name: values[name][i] for name in names} for i in range(batch)]}


def _feature(name: str, content: Any):
    from tensorflow.core.example import feature_pb2

    feature = feature_pb2.Feature()
    kind = None
    for value in content if isinstance(content, list) else [content]:
        if isinstance(value, bool) or (isinstance(value, int) and not isinstance(value, bool)):
            this = "int64_list"
            item = int(value)
            if not -(2**63) <= item < 2**63:
                raise _bad(f"Feature: {name} has uint64 element. Only int64 is supported.")
        elif isinstance(value, float):
            this, item = "float_list", value
        elif isinstance(value, str):
            this, item = "bytes_list", value.encode("utf-8")
        elif is_base64_object(value):
            this, item = "bytes_list", decode_base64(value)
        else:
            raise _bad(f"Feature: {name} has element with unexpected JSON type: {_json_type(value)}")
        if kind is not None and kind != this:
            raise _bad(f"Unexpected element type in feature: {name} expecting type: {kind.split('_')[0]}")
        kind = this
        getattr(feature, this).value.append(item)
    return feature


def example_from_json(value: Any):
    """A ``tf.train.Example`` from ``{feature: value or [values]}``."""
    from tensorflow.core.example import example_pb2

    if not isinstance(value, dict):
        raise _bad(f"Example must be JSON object but got JSON {_json_type(value)}")
    example = example_pb2.Example()
    for name, content in value.items():
        example.features.feature[name].CopyFrom(_feature(name, content))
    return example


def examples_from_json(doc: Mapping[str, Any], api: str) -> List[bytes]:
    """Serialized examples of a Classify/Regress body (``context`` merged into each example)."""
    context = example_from_json(doc["context"]).SerializeToString() if "context" in doc else b""
    if "examples" not in doc:
        raise _bad(f"JSON Value: {_text(dict(doc))} When method is {api}, key 'examples' is expected and was not found")
    examples = doc["examples"]
    if not isinstance(examples, list):
        raise _bad(f"JSON Value: {_text(dict(doc))} Expecting 'examples' value to be an list/array")
    if not examples:
        raise _bad(f"JSON Value: {_text(dict(doc))} 'examples' value is an empty array")
    return [context + example_from_json(e).SerializeToString() for e in examples]


def _float32(value: float) -> float:
    return float(str(np.float32(value)))


def classify_results_to_json(results) -> dict:
    """``{"results": [[[label, score], ...], ...]}`` (scores are float32 in the proto)."""
    return {"results": [[[label, _float32(score)] for label, score in row] for row in results]}


def regress_results_to_json(values) -> dict:
    """``{"results": [value, ...]}``."""
    return {"results": [_float32(v) for v in values]}
