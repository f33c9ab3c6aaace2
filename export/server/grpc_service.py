"""gRPC services: ``tensorflow.serving.PredictionService`` and ``ModelService``.

Built on the ``tensorflow-serving-api`` servicer classes, so the stock
``PredictionServiceStub`` / ``ModelServiceStub`` talk to it unmodified:
Predict, GetModelMetadata, Classify, Regress (MultiInference answers
UNIMPLEMENTED), GetModelStatus and HandleReloadConfigRequest. Failures abort
the call with the status code TF Serving uses (see ``export.server.errors``).

Example (not run as a doctest: it needs a gRPC server and a serving core;
`tests/test_server_grpc.py` builds both)::

    >>> from concurrent.futures import ThreadPoolExecutor
    >>> server = grpc.server(ThreadPoolExecutor(8))
    >>> add_services(server, core)                                        # doctest: +SKIP
"""

from __future__ import annotations

import logging

import grpc
import numpy as np
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from export.server.config import from_model_server_config
from export.server.core import TRIM_AFTER_BYTES, ModelRef, ServingCore, release_memory
from export.server.errors import ServingError, clean_message, wire_message
from export.server.servable import Signature, check_input_names, dtype_name

logger = logging.getLogger(__name__)

# Elements beyond the values given are filled with the last value (TF semantics);
# cap how far a small proto may expand, so a tiny request cannot allocate gigabytes.
MAX_FILLED_ELEMENTS = 1 << 24

_VALUE_FIELDS = {
    "DT_FLOAT": "float_val", "DT_DOUBLE": "double_val", "DT_INT32": "int_val", "DT_INT16": "int_val",
    "DT_INT8": "int_val", "DT_UINT8": "int_val", "DT_UINT16": "int_val", "DT_INT64": "int64_val",
    "DT_STRING": "string_val", "DT_BOOL": "bool_val", "DT_HALF": "half_val", "DT_BFLOAT16": "half_val",
    "DT_UINT32": "uint32_val", "DT_UINT64": "uint64_val",
}


def model_ref(spec: model_pb2.ModelSpec) -> ModelRef:
    """The :class:`ModelRef` of a request's ``ModelSpec``."""
    choice = spec.WhichOneof("version_choice")
    return ModelRef(
        name=spec.name,
        version=spec.version.value if choice == "version" else None,
        label=spec.version_label if choice == "version_label" else None,
        signature=spec.signature_name,
    )


def _model_spec(name: str, version: int, signature: str = "") -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=name, signature_name=signature)
    spec.version.value = version
    return spec


def tensor_proto_to_ndarray(name: str, proto, spec) -> np.ndarray:
    """Decode one request ``TensorProto`` for input ``name`` declared as ``spec`` (dtype checked strictly)."""
    import tensorflow as tf
    from tensorflow.core.framework import types_pb2

    if proto.dtype != spec.dtype.as_datatype_enum:
        got = types_pb2.DataType.Name(proto.dtype) if proto.dtype in types_pb2.DataType.values() else proto.dtype
        raise ServingError.invalid_argument(f"input '{name}' expects {dtype_name(spec.dtype)}, got {got}")
    dims = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in dims):
        raise ServingError.invalid_argument(f"input '{name}' has a negative dimension in shape {dims}")
    size = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if not proto.tensor_content:
        field = _VALUE_FIELDS.get(types_pb2.DataType.Name(proto.dtype))
        count = len(getattr(proto, field)) if field else size
        if count > size or (count < size and (count == 0 or size > MAX_FILLED_ELEMENTS)):
            raise ServingError.invalid_argument(
                f"input '{name}' has {count} values for shape {dims} ({size} elements)"
            )
    try:
        return tf.make_ndarray(proto)
    except Exception as err:  # noqa: BLE001 - malformed proto -> INVALID_ARGUMENT
        raise ServingError.invalid_argument(f"input '{name}' is not a valid TensorProto: {err}") from None


def ndarray_to_tensor_proto(value: np.ndarray, use_tensor_content: bool = False):
    """A response ``TensorProto``: typed value fields (``float_val``, ``int64_val``,
    ``string_val`` ...), as TF Serving's ``Tensor::AsProtoField`` by default; packed
    ``tensor_content`` with ``use_tensor_content`` (TF Serving's ``use_tensor_content``
    option). Both read back with ``tf.make_ndarray``.

    >>> proto = ndarray_to_tensor_proto(np.array([[1.5, 2.0]], np.float32))
    >>> list(proto.float_val), [d.size for d in proto.tensor_shape.dim], proto.tensor_content
    ([1.5, 2.0], [1, 2], b'')
    >>> list(ndarray_to_tensor_proto(np.array([b"a", b"b"], object)).string_val)
    [b'a', b'b']
    """
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2, types_pb2

    value = np.asarray(value)
    if value.dtype.kind == "U":
        return tf.make_tensor_proto(value)
    try:
        dtype = tf.as_dtype(value.dtype) if value.dtype != object else tf.string
    except TypeError:
        return tf.make_tensor_proto(value)
    field = _VALUE_FIELDS.get(types_pb2.DataType.Name(dtype.as_datatype_enum))
    if field is None:
        return tf.make_tensor_proto(value)
    proto = tensor_pb2.TensorProto(dtype=dtype.as_datatype_enum)
    proto.tensor_shape.CopyFrom(tf.TensorShape(value.shape).as_proto())
    flat = value.ravel()
    if use_tensor_content and field != "string_val":
        proto.tensor_content = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
    elif field == "string_val":
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode("utf-8") for v in flat)
    elif field == "half_val":  # float16 / bfloat16 travel as their 16 bits
        proto.half_val.extend(flat.view(np.uint16).tolist())
    else:
        getattr(proto, field).extend(flat.tolist())
    return proto


