"""The model server's REST API over real HTTP: TF Serving's JSON formats and status codes,
metadata and status documents, Prometheus metrics and the health check."""

import base64
import json

import numpy as np
import pytest
import requests
import tensorflow as tf

from export.server import ServedModelConfig, ModelServer, ServerOptions
from export.server.testing import save_toy_model

SCALE = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    save_toy_model(str(base / "toy" / "1"), scale=SCALE)
    configs = [
        ServedModelConfig("toy", str(base / "toy"), version_labels={"stable": 1}),
        ServedModelConfig("plus_one", "export.server.testing:ScaledTotal", platform="python"),
        ServedModelConfig("ghost", str(base / "ghost")),  # no version on disk
    ]
    srv = ModelServer(configs, ServerOptions(port=0, rest_api_port=0, allowed_python_modules=("export.server.testing",))).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with requests.Session() as session:  # keep-alive connections
        yield lambda method, path, **kw: session.request(method, server.rest_url + path, timeout=30, **kw)


def post(http, path, body):
    return http("POST", path, data=body if isinstance(body, (str, bytes)) else json.dumps(body))


def test_predict_row_format(http):
    response = post(http, "/v1/models/toy:predict", {"instances": [[1, 2, 3], [0.1, 0, 0]]})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {
        "predictions": [{"total": 12.0, "y": [2.0, 4.0, 6.0]}, {"total": 0.2, "y": [0.2, 0.0, 0.0]}]
    }
    assert "0.2000" not in response.text  # float32 written with the shortest round-trip text
    # Named instances, a pinned version, a label, case-insensitive paths: same answer.
    named = {"instances": [{"x": [1, 2, 3]}, {"x": [0.1, 0, 0]}]}
    for path in ("/v1/models/toy/versions/1:predict", "/v1/models/toy/labels/stable:predict", "/V1/MODELS/toy:PREDICT"):
        assert post(http, path, named).json() == response.json()


def test_predict_columnar_format_strings_and_bytes(http):
    body = {"signature_name": "recommend", "inputs": {"history": [["a", "b"]], "k": 2}}
    assert post(http, "/v1/models/toy:predict", body).json() == {
        "outputs": {"items": [["0", "1"]], "scores": [[2 * SCALE, SCALE]]}
    }
    body = {"signature_name": "tokens", "instances": [["a", "b", ""], ["c", "", ""]]}
    assert post(http, "/v1/models/toy:predict", body).json() == {
        "predictions": [
            {"count": 2, "last": "b", "last_bytes": {"b64": base64.b64encode(b"b").decode()}},
            {"count": 1, "last": "c", "last_bytes": {"b64": base64.b64encode(b"c").decode()}},
        ]
    }


def test_predict_binary_input_and_single_output(http):
    example = tf.train.Example()
    example.features.feature["x"].float_list.value.append(1.5)
    b64 = base64.b64encode(example.SerializeToString()).decode()
    body = {"signature_name": "regress", "inputs": [{"b64": b64}]}
    assert post(http, "/v1/models/toy:predict", body).json() == {"outputs": [1.5 * SCALE]}
    body = {"signature_name": "regress", "instances": [{"b64": b64}]}
    assert post(http, "/v1/models/toy:predict", body).json() == {"predictions": [1.5 * SCALE]}


def test_classify_and_regress(http):
    body = {"signature_name": "classify", "context": {"y": 1}, "examples": [{"x": 0.0}, {"x": [1.0]}]}
    results = post(http, "/v1/models/toy:classify", body).json()["results"]
    p = float(np.float32(1 / (1 + np.exp(-SCALE))))
    assert results[0] == [["neg", 0.5], ["pos", 0.5]]
    assert results[1][0][0] == "neg" and results[1][1] == ["pos", pytest.approx(p, rel=1e-6)]
    body = {"signature_name": "regress", "context": {"x": 3.0}, "examples": [{}, {"x": -1.0}]}
    assert post(http, "/v1/models/toy:regress", body).json() == {"results": [3.0 * SCALE, -1.0 * SCALE]}


