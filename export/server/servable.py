"""Servables: one loaded model version whose named signatures run on numpy inputs.

- :class:`SavedModelServable` wraps any SavedModel: its signatures are read from
  the loaded concrete functions (``structured_input_signature`` /
  ``structured_outputs``) and its ``SignatureDef`` s from ``saved_model.pb`` (for
  metadata, exactly what TF Serving reports). ScaNN's custom ops are registered
  (``import scann``) only when the graph uses them, so stock models load without it.
- :class:`PythonServable` is the extension point for composite endpoints written in
  Python (e.g. ScaNN candidates re-ranked by a CTR model): subclass it, declare
  ``signatures`` and implement ``compute``; ``self.context.predict_outputs(...)`` calls any
  other loaded model through the server (version resolution, batching, metrics).

Input validation (:func:`validate_inputs`) raises :class:`ServingError` with TF
Serving's codes: INVALID_ARGUMENT for missing/extra names, dtypes and shapes.

Example::

    >>> import numpy as np, tensorflow as tf
    >>> class Doubler(PythonServable):
    ...     signatures = {"serving_default": Signature.of(
    ...         "serving_default", {"x": tf.TensorSpec([None], tf.float32)}, {"y": tf.TensorSpec([None], tf.float32)})}
    ...     def compute(self, signature, inputs):
    ...         return {"y": inputs["x"] * 2}
    >>> Doubler("double").run("serving_default", {"x": np.ones(2, np.float32)})["y"].tolist()
    [2.0, 2.0]
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Dict, Mapping, Optional

import grpc
import numpy as np

from export.server.errors import ServingError

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"

_scann_lock = threading.Lock()

# TF Serving's SavedModel warm-up: a TFRecord file of ``PredictionLog`` s replayed at load, before
# the version serves (its first requests then pay no one-time cost, e.g. XLA compilation).
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit


def read_warmup_requests(version_path: str, limit: int = MAX_WARMUP_RECORDS):
    """``[(signature name, {input: ndarray})]`` of the predict records in a version's warm-up file
    (``[]`` without one). ``ValueError`` naming the file for an unreadable file, a record that is not
    a predict log, or more than ``limit`` records."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(version_path, WARMUP_FILE)
    if not os.path.isfile(path):
        return []
    requests, framed = [], 0
    try:
        for index, record in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
            framed += len(record) + 16  # length (8 bytes) + its CRC (4) + record + its CRC (4)
            if index >= limit:
                raise ValueError(f"{path}: more than {limit} warm-up records")
            log = prediction_log_pb2.PredictionLog.FromString(record)
            if log.WhichOneof("log_type") != "predict_log":
                raise ValueError(f"{path}: record {index} is a {log.WhichOneof('log_type')}; only predict_log "
                                 "warm-up records are replayed")
            request = log.predict_log.request
            requests.append((request.model_spec.signature_name or DEFAULT_SIGNATURE,
                             {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}))
    except (tf.errors.OpError, ValueError, DecodeError) as err:
        if isinstance(err, ValueError) and str(err).startswith(path):
            raise
        raise ValueError(f"{path}: not a TFRecord file of PredictionLog protos ({err})") from None
    if framed != os.path.getsize(path):  # a file cut short (or not records) reads as fewer records, silently
        raise ValueError(f"{path}: not a TFRecord file of PredictionLog protos ({os.path.getsize(path) - framed} "
                         "bytes after the last whole record)")
    return requests


@dataclasses.dataclass(frozen=True)
class Signature:
    """A named function of a servable: ``inputs`` / ``outputs`` map names to ``tf.TensorSpec``."""

    name: str
    inputs: Mapping[str, Any]
    outputs: Mapping[str, Any]
    method_name: str = PREDICT_METHOD

    @classmethod
    def of(cls, name, inputs, outputs, method_name=PREDICT_METHOD) -> "Signature":
        return cls(name, dict(inputs), dict(outputs), method_name)

    def to_signature_def(self):
        """A ``SignatureDef`` proto (for signatures that do not come from a saved_model.pb)."""
        from tensorflow.core.protobuf import meta_graph_pb2

        sig = meta_graph_pb2.SignatureDef(method_name=self.method_name)
        for target, specs in ((sig.inputs, self.inputs), (sig.outputs, self.outputs)):
            for key, spec in specs.items():
                info = target[key]
                info.name = f"{self.name}_{key}:0"
                info.dtype = spec.dtype.as_datatype_enum
                info.tensor_shape.CopyFrom(spec.shape.as_proto())
        return sig


