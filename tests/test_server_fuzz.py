"""A bounded fuzz test of the model server (issue 21): over 1,000 generated bad requests
over gRPC and REST, every one answered with TF Serving's code, the server's memory
bounded, and a valid request served after each class."""

import random
import time

import grpc
import numpy as np
import pytest
import requests

from export.server import ServedModelConfig, ModelServer, ServerOptions
from export.server.attack import grpc_cases, rest_cases, send_grpc, send_rest
from export.server.testing import save_half_plus_two

MAX_MESSAGE = 4 << 20
MAX_BODY = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("models") / "half_plus_two"
    save_half_plus_two(str(base / "1"))
    options = ServerOptions(port=0, rest_api_port=0, grpc_max_message_bytes=MAX_MESSAGE, rest_max_body_bytes=MAX_BODY)
    srv = ModelServer([ServedModelConfig("half_plus_two", str(base))], options).start()
    yield srv
    srv.stop()


def valid_requests_succeed(srv, channel):
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    import tensorflow as tf

    response = requests.post(srv.rest_url + "/v1/models/half_plus_two:predict", json={"instances": [2.0]}, timeout=30)
    assert response.status_code == 200 and response.json() == {"predictions": [3.0]}
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_two"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([4.0], np.float32)))
    answer = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, 30.0)
    assert list(answer.outputs["y"].float_val) == [4.0]


def test_fuzz_over_1000_bad_requests(server):
    rng = random.Random(21)
    rest = rest_cases(rng, per_class=60, port=server.rest_port, max_body_bytes=MAX_BODY)
    remote = grpc_cases(rng, per_class=50, max_message_bytes=MAX_MESSAGE)
    total = sum(map(len, rest.values())) + sum(map(len, remote.values()))
    assert total >= 1000
    started, rss_before = time.monotonic(), rss_bytes()
    wrong = []
    with grpc.insecure_channel(server.grpc_address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        valid_requests_succeed(server, channel)
        for name, cases in rest.items():
            for case in cases:
                got = send_rest(server.rest_port, case.payload)
                if got != case.expected:
                    wrong.append(("rest", name, got, case.expected, case.payload[:120]))
            valid_requests_succeed(server, channel)
        for name, cases in remote.items():
            for case in cases:
                got = send_grpc(channel, case)
                if got != case.expected:
                    wrong.append(("grpc", name, got, case.expected, case.payload[:80]))
            valid_requests_succeed(server, channel)
    grown = rss_bytes() - rss_before
    assert not wrong, wrong[:5]
    assert grown < 200 << 20, f"RSS grew by {grown / 2**20:.0f} MiB"
    assert time.monotonic() - started < 90
    health = requests.get(server.rest_url + "/healthz", timeout=10)
    assert health.status_code == 200
