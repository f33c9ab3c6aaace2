"""Model life cycle: config files, version policies, hot swap under load, half-written and
broken versions, retiring with requests in flight, config reload, graceful shutdown
(in-process and `tfrec serve` on SIGTERM)."""

import os
import shutil
import signal
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from export.client import PredictClient
from export.server import (
    BatchingOptions,
    ServedModelConfig,
    ModelServer,
    ServerOptions,
    ServingError,
    VersionPolicy,
    load_batching_parameters,
    load_model_config_file,
    parse_model_config_text,
)
from export.server.config import to_model_server_config
from export.server.models import ModelRegistry
from export.server.testing import save_toy_model
from tfrec_cli import main

X = np.ones((1, 3), np.float32)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """Two toy versions (scale 1 and 2) to copy into base paths."""
    root = tmp_path_factory.mktemp("staged")
    return {scale: save_toy_model(str(root / f"scale{scale}"), scale=float(scale)) for scale in (1, 2)}


def put_version(base, version, source):
    shutil.copytree(source, os.path.join(base, str(version)))


# --- configuration ----------------------------------------------------------------------


def test_model_config_file(tmp_path):
    path = tmp_path / "models.config"
    path.write_text(
        """
        model_config_list {
          config { name: 'a' base_path: '/m/a' model_platform: 'tensorflow'
                   model_version_policy { latest { num_versions: 2 } } version_labels { key: 'stable' value: 3 } }
          config { name: 'b' base_path: '/m/b' model_platform: 'tensorflow' model_version_policy { all {} } }
          config { name: 'c' base_path: '/m/c' model_platform: 'tensorflow'
                   model_version_policy { specific { versions: 1 versions: 4 } } }
          config { name: 'd' base_path: '/m/d' model_platform: 'tensorflow' }
        }
        """
    )
    a, b, c, d = load_model_config_file(path)
    assert (a.name, a.base_path, a.version_labels) == ("a", "/m/a", {"stable": 3})
    assert a.version_policy.select([1, 2, 3]) == [3, 2]
    assert b.version_policy.select([3, 1, 2]) == [3, 2, 1]
    assert c.version_policy.select([1, 2, 3, 4]) == [4, 1]
    assert d.version_policy == VersionPolicy("latest", 1)
    assert parse_model_config_text(str(to_model_server_config([a, b, c, d]))) == [a, b, c, d]
    # A bare ModelConfigList is accepted too.
    assert parse_model_config_text("config { name: 'x' base_path: '/x' model_platform: 'tensorflow' }")[0].name == "x"


@pytest.mark.parametrize(
    "text, message",
    [
        ("model_config_list { config { name: 'a' base_path: '/a' model_platform: 'tensorflow' } "
         "config { name: 'a' base_path: '/b' model_platform: 'tensorflow' } }", "multiple times"),
        ("model_config_list { config { name: 'a' base_path: '/a' model_platform: 'pytorch' } }",
         "unsupported platform 'pytorch'"),
        ("model_config_list { config { name: 'a' base_path: '/a' } }", "sets no model_platform"),
        ("model_config_list { config { name: 'a' model_platform: 'tensorflow' } }", "model 'a' has no base_path"),
        ("model_config_list { config { name: 'a' base_path: '/a' model_platform: 'tensorflow' "
         "model_version_policy { specific { } } } }", "specific version policy needs at least one version"),
        ("model_config_list { config { nme: 'a' } }", "not a text-proto ModelServerConfig"),
    ],
)
def test_model_config_errors(tmp_path, text, message):
    path = tmp_path / "bad.config"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_model_config_file(path)
    assert str(path) in str(info.value)