def dtype_name(dtype) -> str:
    """``DT_FLOAT`` style name of a ``tf.DType``."""
    from tensorflow.core.framework import types_pb2

    return types_pb2.DataType.Name(dtype.as_datatype_enum)


def shape_str(shape) -> str:
    """``[-1,3]`` style shape (``-1`` = any size), as TF Serving prints shapes."""
    if shape.rank is None:
        return "[?]"
    return "[" + ",".join("-1" if d is None else str(d) for d in shape.as_list()) + "]"


def _to_string_array(value: np.ndarray) -> Optional[np.ndarray]:
    if value.dtype == object:
        if all(isinstance(v, bytes) for v in value.flat):
            return value
        if all(isinstance(v, (bytes, str)) for v in value.flat):
            flat = [v.encode("utf-8") if isinstance(v, str) else v for v in value.flat]
            return np.array(flat, dtype=object).reshape(value.shape)
        return None
    if value.dtype.kind == "S":
        return value.astype(object)
    if value.dtype.kind == "U":
        return np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(value) if value.size else value.astype(object)
    return None


def check_input_names(signature: Signature, names) -> None:
    """INVALID_ARGUMENT unless ``names`` are exactly the signature's inputs (TF Serving's message)."""
    expected, given = set(signature.inputs), set(names)
    if expected != given:
        sent_extra, missing = sorted(given - expected), sorted(expected - given)
        raise ServingError.invalid_argument(
            f"input size does not match signature: {len(given)}!={len(expected)} "
            f"len({{{','.join(sorted(given))}}}) != len({{{','.join(sorted(expected))}}}). "
            f"Sent extra: {{{','.join(sent_extra)}}}. Missing but required: {{{','.join(missing)}}}."
        )