def _decode_request_inputs(signature: Signature, inputs) -> dict:
    check_input_names(signature, inputs.keys())
    return {k: tensor_proto_to_ndarray(k, v, signature.inputs[k]) for k, v in inputs.items()}


def serialized_examples(input_proto) -> list:
    """Serialized ``tf.Example`` s of a Classify/Regress ``Input`` (context merged as TF Serving does)."""
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        return [e.SerializeToString() for e in input_proto.example_list.examples]
    if kind == "example_list_with_context":
        with_context = input_proto.example_list_with_context
        context = with_context.context.SerializeToString()
        return [context + e.SerializeToString() for e in with_context.examples]
    return []


def _abort(context, err: BaseException):
    error = ServingError.from_exception(err)
    context.abort(error.code, wire_message(error.message))


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService`` over a :class:`ServingCore`.

    Predict outputs fill the typed value fields (TF Serving's default) unless
    ``use_tensor_content`` packs them into ``tensor_content``.
    """

    def __init__(self, core: ServingCore, use_tensor_content: bool = False):
        self.core = core
        self.use_tensor_content = use_tensor_content

    def Predict(self, request, context):  # noqa: N802 - gRPC method name
        try:
            result = self.core.predict(
                model_ref(request.model_spec), request.inputs, decode=_decode_request_inputs,
                output_filter=list(request.output_filter), protocol="grpc", input_names=tuple(request.inputs),
            )
            response = predict_pb2.PredictResponse(
                model_spec=_model_spec(result.name, result.version, result.signature)
            )
            for key, value in result.outputs.items():
                response.outputs[key].CopyFrom(ndarray_to_tensor_proto(value, self.use_tensor_content))
            return response
        except Exception as err:  # noqa: BLE001
            _abort(context, err)
        finally:
            if request.ByteSize() > TRIM_AFTER_BYTES:
                release_memory()

    def GetModelMetadata(self, request, context):  # noqa: N802
        try:
            name, version, signature_defs = self.core.metadata(
                model_ref(request.model_spec), list(request.metadata_field), protocol="grpc"
            )
            response = get_model_metadata_pb2.GetModelMetadataResponse(model_spec=_model_spec(name, version))
            response.model_spec.ClearField("signature_name")
            response.metadata["signature_def"].Pack(signature_defs)
            return response
        except Exception as err:  # noqa: BLE001
            _abort(context, err)

    def Classify(self, request, context):  # noqa: N802
        try:
            name, version, signature, results = self.core.classify(
                model_ref(request.model_spec), serialized_examples(request.input), protocol="grpc"
            )
            response = classification_pb2.ClassificationResponse(model_spec=_model_spec(name, version, signature))
            for row in results:
                classifications = response.result.classifications.add()
                for label, score in row:
                    classifications.classes.add(label=label, score=score)
            return response
        except Exception as err:  # noqa: BLE001
            _abort(context, err)

    def Regress(self, request, context):  # noqa: N802
        try:
            name, version, signature, values = self.core.regress(
                model_ref(request.model_spec), serialized_examples(request.input), protocol="grpc"
            )
            response = regression_pb2.RegressionResponse(model_spec=_model_spec(name, version, signature))
            for value in values:
                response.result.regressions.add(value=value)
            return response
        except Exception as err:  # noqa: BLE001
            _abort(context, err)


def status_response(records) -> get_model_status_pb2.GetModelStatusResponse:
    """``GetModelStatusResponse`` for registry version records."""
    response = get_model_status_pb2.GetModelStatusResponse()
    for record in records:
        status = response.model_version_status.add(
            version=record.version, state=get_model_status_pb2.ModelVersionStatus.State.Value(record.state)
        )
        status.status.SetInParent()
        if record.error is not None:
            status.status.error_code = record.error.code.value[0]
            status.status.error_message = clean_message(record.error.message)
    return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService``: GetModelStatus and HandleReloadConfigRequest."""

    def __init__(self, core: ServingCore):
        self.core = core

    def GetModelStatus(self, request, context):  # noqa: N802
        try:
            return status_response(self.core.status(model_ref(request.model_spec), protocol="grpc"))
        except Exception as err:  # noqa: BLE001
            _abort(context, err)

    def HandleReloadConfigRequest(self, request, context):  # noqa: N802
        response = model_management_pb2.ReloadConfigResponse()
        try:
            if request.config.WhichOneof("config") != "model_config_list":
                raise ServingError.invalid_argument(
                    "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                    "Only ModelConfigList is currently supported"
                )
            configs = from_model_server_config(request.config, source="ReloadConfigRequest")
            before = set(self.core.registry.model_names())
            self.core.registry.reload_config(configs)
            errors = self.core.registry.model_errors()
            failed = [f"{c.name}: {errors[c.name]}" for c in configs if c.name in errors and c.name not in before]
            if failed:  # applied: the other models load and serve; these report why they cannot
                raise ServingError.invalid_argument(
                    "config applied, but some models cannot be served: " + "; ".join(failed))
            response.status.SetInParent()
            return response
        except ServingError as err:
            error = err
        except ValueError as err:  # a bad config names the offending model
            error = ServingError.invalid_argument(str(err))
        except Exception as err:  # noqa: BLE001
            error = ServingError.from_exception(err)
        logger.error("config reload failed: %s", error.message)
        context.abort(error.code, wire_message(error.message))


def add_services(server: grpc.Server, core: ServingCore, use_tensor_content: bool = False) -> None:
    """Register both services of ``core`` on a ``grpc.Server``."""
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(core, use_tensor_content), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(core), server)
