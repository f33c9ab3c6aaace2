"""The model server over gRPC, through the stock tensorflow-serving-api stubs.

Every PredictionService / ModelService method on a real SavedModel, TF Serving's
status codes for malformed requests (the server keeps serving), request batching
(merges concurrent calls, same answers as unbatched), a ScaNN servable, a Python
composite servable, and the `PredictClient` / `tfrec query` client.
"""

import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from export.client import PredictClient
from export.server import BatchingOptions, ServedModelConfig, ModelServer, ServerOptions
from export.server.servable import read_saved_model_proto, uses_scann_ops
from export.server.testing import save_toy_model
from tfrec_cli import main

TOY_SCALE = 2.0


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("models") / "toy"
    save_toy_model(str(base / "1"), scale=TOY_SCALE)
    return base


@pytest.fixture(scope="module")
def server(toy_base):
    configs = [
        ServedModelConfig("toy", str(toy_base), version_labels={"stable": 1}),
        ServedModelConfig("plus_one", "export.server.testing:ScaledTotal", platform="python"),
    ]
    srv = ModelServer(configs, ServerOptions(port=0, rest_api_port=-1, allowed_python_modules=("export.server.testing",))).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def model_stub(channel):
    return model_service_pb2_grpc.ModelServiceStub(channel)


def predict_request(model="toy", signature="", **inputs):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if signature:
        request.model_spec.signature_name = signature
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def outputs_of(response):
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


X = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
HISTORY = np.array([[b"a", b"b", b""], [b"c", b"", b""]], dtype=object)


@pytest.mark.parametrize(
    "signature, inputs, expected",
    [
        ("", {"x": X}, {"y": X * TOY_SCALE, "total": X.sum(1) * TOY_SCALE}),
        ("tokens", {"history": HISTORY},
         {"count": np.array([2, 1], np.int32), "last": np.array([b"b", b"c"], object),
          "last_bytes": np.array([b"b", b"c"], object)}),
        ("recommend", {"history": HISTORY, "k": np.int32(2)},
         {"items": np.array([[b"0", b"1"]] * 2, object), "scores": np.array([[2, 1]] * 2, np.float32) * TOY_SCALE}),
        ("count_rows", {"x": X}, {"rows": np.int32(2), "y": X * TOY_SCALE}),
    ],
)
def test_predict_every_signature(stub, signature, inputs, expected):
    response = stub.Predict(predict_request(signature=signature, **inputs), 10)
    assert response.model_spec.name == "toy"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == (signature or "serving_default")
    got = outputs_of(response)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value)
        assert got[key].dtype == np.asarray(value).dtype


def test_predict_output_filter_version_and_label(stub):
    request = predict_request(x=X)
    request.output_filter.append("total")
    request.model_spec.version_label = "stable"
    response = stub.Predict(request, 10)
    assert list(response.outputs) == ["total"]
    assert response.model_spec.version.value == 1
    request.model_spec.version.value = 1  # oneof: replaces the label
    assert stub.Predict(request, 10).model_spec.version.value == 1


def test_get_model_metadata(stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "toy"
    response = stub.GetModelMetadata(request, 10)
    assert (response.model_spec.name, response.model_spec.version.value) == ("toy", 1)
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_defs)
    assert {"serving_default", "tokens", "recommend", "classify", "regress"} <= set(signature_defs.signature_def)
    x = signature_defs.signature_def["serving_default"].inputs["x"]
    assert x.dtype == tf.float32.as_datatype_enum
    assert [d.size for d in x.tensor_shape.dim] == [-1, 3]


def test_get_model_status(model_stub):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "toy"
    (status,) = model_stub.GetModelStatus(request, 10).model_version_status
    assert status.version == 1
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0


def _example(x):
    example = tf.train.Example()
    example.features.feature["x"].float_list.value.append(x)
    return example