def validate_inputs(signature: Signature, inputs: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """Check names, dtypes and shapes of ``inputs`` against ``signature``; return numpy arrays.

    String inputs become object arrays of ``bytes``. Numeric dtypes must match
    exactly (as in TF Serving: an int64 tensor for an int32 input is an error).
    """
    import tensorflow as tf

    check_input_names(signature, inputs)
    arrays = {}
    for name in sorted(signature.inputs):
        spec, value = signature.inputs[name], inputs[name]
        try:
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
        except ValueError as err:  # ragged nested lists
            raise ServingError.invalid_argument(f"input '{name}' is not a dense tensor: {err}") from None
        if spec.dtype == tf.string:
            converted = _to_string_array(array)
            if converted is None:
                raise ServingError.invalid_argument(
                    f"input '{name}' of signature '{signature.name}' expects {dtype_name(spec.dtype)}, "
                    f"got numpy {array.dtype}"
                )
            array = converted
        elif array.dtype != spec.dtype.as_numpy_dtype:
            got = array.dtype
            try:
                got = dtype_name(tf.as_dtype(array.dtype))
            except TypeError:
                pass
            raise ServingError.invalid_argument(
                f"input '{name}' of signature '{signature.name}' expects {dtype_name(spec.dtype)}, got {got}"
            )
        if not spec.shape.is_compatible_with(array.shape):
            raise ServingError.invalid_argument(
                f"input '{name}' of signature '{signature.name}' expects shape {shape_str(spec.shape)}, "
                f"got shape {list(array.shape)}"
            )
        arrays[name] = array
    return arrays


class Servable:
    """One loaded version of a model.

    Attributes:
        name: ``str`` model name; version: ``int``.
        signatures: ``dict[str, Signature]`` runnable by :meth:`run`.
    """

    platform = "tensorflow"

    def __init__(self, name: str, version: int):
        self.name, self.version = name, int(version)
        self.signatures: Dict[str, Signature] = {}
        self._batchers = {}
        self._batch_scheduler = None
        self._batch_options = None
        self._lock = threading.Lock()

    def signature(self, name: str) -> Signature:
        """The signature called ``name`` (empty = ``serving_default``); ``ServingError`` if absent."""
        name = name or DEFAULT_SIGNATURE
        try:
            return self.signatures[name]
        except KeyError:
            raise SignatureNotFound(name, sorted(self.signatures)) from None

    def signature_def_map(self):
        """``SignatureDefMap`` proto for GetModelMetadata."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        result = get_model_metadata_pb2.SignatureDefMap()
        for name, sig in self.signatures.items():
            result.signature_def[name].CopyFrom(sig.to_signature_def())
        return result

    def attach_batching(self, scheduler, options=None) -> None:
        """Route :meth:`run` through ``scheduler`` (an ``export.server.batching.BatchScheduler``),
        batching with ``options`` (a ``BatchingOptions``; default the scheduler's)."""
        self._batch_scheduler, self._batch_options = scheduler, options

    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run a signature on validated inputs (batched with concurrent calls when batching is on)."""
        signature = self.signature(signature_name)
        if self._batch_scheduler is not None:
            with self._lock:
                batcher = self._batchers.get(signature.name)
                if batcher is None:
                    batcher = self._batch_scheduler.batcher(self, signature, self._batch_options)
                    self._batchers[signature.name] = batcher
            if batcher is not None:
                return batcher.run(inputs)
        return self.run_unbatched(signature, inputs)

    def run_unbatched(self, signature: Signature, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Drain and stop batchers; release the model (called once no request holds it)."""
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            if batcher is not None:
                batcher.close()


class SignatureNotFound(ServingError):
    """The requested signature does not exist (FAILED_PRECONDITION, as TF Serving's Predict)."""

    def __init__(self, name: str, available):
        super().__init__(
            grpc.StatusCode.FAILED_PRECONDITION,
            f'Serving signature key "{name}" not found. Available: {", ".join(available) or "none"}.',
        )
        self.signature_name = name


def _saved_model_path(export_dir: str) -> str:
    import tensorflow as tf

    for filename in ("saved_model.pb", "saved_model.pbtxt"):
        path = os.path.join(export_dir, filename)
        if tf.io.gfile.exists(path):
            return path
    raise FileNotFoundError(f"no saved_model.pb or saved_model.pbtxt in {export_dir}")


def read_saved_model_proto(export_dir: str):
    """Parse ``saved_model.pb`` (or ``.pbtxt``) of ``export_dir``."""
    from tensorflow.python.saved_model import loader_impl

    _saved_model_path(export_dir)
    return loader_impl.parse_saved_model(export_dir)


def uses_scann_ops(saved_model_proto) -> bool:
    """Whether any meta graph uses ScaNN's custom ops (``Scann>...``)."""

    def is_scann(op: str) -> bool:
        return op.startswith("Scann")  # registered as "Scann>ScannSearch", ...

    for meta_graph in saved_model_proto.meta_graphs:
        if any(is_scann(op.name) for op in meta_graph.meta_info_def.stripped_op_list.op):
            return True
        graph = meta_graph.graph_def
        if any(is_scann(node.op) for node in graph.node):
            return True
        for function in graph.library.function:
            if any(is_scann(node.op) for node in function.node_def):
                return True
    return False


def ensure_scann_ops() -> None:
    """Register ScaNN's custom ops (``import scann``); a clear error when it is not installed."""
    with _scann_lock:
        try:
            import scann  # noqa: F401  (registers the Scann>... ops with TensorFlow)
        except ImportError as err:
            raise ServingError.failed_precondition(
                f"this SavedModel uses ScaNN ops but `import scann` failed ({err}); install scann matching TensorFlow"
            ) from None


class SavedModelServable(Servable):
    """A SavedModel version loaded with ``tf.saved_model.load``.

    Args:
        name: ``str``, model name. version: ``int``. path: ``str``, the version folder.
    """

    def __init__(self, name: str, version: int, path: str):
        import tensorflow as tf

        super().__init__(name, version)
        self.path = path
        proto = read_saved_model_proto(path)
        if uses_scann_ops(proto):
            ensure_scann_ops()
        meta_graph = proto.meta_graphs[0]
        self._signature_defs = dict(meta_graph.signature_def)
        self._loaded = tf.saved_model.load(path)
        for sig_name, fn in self._loaded.signatures.items():
            _, kwargs = fn.structured_input_signature
            outputs = fn.structured_outputs
            if not isinstance(outputs, Mapping):  # signatures always return dicts, but be safe
                outputs = {"output_0": outputs}
            method = self._signature_defs[sig_name].method_name if sig_name in self._signature_defs else PREDICT_METHOD
            self.signatures[sig_name] = Signature(sig_name, dict(kwargs), dict(outputs), method or PREDICT_METHOD)
        self._functions = dict(self._loaded.signatures)

    def warm_up(self) -> int:
        """Replay the version's warm-up requests (``WARMUP_FILE``, as TF Serving does at load); the
        number replayed. ``ValueError`` naming the file and record when one fails: the version does not
        load (TF Serving's behaviour too)."""
        requests = read_warmup_requests(self.path)
        for index, (name, inputs) in enumerate(requests):
            try:
                self.run_unbatched(self.signature(name), validate_inputs(self.signature(name), inputs))
            except ServingError as err:
                raise ValueError(f"{os.path.join(self.path, WARMUP_FILE)}: warm-up record {index} "
                                 f"({name}) failed: {err.message}") from None
        return len(requests)

    def signature_def_map(self):
        from tensorflow_serving.apis import get_model_metadata_pb2

        result = get_model_metadata_pb2.SignatureDefMap()
        for name, sig in self._signature_defs.items():
            result.signature_def[name].CopyFrom(sig)
        return result

    def run_unbatched(self, signature: Signature, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import tensorflow as tf

        fn = self._functions[signature.name]
        tensors = {k: tf.convert_to_tensor(v, dtype=signature.inputs[k].dtype) for k, v in inputs.items()}
        try:
            outputs = fn(**tensors)
        except Exception as err:  # noqa: BLE001 - op errors keep their canonical code
            raise ServingError.from_exception(err) from None
        return {k: v.numpy() for k, v in outputs.items()}

    def close(self) -> None:
        super().close()
        self._functions = {}
        self._loaded = None


class PythonServable(Servable):
    """Base class of composite servables implemented in Python.

    Subclasses set ``signatures`` (``dict[str, Signature]``, class attribute or in
    ``__init__`` after ``super().__init__``) and implement :meth:`compute`.
    ``self.context`` is the serving core: ``self.context.predict_outputs(model,
    inputs, signature=..., version=None)`` returns the output dict of another
    loaded model, going through version resolution, reference counting and
    batching like any request. Inputs reach ``compute`` validated against the
    signature; outputs must hold every declared output name.

    Configure one with ``model_platform: 'python'`` and ``base_path: 'pkg.module:factory'``
    where ``factory(name, context)`` returns the servable (a subclass itself works);
    ``base_path: 'pkg.module:factory?key=value&...'`` calls ``factory(name, context, key="value", ...)``.
    The server builds it only when ``pkg.module`` is in ``--allowed_python_modules``.

    Args:
        name: ``str``, model name. context: the serving core (``None`` outside a server).
        version: ``int``, default 1.
    """

    platform = "python"
    signatures: Dict[str, Signature] = {}

    def __init__(self, name: str, context=None, version: int = 1):
        declared = dict(type(self).signatures)
        super().__init__(name, version)
        self.signatures = declared
        self.context = context

    def compute(self, signature: str, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def run_unbatched(self, signature: Signature, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        try:
            outputs = self.compute(signature.name, inputs)
        except ServingError:
            raise
        except Exception as err:  # noqa: BLE001
            raise ServingError.from_exception(err) from None
        missing = set(signature.outputs) - set(outputs)
        if missing:
            raise ServingError(
                grpc.StatusCode.INTERNAL,
                f"{type(self).__name__}.compute returned no output(s) {sorted(missing)} for '{signature.name}'",
            )
        return {k: np.asarray(outputs[k]) for k in signature.outputs}
