"""The protocol-independent serving core: Predict, Classify, Regress, metadata and status.

gRPC (``grpc_service``) and REST (``rest``) only translate wire formats; every
request goes through :class:`ServingCore`, which resolves the model version
(taking a reference for the request's duration), finds the signature, decodes
and validates inputs, runs the model (batched when enabled), and records metrics.

Example (in-process: a registry serving the toy model, no server or network)::

    >>> import os, tempfile
    >>> import numpy as np
    >>> from export.server.config import ServedModelConfig
    >>> from export.server.models import ModelRegistry
    >>> from export.server.testing import save_toy_model
    >>> base = tempfile.mkdtemp()
    >>> _ = save_toy_model(os.path.join(base, "2"), scale=2.0)
    >>> registry = ModelRegistry([ServedModelConfig("m", base)], poll_wait_seconds=1)
    >>> registry.start()
    >>> registry.wait_until_available("m")
    True
    >>> core = ServingCore(registry)
    >>> result = core.predict(ModelRef("m"), {"x": np.ones((1, 3), np.float32)})
    >>> result.version, sorted(result.outputs), result.outputs["total"].tolist()
    (2, ['total', 'y'], [6.0])
    >>> registry.close()
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import grpc
import numpy as np

from export.server.errors import ServingError
from export.server.metrics import UNKNOWN
from export.server.servable import (
    CLASSIFY_METHOD,
    DEFAULT_SIGNATURE,
    PREDICT_METHOD,
    REGRESS_METHOD,
    Signature,
    validate_inputs,
)


TRIM_AFTER_BYTES = 1 << 20  # after a body this large, give freed heap memory back to the OS


def _load_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``), so RSS falls after a large request."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """What a request asks for: model ``name``, optional ``version`` or ``label``, a ``signature``."""

    name: str
    version: Optional[int] = None
    label: Optional[str] = None
    signature: str = ""

    @property
    def signature_name(self) -> str:
        return self.signature or DEFAULT_SIGNATURE


@dataclasses.dataclass
class PredictResult:
    """Outputs of one request and which servable produced them."""

    name: str
    version: int
    signature: str
    outputs: Dict[str, np.ndarray]


def _fits_classify(sig: Signature) -> Optional[str]:
    """Why ``sig`` cannot serve Classify (``None`` if it can)."""
    import tensorflow as tf

    if sig.method_name == CLASSIFY_METHOD:
        if "inputs" not in sig.inputs:
            return "classification signature has no 'inputs' input"
    elif sig.method_name != PREDICT_METHOD:
        return f"Expected classification signature method_name to be {CLASSIFY_METHOD}. Was: {sig.method_name}"
    if len(sig.inputs) != 1 or next(iter(sig.inputs.values())).dtype != tf.string:
        return "Classify needs one DT_STRING input (serialized tf.Example)"
    if not {"classes", "scores"} & set(sig.outputs):
        return 'Expected classification signature outputs to contain at least one of "classes" or "scores"'
    return None


def _fits_regress(sig: Signature) -> Optional[str]:
    import tensorflow as tf

    if sig.method_name == REGRESS_METHOD:
        if "inputs" not in sig.inputs:
            return "regression signature has no 'inputs' input"
    elif sig.method_name != PREDICT_METHOD:
        return f"Expected regression signature method_name to be {REGRESS_METHOD}. Was: {sig.method_name}"
    if len(sig.inputs) != 1 or next(iter(sig.inputs.values())).dtype != tf.string:
        return "Regress needs one DT_STRING input (serialized tf.Example)"
    if "outputs" not in sig.outputs:
        return "No regression outputs found in signature (expected an output named 'outputs')"
    return None


class ServingCore:
    """Request handling shared by gRPC and REST.

    Args:
        registry: ``ModelRegistry``.
        metrics: optional ``ServingMetrics``.
        histories: optional ``export.server.user_history.UserHistories``: requests may name
            ``user_id`` instead of ``history``, and :meth:`ingest_events` appends events.
        items: optional ``export.server.items.ItemsEndpoint``: :meth:`add_items` embeds new items
            into a delta file.
    """

    def __init__(self, registry, metrics=None, histories=None, items=None):
        self.registry = registry
        self.metrics = metrics
        self.histories = histories
        self.items = items
        self._lock = threading.Condition()
        self._in_flight = 0
        self._draining = False

    # --- draining -------------------------------------------------------------------
    def start_draining(self) -> None:
        """Refuse new requests (UNAVAILABLE); in-flight ones finish."""
        with self._lock:
            self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until no request is in flight; ``False`` on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    @contextlib.contextmanager
    def _request(self, ref: ModelRef, api: str, protocol: str):
        with self._lock:
            # Calls made by composite servables (protocol "internal") belong to a request
            # already in flight, so draining must not refuse them.
            if self._draining and protocol != "internal":
                raise ServingError.unavailable("Server is shutting down")
            self._in_flight += 1
        if self.metrics is not None:
            self.metrics.in_flight.inc((), 1)
        started, code = time.perf_counter(), "OK"
        # Metric labels: set to served names once resolved (see _label); clients' strings never become labels.
        labels = {"model": UNKNOWN, "signature": UNKNOWN}
        try:
            yield labels
        except ServingError as err:
            code = err.code.name
            raise
        except Exception as err:  # noqa: BLE001 - surface as a status, never a crash
            converted = ServingError.from_exception(err)
            code = converted.code.name
            raise converted from None
        finally:
            if self.metrics is not None:
                self.metrics.in_flight.inc((), -1)
                self.metrics.record_request(
                    labels["model"], labels["signature"], api, protocol, code, time.perf_counter() - started
                )
            with self._lock:
                self._in_flight -= 1
                if not self._in_flight:
                    self._lock.notify_all()

    def _acquire(self, ref: ModelRef):
        return self.registry.acquire(ref.name, ref.version, ref.label)

    # --- APIs -----------------------------------------------------------------------
    def predict(
        self,
        ref: ModelRef,
        inputs: Any,
        decode: Optional[Callable[[Signature, Any], Mapping[str, Any]]] = None,
        output_filter: Sequence[str] = (),
        protocol: str = "python",
        input_names: Optional[Sequence[str]] = None,
    ) -> PredictResult:
        """Run signature ``ref.signature`` of the model ``ref`` names.

        Args:
            ref: :class:`ModelRef`.
            inputs: ``{name: array}``, or any wire payload ``decode`` understands.
            decode: ``decode(signature, inputs) -> {name: array}``; runs once the
                signature is known (wire formats need its dtypes).
            output_filter: output names to return (default all).
            protocol: label for metrics (``grpc``, ``rest``, ``python``; ``internal`` for
                calls made by composite servables, which draining does not refuse).
            input_names: the input names the request sends (default: the keys of ``inputs``);
                ``user_id`` in place of ``history`` is a request by user id
                (``export.server.user_history``).
        """
        with self._request(ref, "predict", protocol) as labels, self._acquire(ref) as servable:
            labels["model"] = servable.name
            signature = servable.signature(ref.signature_name)
            labels["signature"] = signature.name
            if input_names is None:
                input_names = tuple(inputs) if isinstance(inputs, Mapping) else ()
            by_user = self._by_user(signature, input_names)
            wire_signature = self.histories.by_user_signature(signature, input_names) if by_user else signature
            arrays = decode(wire_signature, inputs) if decode is not None else inputs
            if by_user:
                arrays = self.histories.replace_user_ids(validate_inputs(wire_signature, arrays), signature,
                                                         servable.name)
            arrays = validate_inputs(signature, arrays)
            wanted = list(output_filter)
            seen = set()
            for alias in wanted:
                if alias not in signature.outputs:
                    raise ServingError.invalid_argument(
                        f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                        f"{{{','.join(sorted(signature.outputs))}}}."
                    )
                if alias in seen:
                    raise ServingError.invalid_argument(f"duplicate output tensor alias: {alias}")
                seen.add(alias)
            outputs = servable.run(signature.name, arrays)
            if wanted:
                outputs = {k: outputs[k] for k in wanted}
            return PredictResult(servable.name, servable.version, signature.name, outputs)

    def _by_user(self, signature: Signature, input_names) -> bool:
        from export.server.user_history import USER_ID, has_history_input

        if self.histories is not None:
            return self.histories.wants_user_ids(signature, input_names)
        if USER_ID in input_names and has_history_input(signature):
            raise ServingError.failed_precondition(
                f"requests by {USER_ID} need a server with a history store (tfrec serve --history_store ...)")
        return False

    def ingest_events(self, document: Any, protocol: str = "python") -> dict:
        """Append the events of a ``{"events": [...]}`` document to the history store
        (``UserHistories.ingest``); UNIMPLEMENTED without a store."""
        with self._request(ModelRef(""), "events", protocol):
            if self.histories is None:
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                                   "event ingestion needs a server with a history store (tfrec serve --history_store ...)")
            return self.histories.ingest(document)

    def add_items(self, document: Any, protocol: str = "python") -> dict:
        """Embed the new items of a ``{"items": [...]}`` document and add them to the delta file
        (``ItemsEndpoint.add``); UNIMPLEMENTED without ``--items_delta``."""
        with self._request(ModelRef(""), "items", protocol):
            if self.items is None:
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                                   "adding items needs a server with a delta file and an encoder "
                                   "(tfrec serve --items_delta ... --items_model RUN | --items_encoder module:function)")
            return self.items.add(document)

    def _examples_call(self, ref, examples: Sequence[bytes], api: str, fits, protocol: str):
        with self._request(ref, api, protocol) as labels, self._acquire(ref) as servable:
            labels["model"] = servable.name
            name = ref.signature_name
            if name not in servable.signatures:
                raise ServingError.invalid_argument(f"No signature was found with the name: {name}")
            signature = servable.signatures[name]
            labels["signature"] = signature.name
            reason = fits(signature)
            if reason:
                raise ServingError.invalid_argument(f"signature '{name}' cannot serve {api.capitalize()}: {reason}")
            if not examples:
                raise ServingError.invalid_argument("Input is empty")
            input_name = next(iter(signature.inputs))
            arrays = validate_inputs(signature, {input_name: np.array(list(examples), dtype=object)})
            return servable, signature, servable.run(signature.name, arrays)

    def classify(self, ref: ModelRef, examples: Sequence[bytes], protocol: str = "python"):
        """Classify serialized ``tf.Example`` s: ``(name, version, signature, [[(label, score), ...], ...])``."""
        servable, signature, outputs = self._examples_call(ref, examples, "classify", _fits_classify, protocol)
        classes, scores = outputs.get("classes"), outputs.get("scores")
        for key, value, kind in (("classes", classes, "O"), ("scores", scores, "f")):
            if value is None:
                continue
            if value.ndim != 2 or value.shape[0] != len(examples):
                raise ServingError.invalid_argument(
                    f"Expected {key} Tensor shape: [batch_size num_classes] with batch_size {len(examples)}, "
                    f"got {list(value.shape)}"
                )
        if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
            raise ServingError.invalid_argument(
                f"Tensors class and score should match in dim_size(1). Got {classes.shape[1]} vs. {scores.shape[1]}"
            )
        num_classes = (classes if classes is not None else scores).shape[1]
        results = []
        for i in range(len(examples)):
            row = []
            for c in range(num_classes):
                label = classes[i, c] if classes is not None else b""
                label = label.decode("utf-8", "replace") if isinstance(label, bytes) else str(label)
                row.append((label, float(scores[i, c]) if scores is not None else 0.0))
            results.append(row)
        return servable.name, servable.version, signature.name, results

    def regress(self, ref: ModelRef, examples: Sequence[bytes], protocol: str = "python"):
        """Regress serialized ``tf.Example`` s: ``(name, version, signature, [value, ...])``."""
        servable, signature, outputs = self._examples_call(ref, examples, "regress", _fits_regress, protocol)
        values = outputs["outputs"]
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1 or values.shape[0] != len(examples) or values.dtype.kind != "f":
            raise ServingError.invalid_argument(
                f"Expected output Tensor shape to be either [batch_size] or [batch_size, 1] of floats "
                f"but got {list(outputs['outputs'].shape)} {values.dtype}"
            )
        return servable.name, servable.version, signature.name, [float(v) for v in values]

    def metadata(self, ref: ModelRef, fields: Sequence[str] = ("signature_def",), protocol: str = "python"):
        """``(name, version, SignatureDefMap)`` of the resolved servable."""
        with self._request(ref, "metadata", protocol) as labels:
            if not fields:
                raise ServingError.invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
            for field in fields:
                if field != "signature_def":
                    raise ServingError.invalid_argument(f"Metadata field {field} is not supported")
            with self._acquire(ref) as servable:
                labels["model"] = servable.name
                return servable.name, servable.version, servable.signature_def_map()

    def status(self, ref: ModelRef, protocol: str = "python"):
        """Version records of the model (``ModelRegistry.status``)."""
        with self._request(ref, "status", protocol) as labels:
            records = self.registry.status(ref.name, ref.version, ref.label)
            labels["model"] = ref.name  # status found the model: a configured name
            return records

    # --- for composite servables --------------------------------------------------------
    def predict_outputs(self, model: str, inputs: Mapping[str, Any], signature: str = DEFAULT_SIGNATURE,
                        version: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Outputs of another loaded model; what ``PythonServable.context.predict`` calls."""
        return self.predict(ModelRef(model, version, None, signature), dict(inputs), protocol="internal").outputs