def test_classify_and_regress(stub):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name, request.model_spec.signature_name = "toy", "classify"
    request.input.example_list.examples.extend([_example(0.0), _example(1.0)])
    (first, second) = stub.Classify(request, 10).result.classifications
    assert [c.label for c in first.classes] == ["neg", "pos"]
    assert [c.score for c in first.classes] == pytest.approx([0.5, 0.5])
    p = 1 / (1 + np.exp(-TOY_SCALE))
    assert [c.score for c in second.classes] == pytest.approx([1 - p, p], rel=1e-5)

    request = regression_pb2.RegressionRequest()
    request.model_spec.name, request.model_spec.signature_name = "toy", "regress"
    # Context features are merged into every example (example features win).
    request.input.example_list_with_context.context.CopyFrom(_example(3.0))
    request.input.example_list_with_context.examples.extend([tf.train.Example(), _example(-1.0)])
    response = stub.Regress(request, 10)
    assert [r.value for r in response.result.regressions] == pytest.approx([3.0 * TOY_SCALE, -1.0 * TOY_SCALE])
    assert response.model_spec.signature_name == "regress"


def test_composite_servable_calls_other_model(stub):
    response = stub.Predict(predict_request(model="plus_one", x=X), 10)
    np.testing.assert_allclose(outputs_of(response)["total_plus_one"], X.sum(1) * TOY_SCALE + 1)


def _bad_content():
    request = predict_request(x=X)
    request.inputs["x"].tensor_content = b"\x00" * 5
    return request


def _too_many_values():
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    request = predict_request()
    shape = tensor_shape_pb2.TensorShapeProto(dim=[{"size": 2}, {"size": 3}])
    request.inputs["x"].CopyFrom(
        tensor_pb2.TensorProto(dtype=tf.float32.as_datatype_enum, tensor_shape=shape, float_val=[1.0] * 7)
    )
    return request


def _with(request, **spec):
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    return request


def _metadata_request(field):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[field])
    request.model_spec.name = "toy"
    return request


def _classify_on(signature):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name, request.model_spec.signature_name = "toy", signature
    request.input.example_list.examples.append(_example(1.0))
    return request


def _status(name, version=None):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    return request


def _filtered(name):
    request = predict_request(x=X)
    request.output_filter.append(name)
    return request