def test_composite_servable(http):
    body = {"inputs": {"x": [[1, 1, 1]]}}
    assert post(http, "/v1/models/plus_one:predict", body).json() == {"outputs": [3 * SCALE + 1]}
    signature = http("GET", "/v1/models/plus_one/metadata").json()["metadata"]["signature_def"]["signature_def"]
    assert signature["serving_default"]["inputs"]["x"]["dtype"] == "DT_FLOAT"
    dims = signature["serving_default"]["outputs"]["total_plus_one"]["tensor_shape"]["dim"]
    assert [d["size"] for d in dims] == ["-1"]


def test_model_status(http):
    expected = {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    for path in ("/v1/models/toy", "/v1/models/toy/versions/1", "/v1/models/toy/labels/stable"):
        response = http("GET", path)
        assert response.status_code == 200 and response.json() == expected


def test_model_metadata(http):
    response = http("GET", "/v1/models/toy/metadata")
    assert response.status_code == 200
    doc = response.json()
    assert doc["model_spec"] == {"name": "toy", "version": "1", "signature_name": ""}
    signatures = doc["metadata"]["signature_def"]["signature_def"]
    x = signatures["serving_default"]["inputs"]["x"]
    assert x["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in x["tensor_shape"]["dim"]] == ["-1", "3"]
    assert signatures["recommend"]["method_name"] == "tensorflow/serving/predict"
    assert http("GET", "/v1/models/toy/versions/1/metadata").json() == doc


ERRORS = [
    ("POST", "/v1/models/nope:predict", {"instances": [[1, 2, 3]]}, 404, "Servable not found for request: Latest(nope)"),
    ("POST", "/v1/models/toy/versions/9:predict", {"instances": [[1, 2, 3]]}, 404, "Specific(toy, 9)"),
    ("POST", "/v1/models/toy/labels/canary:predict", {"instances": [[1, 2, 3]]}, 400,
     "Unrecognized servable version label: canary"),
    ("POST", "/v1/models/ghost:predict", {"instances": [[1, 2, 3]]}, 404, "Latest(ghost)"),
    ("POST", "/v1/models/toy:predict", "{", 400, "JSON Parse error"),
    ("POST", "/v1/models/toy:predict", "", 400, "JSON Parse error: The document is empty"),
    ("POST", "/v1/models/toy:predict", "[1]", 400, "Is not object"),
    ("POST", "/v1/models/toy:predict", {"signature_name": 5, "inputs": [1]}, 400,
     "'signature_name' key must be a string value."),
    ("POST", "/v1/models/toy:predict", {"signature_name": "nope", "inputs": [[1, 2, 3]]}, 400,
     'Serving signature name: "nope" not found in signature def'),
    ("POST", "/v1/models/toy:predict", {"rows": [[1, 2, 3]]}, 400, "Missing 'inputs' or 'instances' key"),
    ("POST", "/v1/models/toy:predict", {"inputs": [[1, 2, 3]], "instances": [[1, 2, 3]]}, 400,
     "expecting only one of 'inputs' or 'instances'"),
    ("POST", "/v1/models/toy:predict", {"instances": []}, 400, "No values in 'instances' array"),
    ("POST", "/v1/models/toy:predict", {"instances": [{"z": [1, 2, 3]}]}, 400, "does not have named input: z"),
    ("POST", "/v1/models/toy:predict", {"inputs": {"z": [[1, 2, 3]]}}, 400, "Missing named input: x in 'inputs' object."),
    ("POST", "/v1/models/toy:predict", {"instances": [["a", "b", "c"]]}, 400,
     'JSON Value: "a" Type: String is not of expected type: DT_FLOAT'),
    ("POST", "/v1/models/toy:predict", {"instances": [1, 2, 3]}, 400, "expects shape [-1,3], got shape [3]"),
    ("POST", "/v1/models/toy:predict", {"inputs": [[1, 2, 3], [1, 2]]}, 400, "Encountered list at unexpected size: 2"),
    ("POST", "/v1/models/toy:predict", {"instances": [[1, 2, 3], [[1], [2], [3]]]}, 400, "Expecting shape [3] but got: [3, 1]"),
    ("POST", "/v1/models/toy:predict", {"signature_name": "recommend", "inputs": {"history": [["a"]], "k": 2.5}}, 400,
     "JSON Value: 2.5 Type: Number is not of expected type: DT_INT32"),
    ("POST", "/v1/models/toy:predict", {"inputs": [[16777217, 0, 0]]}, 400, "to DT_FLOAT without loss of precision"),
    ("POST", "/v1/models/toy:predict", {"signature_name": "regress", "inputs": [{"b64": "%%%"}]}, 400,
     "Unable to base64 decode"),
    ("POST", "/v1/models/toy:classify", {"examples": [{"x": 1.0}]}, 400, "cannot serve Classify"),
    ("POST", "/v1/models/toy:regress", {"signature_name": "regress"}, 400, "key 'examples' is expected"),
    ("POST", "/v1/models/toy:regress", {"signature_name": "regress", "examples": [{"x": [1, 2.5]}]}, 400,
     "Unexpected element type in feature: x"),
    ("GET", "/v1/models/nope", None, 404, "Could not find any versions of model nope"),
    ("GET", "/v1/models/toy/versions/4", None, 404, "Could not find version 4 of model toy"),
    ("GET", "/v1/models/toy/versions/4/metadata", None, 404, "Servable not found for request: Specific(toy, 4)"),
    ("GET", "/v1/models/ghost", None, 404, "Could not find any versions of model ghost"),
    ("GET", "/v1/models", None, 400, "Missing model name in request."),
    ("GET", "/v1/foo", None, 400, "Malformed request: GET /v1/foo"),
    ("DELETE", "/v1/models/toy", None, 400, "Malformed request: DELETE /v1/models/toy"),
    ("GET", "/v1/models/toy:predict", None, 400, "Malformed request"),
    ("GET", "/elsewhere", None, 404, "Not found: /elsewhere"),
]


@pytest.mark.parametrize("method, path, body, status, message", ERRORS)
def test_errors_have_tf_serving_status_and_server_stays_up(http, method, path, body, status, message):
    if body is None:
        response = http(method, path)
    else:
        response = http(method, path, data=body if isinstance(body, str) else json.dumps(body))
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert post(http, "/v1/models/toy:predict", {"instances": [[1, 1, 1]]}).json()["predictions"][0]["total"] == 3 * SCALE


def _metric(text, line_start):
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_prometheus_metrics(http):
    ok = 'tfrec_serving_requests_total{api="predict",code="OK",model="toy",protocol="rest",signature="serving_default"}'
    missing = 'tfrec_serving_requests_total{api="predict",code="NOT_FOUND",model="unknown",protocol="rest",signature="unknown"}'
    before = http("GET", "/monitoring/prometheus/metrics").text
    for _ in range(3):
        post(http, "/v1/models/toy:predict", {"instances": [[1, 2, 3]]})
    post(http, "/v1/models/nope:predict", {"instances": [[1, 2, 3]]})
    response = http("GET", "/monitoring/prometheus/metrics")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    after = response.text
    assert _metric(after, ok) - _metric(before, ok) == 3
    assert _metric(after, missing) - _metric(before, missing) == 1
    count = 'tfrec_serving_request_latency_seconds_count{api="predict",model="toy",protocol="rest",signature="serving_default"}'
    assert _metric(after, count) - _metric(before, count) == 3
    assert 'tfrec_serving_request_latency_seconds_bucket{api="predict",le="+Inf",model="toy",protocol="rest",signature="serving_default"}' in after
    assert _metric(after, 'tfrec_serving_model_versions{model="toy",state="AVAILABLE"}') == 1
    assert "# TYPE tfrec_serving_batch_size histogram" in after


def test_healthz_reports_models_without_versions(server, tmp_path):
    response = requests.get(server.rest_url + "/healthz", timeout=10)
    assert response.status_code == 503
    assert response.json() == {"status": "not ready", "models_without_available_version": ["ghost"]}
    save_toy_model(str(tmp_path / "healthy" / "1"))
    with ModelServer([ServedModelConfig("healthy", str(tmp_path / "healthy"))],
                     ServerOptions(port=0, rest_api_port=0)) as healthy:
        response = requests.get(healthy.rest_url + "/healthz", timeout=10)
        assert response.status_code == 200 and response.json() == {"status": "ok"}