def test_batching_parameters_file(tmp_path):
    path = tmp_path / "batching.txt"
    path.write_text("max_batch_size { value: 16 }\nbatch_timeout_micros { value: 500 }  # comment\n"
                    "num_batch_threads { value: 2 }\npad_variable_length_inputs: true\n")
    assert load_batching_parameters(path) == BatchingOptions(
        max_batch_size=16, batch_timeout_micros=500, num_batch_threads=2, pad_variable_length_inputs=True
    )
    path.write_text("allowed_batch_sizes: 8\n")
    with pytest.raises(ValueError, match="unsupported batching parameter 'allowed_batch_sizes'"):
        load_batching_parameters(path)
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        BatchingOptions(max_batch_size=0)


def test_cli_serve_argument_errors(tmp_path, capsys):
    for argv, message in [
        (["serve"], "pass --model_config_file, or both --model_name and --model_base_path"),
        (["serve", "--model_config_file", str(tmp_path / "none.config")], "model config file not found"),
        (["serve", "--model_name", "m", "--model_base_path", "/m", "--max_batch_size", "8"],
         "--max_batch_size needs --enable_batching"),
        (["serve", "--model_name", "m", "--model_base_path", "/m", "--port", "70000"], "port must be in 0..65535"),
    ]:
        assert main(argv) == 2
        assert message in capsys.readouterr().err


# --- versions ----------------------------------------------------------------------------


def test_version_policies(tmp_path, staged):
    base = str(tmp_path / "toy")
    for version in (1, 2, 3):
        put_version(base, version, staged[1])
    configs = [
        ServedModelConfig("latest2", base, version_policy=VersionPolicy("latest", 2)),
        ServedModelConfig("all", base, version_policy=VersionPolicy("all")),
        ServedModelConfig("specific", base, version_policy=VersionPolicy("specific", versions=(1, 3))),
    ]
    with ModelServer(configs, ServerOptions(port=0, rest_api_port=-1)) as srv, PredictClient(srv.grpc_address) as client:
        served = {c.name: [s["version"] for s in client.status(c.name)] for c in configs}
        assert served == {"latest2": [3, 2], "all": [3, 2, 1], "specific": [3, 1]}
        assert client.predict("specific", {"x": X}).version == 3  # latest of the served
        assert client.predict("specific", {"x": X}, version=1).version == 1
        with pytest.raises(ServingError, match=r"Specific\(specific, 2\)"):
            client.predict("specific", {"x": X}, version=2)


def test_hot_swap_under_concurrent_requests(tmp_path, staged):
    base = str(tmp_path / "swap")
    put_version(base, 1, staged[1])
    options = ServerOptions(port=0, rest_api_port=0, file_system_poll_wait_seconds=0.2)
    with ModelServer([ServedModelConfig("swap", base)], options) as srv:
        stop, errors, answers = threading.Event(), [], {}

        def grpc_client(key):
            with grpc.insecure_channel(srv.grpc_address) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                request = predict_pb2.PredictRequest()
                request.model_spec.name = "swap"
                request.inputs["x"].CopyFrom(tf.make_tensor_proto(X))
                while not stop.is_set():
                    try:
                        response = stub.Predict(request, 10)
                    except grpc.RpcError as err:
                        errors.append(f"{err.code()}: {err.details()}")
                        continue
                    total = float(tf.make_ndarray(response.outputs["total"])[0])
                    answers[key].append((response.model_spec.version.value, total))

        def rest_client(key):
            with requests.Session() as session:
                while not stop.is_set():
                    response = session.post(f"{srv.rest_url}/v1/models/swap:predict",
                                            json={"instances": X.tolist()}, timeout=10)
                    if response.status_code != 200:
                        errors.append(response.text)
                        continue
                    status = session.get(f"{srv.rest_url}/v1/models/swap", timeout=10).json()
                    answers[key].append((None, response.json()["predictions"][0]["total"]))
                    assert status["model_version_status"]

        threads = []
        for key, target in [("g0", grpc_client), ("g1", grpc_client), ("g2", grpc_client), ("r0", rest_client)]:
            answers[key] = []
            threads.append(threading.Thread(target=target, args=(key,)))
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while not all(answers.values()) and time.monotonic() < deadline:
            time.sleep(0.02)  # every client is answered by v1 before v2 arrives
        put_version(base, 2, staged[2])  # a plain (non-atomic) copy: the stability check must cover it
        assert srv.registry.wait_until_available("swap", 2, timeout=30)
        shutil.rmtree(os.path.join(base, "1"))
        deadline = time.monotonic() + 30
        while srv.registry.status("swap", 1)[0].state != "END" and time.monotonic() < deadline:
            time.sleep(0.05)
        seen = {k: len(v) for k, v in answers.items()}
        while any(len(answers[k]) < seen[k] + 3 for k in answers) and time.monotonic() < deadline:
            time.sleep(0.05)  # every client gets a few answers after v1 is gone
        stop.set()
        for thread in threads:
            thread.join()

        assert errors == []
        for key, got in answers.items():
            totals = [total for _, total in got]
            assert set(totals) <= {3.0, 6.0}, key  # 3 * scale of v1 or v2, nothing else
            assert totals[0] == 3.0 and totals[-1] == 6.0, key  # answers switched from v1 to v2 ...
            assert 6.0 not in totals or 3.0 not in totals[totals.index(6.0):], key  # ... and never went back
            if key.startswith("g"):
                assert all(total == 3.0 * version for version, total in got), key
        assert [(r.version, r.state) for r in srv.registry.status("swap")] == [(2, "AVAILABLE"), (1, "END")]