MALFORMED = [
    ("Predict", lambda: predict_request(model="nope", x=X), grpc.StatusCode.NOT_FOUND,
     "Servable not found for request: Latest(nope)"),
    ("Predict", lambda: _with(predict_request(x=X), version=7), grpc.StatusCode.NOT_FOUND,
     "Servable not found for request: Specific(toy, 7)"),
    ("Predict", lambda: _with(predict_request(x=X), version_label="canary"), grpc.StatusCode.INVALID_ARGUMENT,
     "Unrecognized servable version label: canary"),
    ("Predict", lambda: predict_request(model="", x=X), grpc.StatusCode.INVALID_ARGUMENT, "no name"),
    ("Predict", lambda: predict_request(signature="nope", x=X), grpc.StatusCode.FAILED_PRECONDITION,
     'Serving signature key "nope" not found'),
    ("Predict", lambda: predict_request(z=X), grpc.StatusCode.INVALID_ARGUMENT,
     "input size does not match signature: 1!=1 len({z}) != len({x}). Sent extra: {z}. Missing but required: {x}."),
    ("Predict", lambda: predict_request(signature="recommend", history=HISTORY), grpc.StatusCode.INVALID_ARGUMENT,
     "Missing but required: {k}"),
    ("Predict", lambda: predict_request(x=X.astype(np.int64)), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'x' expects DT_FLOAT, got DT_INT64"),
    ("Predict", lambda: predict_request(x=X[0]), grpc.StatusCode.INVALID_ARGUMENT, "expects shape [-1,3], got shape [3]"),
    ("Predict", lambda: predict_request(x=np.ones((1, 4), np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
     "expects shape [-1,3], got shape [1, 4]"),
    ("Predict", lambda: predict_request(signature="recommend", history=HISTORY, k=np.array([2], np.int32)),
     grpc.StatusCode.INVALID_ARGUMENT, "input 'k' of signature 'recommend' expects shape [], got shape [1]"),
    ("Predict", _bad_content, grpc.StatusCode.INVALID_ARGUMENT, "input 'x' is not a valid TensorProto"),
    ("Predict", _too_many_values, grpc.StatusCode.INVALID_ARGUMENT, "has 7 values for shape [2, 3]"),
    ("Predict", lambda: _filtered("nope"), grpc.StatusCode.INVALID_ARGUMENT,
     "output tensor alias not found in signature: nope"),
    ("GetModelMetadata", lambda: _metadata_request("graph"), grpc.StatusCode.INVALID_ARGUMENT,
     "Metadata field graph is not supported"),
    ("Classify", lambda: _classify_on("serving_default"), grpc.StatusCode.INVALID_ARGUMENT,
     "cannot serve Classify"),
    ("Classify", lambda: _classify_on("nope"), grpc.StatusCode.INVALID_ARGUMENT,
     "No signature was found with the name: nope"),
    ("GetModelStatus", lambda: _status("nope"), grpc.StatusCode.NOT_FOUND, "Could not find any versions of model nope"),
    ("GetModelStatus", lambda: _status("toy", 9), grpc.StatusCode.NOT_FOUND, "Could not find version 9 of model toy"),
]


@pytest.mark.parametrize("method, make_request, code, message", MALFORMED)
def test_malformed_requests_get_tf_serving_codes(stub, model_stub, method, make_request, code, message):
    target = model_stub if method == "GetModelStatus" else stub
    with pytest.raises(grpc.RpcError) as info:
        getattr(target, method)(make_request(), 10)
    assert info.value.code() == code
    assert message in info.value.details()
    # ... and the server keeps serving.
    np.testing.assert_array_equal(outputs_of(stub.Predict(predict_request(x=X), 10))["y"], X * TOY_SCALE)


def test_multi_inference_is_unimplemented(stub):
    from tensorflow_serving.apis import inference_pb2

    with pytest.raises(grpc.RpcError) as info:
        stub.MultiInference(inference_pb2.MultiInferenceRequest(), 10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _concurrently(n, fn):
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def run(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


@pytest.fixture(scope="module")
def batching_server(toy_base):
    # A long timeout and max_batch_size = number of callers: the batch closes when full.
    options = ServerOptions(
        port=0, rest_api_port=-1,
        batching=BatchingOptions(max_batch_size=4, batch_timeout_micros=3_000_000, num_batch_threads=1),
    )
    srv = ModelServer([ServedModelConfig("toy", str(toy_base))], options).start()
    yield srv
    srv.stop()


def _batch_calls(srv, signature):
    return srv.metrics.batch_size.count(("toy", signature)), srv.metrics.batch_size.sum(("toy", signature))


def test_batching_merges_concurrent_requests_and_matches_unbatched(batching_server, stub):
    rows = [np.full((1, 3), i, np.float32) for i in range(4)]
    with grpc.insecure_channel(batching_server.grpc_address) as ch:
        batched = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        results = _concurrently(4, lambda i: outputs_of(batched.Predict(predict_request(x=rows[i]), 20)))
    for i, result in enumerate(results):
        unbatched = outputs_of(stub.Predict(predict_request(x=rows[i]), 10))
        for key in unbatched:
            np.testing.assert_array_equal(result[key], unbatched[key])
    assert _batch_calls(batching_server, "serving_default") == (1, 4)  # one model call of 4 rows


def test_batching_unsplittable_output_falls_back_to_unbatched(batching_server):
    with grpc.insecure_channel(batching_server.grpc_address) as ch:
        batched = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        results = _concurrently(
            4, lambda i: outputs_of(batched.Predict(predict_request(signature="count_rows", x=X[:1] + i), 20))
        )
    for i, result in enumerate(results):
        assert result["rows"] == 1  # as if served alone
        np.testing.assert_array_equal(result["y"], (X[:1] + i) * TOY_SCALE)


@pytest.mark.parametrize(
    "pad, timeout_micros, expected_calls",
    [(True, 3_000_000, (1, 2)), (False, 300_000, (2, 2))],  # without padding, different lengths never merge
)
def test_batching_variable_length_histories(toy_base, pad, timeout_micros, expected_calls):
    options = ServerOptions(
        port=0, rest_api_port=-1,
        batching=BatchingOptions(max_batch_size=2, batch_timeout_micros=timeout_micros, num_batch_threads=1,
                                 pad_variable_length_inputs=pad),
    )
    histories = [np.array([[b"a", b"b"]], object), np.array([[b"c", b"d", b"e"]], object)]
    with ModelServer([ServedModelConfig("toy", str(toy_base))], options) as srv, PredictClient(srv.grpc_address) as client:
        results = _concurrently(2, lambda i: client.predict("toy", {"history": histories[i]}, signature="tokens"))
        assert [int(r["count"][0]) for r in results] == [2, 3]  # padding with "" changes no answer
        assert [r["last"][0] for r in results] == [b"b", b"e"]
        assert _batch_calls(srv, "tokens") == expected_calls


def test_scann_servable(tmp_path, toy_base):
    from scann.scann_ops.py import scann_ops
    database = np.eye(4, dtype=np.float32)
    searcher = scann_ops.builder(database, 2, "dot_product").score_brute_force().build()

    class Retrieval(tf.Module):
        def __init__(self):
            super().__init__()
            self.state = searcher.serialize_to_module()

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="query")])
        def search(self, query):
            indices, scores = scann_ops.searcher_from_module(self.state).search_batched(query)
            return {"indices": indices, "scores": scores}

    module = Retrieval()
    path = str(tmp_path / "retrieval" / "1")
    tf.saved_model.save(module, path, signatures={"serving_default": module.search},
                        options=tf.saved_model.SaveOptions(namespace_whitelist=["Scann"]))
    assert uses_scann_ops(read_saved_model_proto(path))
    assert not uses_scann_ops(read_saved_model_proto(str(toy_base / "1")))  # stock models never need scann

    with ModelServer([ServedModelConfig("retrieval", str(tmp_path / "retrieval"))],
                     ServerOptions(port=0, rest_api_port=-1)) as srv, PredictClient(srv.grpc_address) as client:
        out = client.predict("retrieval", {"query": [[0, 0, 1, 0.5]]})
        assert out["indices"][0].tolist() == [2, 3]
        np.testing.assert_allclose(out["scores"][0], [1.0, 0.5])


def test_predict_client_casts_to_signature_dtypes(server):
    with PredictClient(server.grpc_address) as client:
        out = client.predict("toy", {"history": [["a", "b"]], "k": 3}, signature="recommend")
        assert (out.model, out.version, out.signature) == ("toy", 1, "recommend")
        assert out["items"].tolist() == [[b"0", b"1", b"2"]]
        assert client.status("toy") == [{"version": 1, "state": "AVAILABLE", "error_code": "OK", "error_message": ""}]
        assert client.metadata("toy")["signatures"]["recommend"]["inputs"]["k"] == {"dtype": "DT_INT32", "shape": []}
        with pytest.raises(ValueError, match="input 'k' expects DT_INT32; 2.5 does not fit"):
            client.predict("toy", {"history": [["a"]], "k": 2.5}, signature="recommend")
        with pytest.raises(ValueError, match="Servable not found") as info:
            client.predict("nope", {"x": X})
        assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_tfrec_query(server, capsys):
    argv = ["query", "--address", server.grpc_address, "--model", "toy", "--signature", "recommend",
            "--input", "history=a,b,c", "--input", "k=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert '"version": 1' in out and '"items"' in out
    assert main(argv + ["--format", "table"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "model toy version 1 signature recommend"
    assert table[1].split() == ["#", "items", "scores"]
    assert table[2].split() == ["0", "0", f"{2 * TOY_SCALE:g}"]

    assert main(["query", "--address", server.grpc_address, "--model", "toy", "--status"]) == 0
    assert '"state": "AVAILABLE"' in capsys.readouterr().out

    for bad, message in [
        (["--input", "k=abc", "--input", "history=a"], "input 'k' expects DT_INT32"),
        (["--input", "kk=1"], "signature 'recommend' has no input 'kk'"),
        (["--input", "novalue"], "--input expects NAME=VALUE"),
        (["--input", "history=a", "--input", "k=1", "--version", "5"], "Servable not found"),
    ]:
        assert main(["query", "--address", server.grpc_address, "--model", "toy", "--signature", "recommend", *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tfrec query: error:") and message in err, err
