"""A Python client for TF Serving-compatible servers, built on the stock ``PredictionServiceStub``.

Works against ``tfrec serve`` and against TF Serving itself. Inputs may be numpy
arrays or (nested) lists; with ``cast=True`` (default) they are converted to the
signature's dtypes (read once per model/signature with GetModelMetadata), so
``{"history": ["a", "b"], "k": 10}`` reaches an int32 ``k`` as int32. Server
errors raise :class:`export.server.errors.ServingError` carrying the gRPC code.

Example (not run as a doctest: it needs a running model server; `tests/test_server_grpc.py`
starts one)::

    >>> with PredictClient("127.0.0.1:8500") as client:                     # doctest: +SKIP
    ...     out = client.predict("recommender", {"history": [["i1", "i7"]]}, signature="recommend")
    ...     out["item_ids"], out.version
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import grpc
import numpy as np
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from export.server.errors import ServingError, status_code_from_number

DEFAULT_SIGNATURE = "serving_default"


class PredictOutputs(dict):
    """Output name -> ``np.ndarray``, plus the ``model``, ``version`` and ``signature`` that answered."""

    model: str = ""
    version: int = 0
    signature: str = ""


def _error(err: grpc.RpcError) -> ServingError:
    return ServingError(err.code(), err.details() or str(err.code()))


def _signature_view(signature_def) -> dict:
    from tensorflow.core.framework import types_pb2

    def tensors(infos):
        return {
            name: {
                "dtype": types_pb2.DataType.Name(info.dtype),
                "shape": None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim],
            }
            for name, info in sorted(infos.items())
        }

    return {
        "method_name": signature_def.method_name,
        "inputs": tensors(signature_def.inputs),
        "outputs": tensors(signature_def.outputs),
    }


def _cast(name: str, value: Any, view: Optional[dict]) -> np.ndarray:
    """``value`` as an array of the dtype ``view`` declares (or as given when unknown)."""
    import tensorflow as tf

    if view is None or view["dtype"] not in _DTYPES:
        array = np.asarray(value)
        if array.dtype.kind == "U":
            array = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(array)
        return array
    dtype = tf.dtypes.as_dtype(_DTYPES[view["dtype"]])
    if dtype == tf.string:
        array = np.asarray(value, dtype=object)
        if any(isinstance(v, (list, tuple, np.ndarray)) for v in array.flat):
            raise ValueError(f"input '{name}' is ragged: every row must have the same length")
        flat = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in array.flat]
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(array.shape)
    try:
        array = np.asarray(value)
        if array.dtype == object or array.dtype.kind in "SU":
            array = array.astype(np.float64 if dtype.is_floating else np.int64)
    except (TypeError, ValueError):
        raise ValueError(f"input '{name}' expects {view['dtype']}, got {value!r}") from None
    target = np.dtype(dtype.as_numpy_dtype)
    converted = array.astype(target)
    if target.kind in "iub" and not np.array_equal(converted.astype(array.dtype), array):
        raise ValueError(f"input '{name}' expects {view['dtype']}; {value!r} does not fit without loss")
    return converted


_DTYPES = {
    "DT_FLOAT": "float32", "DT_DOUBLE": "float64", "DT_HALF": "float16", "DT_INT8": "int8", "DT_INT16": "int16",
    "DT_INT32": "int32", "DT_INT64": "int64", "DT_UINT8": "uint8", "DT_UINT16": "uint16", "DT_UINT32": "uint32",
    "DT_UINT64": "uint64", "DT_BOOL": "bool", "DT_STRING": "string",
}


class PredictClient:
    """Predict / metadata / status calls to one server.

    Args:
        address: ``"host:port"`` of the gRPC endpoint.
        channel: optional existing ``grpc.Channel`` (then ``address`` is only informative).
    """

    def __init__(self, address: str = "127.0.0.1:8500", channel: Optional[grpc.Channel] = None):
        self.address = address
        self._own_channel = channel is None
        self.channel = channel or grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 2**31 - 1)]
        )
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self._signatures: Dict[tuple, dict] = {}

    def __enter__(self) -> "PredictClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    @staticmethod
    def _spec(spec, model: str, version: Optional[int], label: Optional[str], signature: str = "") -> None:
        spec.name = model
        if version is not None and label:
            raise ValueError("pass either version or label, not both")
        if version is not None:
            spec.version.value = int(version)
        elif label:
            spec.version_label = label
        if signature:
            spec.signature_name = signature

    def metadata(self, model: str, version: Optional[int] = None, label: Optional[str] = None,
                 timeout: float = 10.0) -> dict:
        """``{"model", "version", "signatures": {name: {"method_name", "inputs", "outputs"}}}``.

        Each tensor is ``{"dtype": "DT_STRING", "shape": [-1, -1]}`` (-1 = any size).
        """
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec, model, version, label)
        try:
            response = self.stub.GetModelMetadata(request, timeout)
        except grpc.RpcError as err:
            raise _error(err) from None
        signature_defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_defs)
        return {
            "model": response.model_spec.name,
            "version": response.model_spec.version.value,
            "signatures": {
                name: _signature_view(sig)
                for name, sig in sorted(signature_defs.signature_def.items())
                if not name.startswith("__")
            },
        }

    def status(self, model: str, version: Optional[int] = None, label: Optional[str] = None,
               timeout: float = 10.0) -> list:
        """``[{"version", "state", "error_code", "error_message"}, ...]``, highest version first."""
        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, model, version, label)
        try:
            response = self.model_stub.GetModelStatus(request, timeout)
        except grpc.RpcError as err:
            raise _error(err) from None
        states = get_model_status_pb2.ModelVersionStatus.State
        return [
            {
                "version": s.version,
                "state": states.Name(s.state),
                "error_code": status_code_from_number(s.status.error_code).name,
                "error_message": s.status.error_message,
            }
            for s in response.model_version_status
        ]

    def clear_cache(self) -> None:
        """Forget cached signatures (after a new model version changed its inputs)."""
        self._signatures.clear()

    def signature(self, model: str, signature: str = DEFAULT_SIGNATURE, version: Optional[int] = None,
                  label: Optional[str] = None, timeout: float = 10.0) -> dict:
        """The metadata view of one signature (cached per model/version/label/signature)."""
        key = (model, version, label, signature)
        if key not in self._signatures:
            signatures = self.metadata(model, version, label, timeout)["signatures"]
            if signature not in signatures:
                raise ServingError.failed_precondition(
                    f'Serving signature key "{signature}" not found. Available: {", ".join(signatures)}.'
                )
            self._signatures[key] = signatures[signature]
        return self._signatures[key]

    def request(
        self,
        model: str,
        inputs: Mapping[str, Any],
        signature: str = DEFAULT_SIGNATURE,
        version: Optional[int] = None,
        label: Optional[str] = None,
        timeout: float = 10.0,
        output_filter: Optional[Sequence[str]] = None,
        cast: bool = True,
    ) -> predict_pb2.PredictRequest:
        """The ``PredictRequest`` :meth:`predict` sends (arguments as there), e.g. to send it many times
        with ``client.stub.Predict(request, timeout)`` (load generators)."""
        import tensorflow as tf

        views = self.signature(model, signature, version, label, timeout)["inputs"] if cast else {}
        request = predict_pb2.PredictRequest(output_filter=list(output_filter or ()))
        self._spec(request.model_spec, model, version, label, signature)
        for name, value in inputs.items():
            array = _cast(name, value, views.get(name)) if cast else _cast(name, value, None)
            request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
        return request

    def predict(
        self,
        model: str,
        inputs: Mapping[str, Any],
        signature: str = DEFAULT_SIGNATURE,
        version: Optional[int] = None,
        label: Optional[str] = None,
        timeout: float = 10.0,
        output_filter: Optional[Sequence[str]] = None,
        cast: bool = True,
    ) -> PredictOutputs:
        """Call Predict; returns output name -> array (with ``.version`` of the answering model).

        Args:
            model: model name. inputs: ``{name: np.ndarray | list | scalar}``.
            signature: signature name, default ``serving_default``.
            version / label: pin a version (default: the latest available).
            timeout: seconds. output_filter: output names to fetch (default all).
            cast: convert inputs to the signature's dtypes (one metadata call, cached).
        """
        import tensorflow as tf

        request = self.request(model, inputs, signature, version, label, timeout, output_filter, cast)
        try:
            response = self.stub.Predict(request, timeout)
        except grpc.RpcError as err:
            raise _error(err) from None
        outputs = PredictOutputs({k: tf.make_ndarray(v) for k, v in response.outputs.items()})
        outputs.model = response.model_spec.name
        outputs.version = response.model_spec.version.value
        outputs.signature = response.model_spec.signature_name
        return outputs

