"""Malformed requests by class, with the status TF Serving answers each with.

Used by the fuzz test (``tests/test_server_fuzz.py``) and ``benchmarks/robustness.py``:
:func:`rest_cases` and :func:`grpc_cases` generate reproducible bad requests (raw HTTP
bytes, raw gRPC request bytes) against a server serving a ``half_plus_two``-style model
(``serving_default``: float32 ``x`` of shape ``[None]``); :func:`send_rest` and
:func:`send_grpc` send one and return the code received (an HTTP status ``int`` or a
``grpc.StatusCode`` name), never raising for a refused request.

Example::

    >>> import random
    >>> cases = rest_cases(random.Random(0), per_class=2, port=8501)
    >>> sorted(cases)[:3]
    ['bad_chunk_size', 'bad_content_length', 'bad_json']
    >>> cases["deep_json"][0].expected
    400
"""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import string
from typing import Dict, List, Optional, Union

import grpc

PREDICT = "/tensorflow.serving.PredictionService/Predict"
METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
STATUS = "/tensorflow.serving.ModelService/GetModelStatus"
RELOAD = "/tensorflow.serving.ModelService/HandleReloadConfigRequest"


@dataclasses.dataclass
class Case:
    """One bad request: ``payload`` (raw bytes), ``method`` (gRPC method path, REST: ``None``)
    and the ``expected`` answer (HTTP status or ``grpc.StatusCode`` name)."""

    payload: bytes
    expected: Union[int, str]
    method: Optional[str] = None


def _junk(rng: random.Random, size: int) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(size))


def _http(method: str, path: str, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
          port: int = 8501) -> bytes:
    head = {"Host": f"localhost:{port}", "Content-Length": str(len(body)), **(headers or {})}
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def rest_cases(rng: random.Random, per_class: int, port: int, model: str = "half_plus_two",
               max_body_bytes: int = 1 << 20) -> Dict[str, List[Case]]:
    """``{class: [Case, ...]}`` of bad REST requests (``per_class`` each)."""
    url = f"/v1/models/{model}:predict"
    cases: Dict[str, List[Case]] = {}

    def add(name, payload, expected):
        cases.setdefault(name, []).append(Case(payload, expected))

    for _ in range(per_class):
        garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        add("bad_json", _http("POST", url, b"{" + garbage, port=port), 400)
        depth = rng.choice([33, 34, 50, 200, 990, 3000])
        add("deep_json", _http("POST", url, ('{"instances": ' + "[" * depth + "1" + "]" * depth + "}").encode(),
                               port=port), 400)
        size = rng.choice(["zz", "-5", "", "1" * 20, "0x1", "+3", _junk(rng, 5) + "!"])
        add("bad_chunk_size", _http("POST", url, f"{size}\r\n{{}}\r\n0\r\n\r\n".encode(),
                                    {"Transfer-Encoding": "chunked", "Content-Length": None}, port=port), 400)
        value = rng.choice(['"a"', "true", "null", '{"k": 1}', "[1, [2]]", '{"b64": "@@"}'])
        add("wrong_types", _http("POST", url, f'{{"instances": [1.0, {value}]}}'.encode(), port=port), 400)
        add("unknown_model", _http("POST", f"/v1/models/{_junk(rng, rng.randrange(1, 1024))}:predict",
                                   b'{"instances": [1.0]}', port=port), 404)
        body = json.dumps({"signature_name": _junk(rng, rng.randrange(1, 1024)), "instances": [1.0]}).encode()
        add("unknown_signature", _http("POST", url, body, port=port), 400)
        add("bad_path", _http("POST", f"/v1/{_junk(rng, rng.randrange(1, 64))}:frobnicate", b"{}", port=port), 400)
        add("oversized_body", _http("POST", url, b"", {"Content-Length": str(max_body_bytes + rng.randrange(1, 10**9))},
                                    port=port), 400)
        add("foreign_host", _http("POST", url, b'{"instances": [1.0]}',
                                  {"Host": f"{_junk(rng, 8).lower()}.example", "Content-Type": "text/plain"},
                                  port=port), 403)
        add("bad_content_length", _http("POST", url, b"", {"Content-Length": rng.choice(["abc", "-1", "1e3", "0x10"])},
                                        port=port), 400)
    return cases