def test_retired_version_waits_for_in_flight_requests(tmp_path, staged):
    base = str(tmp_path / "m")
    put_version(base, 1, staged[1])
    registry = ModelRegistry([ServedModelConfig("m", base)], poll_wait_seconds=60)
    registry.poll_once()
    assert not registry.is_available("m")  # first sight of a version: not loaded until it is stable
    registry.poll_once()
    handle = registry.acquire("m")
    assert handle.servable.version == 1
    put_version(base, 2, staged[2])
    registry.poll_once()
    registry.poll_once()
    with registry.acquire("m") as servable:
        assert servable.version == 2  # new requests go to v2 at once
    state = {r.version: r.state for r in registry.status("m")}
    assert state == {2: "AVAILABLE", 1: "UNLOADING"}  # v1 stays loaded while a request holds it
    out = handle.servable.run("serving_default", {"x": X})
    assert out["total"].tolist() == [3.0]
    handle.release()
    deadline = time.monotonic() + 10
    while registry.status("m", 1)[0].state != "END" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert registry.status("m", 1)[0].state == "END"
    registry.close()


def test_half_written_and_broken_versions(tmp_path, staged):
    base = tmp_path / "m"
    put_version(str(base), 1, staged[1])
    registry = ModelRegistry([ServedModelConfig("m", str(base))], poll_wait_seconds=60)
    registry.poll_once()
    registry.poll_once()
    # Version 2 without saved_model.pb (still being written) is never loaded.
    (base / "2" / "variables").mkdir(parents=True)
    (base / "2" / "variables" / "variables.index").write_bytes(b"partial")
    # Version 3 is broken: it fails to load, is reported, and version 1 keeps serving.
    (base / "3").mkdir()
    (base / "3" / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    for _ in range(3):
        registry.poll_once()
    status = {r.version: r for r in registry.status("m")}
    assert sorted(status) == [1, 3]
    assert status[3].state == "END" and status[3].error is not None
    assert status[3].error.code != grpc.StatusCode.OK and status[3].error.message
    assert status[1].state == "AVAILABLE"
    with registry.acquire("m") as servable:
        assert servable.version == 1
    # Fixing version 3 (its files change) makes it load.
    shutil.rmtree(base / "3")
    put_version(str(base), 3, staged[2])
    registry.poll_once()
    registry.poll_once()
    with registry.acquire("m") as servable:
        assert servable.version == 3
    registry.close()


def test_status_of_broken_version_over_grpc_and_rest(tmp_path, staged):
    base = tmp_path / "m"
    put_version(str(base), 1, staged[1])
    (base / "2").mkdir()
    (base / "2" / "saved_model.pb").write_bytes(b"garbage")
    with ModelServer([ServedModelConfig("m", str(base), version_policy=VersionPolicy("all"))],
                     ServerOptions(port=0, rest_api_port=0)) as srv, PredictClient(srv.grpc_address) as client:
        broken, ok = client.status("m")
        assert (broken["version"], broken["state"]) == (2, "END") and broken["error_code"] != "OK"
        assert broken["error_message"]
        assert (ok["version"], ok["state"], ok["error_code"]) == (1, "AVAILABLE", "OK")
        rest = requests.get(f"{srv.rest_url}/v1/models/m/versions/2", timeout=10).json()
        assert rest["model_version_status"][0]["status"]["error_code"] != "OK"
        assert client.predict("m", {"x": X}).version == 1


def test_reload_config(tmp_path, staged):
    put_version(str(tmp_path / "a"), 1, staged[1])
    put_version(str(tmp_path / "b"), 1, staged[2])
    with ModelServer([ServedModelConfig("a", str(tmp_path / "a"))], ServerOptions(port=0, rest_api_port=-1)) as srv, \
            PredictClient(srv.grpc_address) as client:
        stub = model_service_pb2_grpc.ModelServiceStub(client.channel)
        request = model_management_pb2.ReloadConfigRequest(
            config=to_model_server_config([ServedModelConfig("b", str(tmp_path / "b"))])
        )
        assert stub.HandleReloadConfigRequest(request, 30).status.error_code == 0
        assert client.predict("b", {"x": X})["total"].tolist() == [6.0]
        with pytest.raises(ServingError, match=r"Latest\(a\)"):
            client.predict("a", {"x": X})
        bad = model_management_pb2.ReloadConfigRequest(config=to_model_server_config([]))
        bad.config.model_config_list.config.add(name="c", base_path="/c", model_platform="onnx")
        with pytest.raises(grpc.RpcError) as info:
            stub.HandleReloadConfigRequest(bad, 30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unsupported platform" in info.value.details()
        assert client.predict("b", {"x": X})["total"].tolist() == [6.0]  # a rejected config changes nothing


# --- shutdown ----------------------------------------------------------------------------

SLEEPY = ServedModelConfig("sleepy", "export.server.testing:SleepServable", platform="python")


def test_graceful_shutdown_completes_in_flight_requests():
    srv = ModelServer([SLEEPY], ServerOptions(port=0, rest_api_port=0, allowed_python_modules=("export.server.testing",))).start()
    client = PredictClient(srv.grpc_address)
    results = {}

    def call_grpc():
        results["grpc"] = client.predict("sleepy", {"seconds": 1.0})["slept"]

    def call_rest():
        results["rest"] = requests.post(f"{srv.rest_url}/v1/models/sleepy:predict",
                                        json={"inputs": {"seconds": 1.0}}, timeout=30)

    threads = [threading.Thread(target=call_grpc), threading.Thread(target=call_rest)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while srv.metrics.in_flight.value() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started >= 0.5  # waited for the sleepers
    for thread in threads:
        thread.join()
    assert results["grpc"] == pytest.approx(1.0)
    assert results["rest"].status_code == 200 and results["rest"].json() == {"outputs": 1.0}
    with pytest.raises(ServingError) as info:  # nothing is accepted any more
        client.predict("sleepy", {"seconds": 0.0}, timeout=2)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{srv.rest_url}/healthz", timeout=2)
    client.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tfrec_serve_stops_gracefully_on_sigterm(tmp_path, capsys):
    config = tmp_path / "models.config"
    config.write_text(
        "model_config_list { config { name: 'sleepy' base_path: 'export.server.testing:SleepServable' "
        "model_platform: 'python' } }"
    )
    grpc_port, rest_port = _free_port(), _free_port()
    outcome, previous = {}, signal.getsignal(signal.SIGTERM)

    def drive():
        url, sleeper = f"http://127.0.0.1:{rest_port}", None
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    time.sleep(0.05)
            sleeper = threading.Thread(target=lambda: outcome.update(
                response=requests.post(f"{url}/v1/models/sleepy:predict", json={"inputs": {"seconds": 0.8}}, timeout=30)
            ))
            sleeper.start()
            time.sleep(0.3)  # the request is in flight
        finally:
            if signal.getsignal(signal.SIGTERM) is not previous:  # only once `tfrec serve` handles it
                os.kill(os.getpid(), signal.SIGTERM)
            if sleeper is not None:
                sleeper.join()

    driver = threading.Thread(target=drive)
    driver.start()
    code = main(["serve", "--model_config_file", str(config), "--port", str(grpc_port),
                 "--rest_api_port", str(rest_port), "--allowed_python_modules", "export.server.testing"])
    driver.join()
    assert code == 0
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    out = capsys.readouterr().out
    assert f"gRPC on 127.0.0.1:{grpc_port}" in out and f"REST on http://127.0.0.1:{rest_port}" in out
    assert out.rstrip().endswith("tfrec serve: stopped")
    assert outcome["response"].status_code == 200 and outcome["response"].json() == {"outputs": pytest.approx(0.8)}


def test_second_server_on_same_port_fails():
    with ModelServer([SLEEPY], ServerOptions(port=0, rest_api_port=-1, allowed_python_modules=("export.server.testing",))) as srv:
        with pytest.raises(ValueError, match=f"cannot bind gRPC to 127.0.0.1:{srv.grpc_port}"):
            ModelServer([SLEEPY], ServerOptions(port=srv.grpc_port, rest_api_port=-1, allowed_python_modules=("export.server.testing",))).start()


# --- warm-up requests (assets.extra/tf_serving_warmup_requests) -------------------------


def test_warmup_requests_are_replayed_at_load_and_a_failing_one_fails_the_version(tmp_path, staged):
    from export.saved_model import warmup_file_writer
    from export.server.servable import WARMUP_FILE, SavedModelServable, read_warmup_requests

    base = tmp_path / "m"
    put_version(str(base), 1, staged[1])
    records = [("serving_default", {"x": np.ones((size, 3), np.float32)}) for size in (1, 2, 4)]
    (base / "1" / "assets.extra").mkdir(exist_ok=True)
    warmup_file_writer("m", records)(base / "1" / WARMUP_FILE)
    read = read_warmup_requests(str(base / "1"))
    assert [(name, inputs["x"].shape) for name, inputs in read] == [("serving_default", (size, 3))
                                                                      for size in (1, 2, 4)]
    assert SavedModelServable("m", 1, str(base / "1")).warm_up() == 3
    assert read_warmup_requests(str(staged[1])) == []  # no file, nothing replayed
    # Version 2's record names an input the signature lacks; version 3's file is not TFRecords.
    put_version(str(base), 2, staged[2])
    (base / "2" / "assets.extra").mkdir(exist_ok=True)
    warmup_file_writer("m", [("serving_default", {"nope": np.ones((1, 3), np.float32)})])(base / "2" / WARMUP_FILE)
    put_version(str(base), 3, staged[2])
    (base / "3" / "assets.extra").mkdir(exist_ok=True)
    (base / "3" / WARMUP_FILE).write_bytes(b"not records")
    with ModelServer([ServedModelConfig("m", str(base), version_policy=VersionPolicy("all"))],
                     ServerOptions(port=0, rest_api_port=-1)) as srv, PredictClient(srv.grpc_address) as client:
        status = {s["version"]: s for s in client.status("m")}
        assert status[1]["state"] == "AVAILABLE"
        for version, message in ((2, "warm-up record 0 (serving_default) failed"), (3, "not a TFRecord file")):
            assert status[version]["state"] == "END"
            # the file named (the server shortens paths in statuses), and what is wrong with it
            assert "tf_serving_warmup_requests" in status[version]["error_message"]
            assert message in status[version]["error_message"]
        assert client.predict("m", {"x": X}).version == 1