def grpc_cases(rng: random.Random, per_class: int, model: str = "half_plus_two",
               max_message_bytes: int = 4 << 20) -> Dict[str, List[Case]]:
    """``{class: [Case, ...]}`` of bad gRPC requests (``per_class`` each; fewer oversized ones)."""
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_management_pb2,
        predict_pb2,
    )

    cases: Dict[str, List[Case]] = {}

    def add(name, method, message, expected):
        payload = message if isinstance(message, bytes) else message.SerializeToString()
        cases.setdefault(name, []).append(Case(payload, expected, method))

    def predict(name=model, signature="", **inputs):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        request.model_spec.signature_name = signature
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(value if not isinstance(value, np.ndarray) else tf.make_tensor_proto(value))
        return request

    good = np.array([1.0, 2.0], np.float32)
    for i in range(per_class):
        # field number 0 is never valid: these bytes cannot parse as a PredictRequest
        add("garbage", PREDICT, b"\x00" + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))), "INTERNAL")
        add("unknown_model", PREDICT, predict(_junk(rng, rng.randrange(1, 1024)), x=good), "NOT_FOUND")
        bad = rng.choice([np.array([1, 2], np.int64), np.array([b"a"], object), np.array([1.0], np.float64)])
        add("wrong_dtype", PREDICT, predict(x=bad), "INVALID_ARGUMENT")
        proto = tf.make_tensor_proto(good)
        proto.tensor_shape.dim[0].size = rng.choice([-3, 7, 10**12])
        add("bad_shape", PREDICT, predict(x=proto), "INVALID_ARGUMENT")
        add("unknown_signature", PREDICT, predict(signature=_junk(rng, rng.randrange(1, 1024)), x=good),
            "FAILED_PRECONDITION")
        add("extra_input", PREDICT, predict(x=good, **{_junk(rng, 12): good}), "INVALID_ARGUMENT")
        metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[_junk(rng, 10)])
        metadata.model_spec.name = model
        add("bad_metadata_field", METADATA, metadata, "INVALID_ARGUMENT")
        status = get_model_status_pb2.GetModelStatusRequest()
        status.model_spec.name = model
        status.model_spec.version_label = _junk(rng, 16)
        add("unknown_label", STATUS, status, "INVALID_ARGUMENT")
        reload = model_management_pb2.ReloadConfigRequest()
        reload.config.model_config_list.config.add(
            name=f"victim{i}", base_path=rng.choice(["shutil:rmtree", "os:system?command=true", "builtins:exec"]),
            model_platform="python")
        add("reload_attack", RELOAD, reload, "PERMISSION_DENIED")
        if i < max(1, per_class // 10):
            big = predict(x=np.zeros(max_message_bytes // 4 + 1024, np.float32))
            add("oversized_message", PREDICT, big, "RESOURCE_EXHAUSTED")
    return cases


def _status_of(response: bytes) -> int:
    try:
        return int(response.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0  # no HTTP answer: counted as a failure by callers


def send_rest(port: int, payload: bytes, timeout: float = 30.0) -> int:
    """Send one raw HTTP request on a new connection; the status answered (0: none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
        except OSError:  # the server may close before reading a body it refused
            pass
        data = b""
        while b"\r\n\r\n" not in data:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        return _status_of(data)


def send_grpc(channel: grpc.Channel, case: Case, timeout: float = 30.0) -> str:
    """Send one raw gRPC request; the status code name answered (``OK`` if accepted)."""
    call = channel.unary_unary(case.method, request_serializer=None, response_deserializer=None)
    try:
        call(case.payload, timeout=timeout)
    except grpc.RpcError as err:
        return err.code().name
    return "OK"
