"""Per-model batching parameters (TF Serving's `--enable_per_model_batching_parameters`).

With batching and the flag, a SavedModel version holding `batching_params.pbtxt` is batched
with those parameters (the server's batch threads stay shared), one without it is not batched
(as in TF Serving), a malformed file fails only that version's load, a composite batched with
the server's parameters can call such a model on one batch thread without deadlock, and
without batching the flag only warns.
"""

import logging
import os
import shutil
import threading

import numpy as np
import pytest

from export.client import PredictClient
from export.commands import server_options
from export.server import BatchingOptions, ServedModelConfig, ModelServer, ServerOptions
from export.server.config import PER_MODEL_BATCHING_FILE, load_per_model_batching_parameters
from export.server.core import ModelRef
from export.server.testing import save_toy_model
from tfrec_cli import build_parser

SCALE = 2.0
# A long timeout: the batch closes only once it holds max_batch_size rows.
OWN_PARAMS = "max_batch_size { value: 4 }\nbatch_timeout_micros { value: 30000000 }\n"
# The server-wide parameters: every request is its own batch.
SERVER_WIDE = BatchingOptions(max_batch_size=1, batch_timeout_micros=0, num_batch_threads=1)


@pytest.fixture(scope="module")
def toy_saved_model(tmp_path_factory):
    return save_toy_model(str(tmp_path_factory.mktemp("staged") / "toy"), scale=SCALE)


def add_model(root, name, source, params=None, where=PER_MODEL_BATCHING_FILE):
    """``root/name/1`` = a copy of ``source``, with ``params`` written to ``where`` inside the version."""
    version = root / name / "1"
    shutil.copytree(source, version)
    if params is not None:
        (version / where).parent.mkdir(parents=True, exist_ok=True)
        (version / where).write_text(params)
    return ServedModelConfig(name, str(root / name))


def predict_concurrently(srv, model, n):
    """``n`` single-row requests to ``model`` at once; their ``total`` answers in order."""
    results, errors, start = [None] * n, [], threading.Barrier(n)

    def call(i):
        start.wait()
        try:
            x = np.full((1, 3), i, np.float32)
            results[i] = float(srv.core.predict(ModelRef(model), {"x": x}).outputs["total"][0])
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return results


def batches(srv, model):
    """``(model calls, rows)`` recorded by batching for ``model``'s serving_default."""
    key = (model, "serving_default")
    return srv.metrics.batch_size.count(key), srv.metrics.batch_size.sum(key)


@pytest.fixture(scope="module")
def per_model_server(tmp_path_factory, toy_saved_model):
    root = tmp_path_factory.mktemp("models")
    configs = [
        add_model(root, "toy", toy_saved_model, OWN_PARAMS),  # "toy": what the composite ScaledTotal calls
        add_model(root, "plain", toy_saved_model),
        add_model(root, "broken", toy_saved_model, "max_batch_size { value: 0 }\n"),
        ServedModelConfig("plus_one", "export.server.testing:ScaledTotal", platform="python"),
    ]
    options = ServerOptions(port=0, rest_api_port=-1, batching=SERVER_WIDE, per_model_batching=True,
                            allowed_python_modules=("export.server.testing",))
    srv = ModelServer(configs, options).start()
    yield srv, root
    srv.stop()


def test_version_with_params_file_batches_with_its_own_parameters(per_model_server):
    srv, _ = per_model_server
    before = batches(srv, "toy")
    results = predict_concurrently(srv, "toy", 4)
    assert results == [3 * i * SCALE for i in range(4)]  # each caller gets its own row
    after = batches(srv, "toy")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 4)  # one call of 4 rows, not 4 calls of 1


def test_version_without_params_file_is_not_batched(per_model_server):
    srv, _ = per_model_server
    assert predict_concurrently(srv, "plain", 2) == [0.0, 3 * SCALE]
    assert batches(srv, "plain") == (0, 0.0)  # TF Serving: no batching_params.pbtxt, no batching


def test_malformed_params_file_fails_only_that_version(per_model_server):
    srv, root = per_model_server
    with PredictClient(srv.grpc_address) as client:
        (status,) = client.status("broken")
        assert (status["state"], status["error_code"]) == ("END", "INVALID_ARGUMENT")
        assert f".../{PER_MODEL_BATCHING_FILE}" in status["error_message"]  # named, without the server's path
        assert str(root) not in status["error_message"]
        assert "max_batch_size must be >= 1" in status["error_message"]
        assert client.predict("plain", {"x": np.ones((1, 3), np.float32)}).version == 1  # others keep serving
    assert not srv.registry.is_available("broken")


def test_composite_on_the_only_batch_thread_calls_a_per_model_batched_model(per_model_server):
    # plus_one is batched with the server's parameters; its batch holds the one batch slot while it
    # calls "toy" (own parameters, 30 s timeout). That inner call must run at once, unbatched:
    # waiting for toy's batch would wait for the slot plus_one holds, forever.
    srv, _ = per_model_server
    before_toy, before_composite = batches(srv, "toy"), batches(srv, "plus_one")
    x, answer = np.array([[1, 2, 3]], np.float32), []
    call = threading.Thread(target=lambda: answer.append(srv.core.predict(ModelRef("plus_one"), {"x": x})), daemon=True)
    call.start()
    call.join(20)  # well under toy's 30 s batch timeout
    assert answer, "the composite's inner call waited for a batch: deadlock"
    assert answer[0].outputs["total_plus_one"].tolist() == [6 * SCALE + 1]
    assert batches(srv, "plus_one")[0] == before_composite[0] + 1
    assert batches(srv, "toy")[0] == before_toy[0] + 1  # recorded as a 1-row call inside the composite's batch


def test_without_the_flag_the_params_file_is_ignored(tmp_path, toy_saved_model):
    config = add_model(tmp_path, "wide", toy_saved_model, OWN_PARAMS)
    srv = ModelServer([config], ServerOptions(port=0, rest_api_port=-1, batching=SERVER_WIDE)).start()
    try:
        predict_concurrently(srv, "wide", 2)
        assert batches(srv, "wide") == (2, 2.0)  # server-wide max_batch_size=1: two calls of one row
    finally:
        srv.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("tfrec-batcher-wide-")]
    assert not [t for t in srv.batch_scheduler._pool._threads if t.is_alive()]


def test_without_batching_the_flag_warns_and_does_nothing(tmp_path, toy_saved_model, caplog):
    config = add_model(tmp_path, "lone", toy_saved_model, OWN_PARAMS)
    with caplog.at_level(logging.WARNING, logger="export.server.server"):
        srv = ModelServer([config], ServerOptions(port=0, rest_api_port=-1, per_model_batching=True)).start()
    try:
        assert "need batching (--enable_batching): ignored" in caplog.text
        assert srv.batch_scheduler is None
        assert predict_concurrently(srv, "lone", 2) == [0.0, 3 * SCALE]
        assert batches(srv, "lone") == (0, 0.0)
    finally:
        srv.stop()


def test_load_per_model_batching_parameters(tmp_path, caplog):
    assert load_per_model_batching_parameters(str(tmp_path)) is None
    (tmp_path / "assets.extra").mkdir()
    (tmp_path / "assets.extra" / PER_MODEL_BATCHING_FILE).write_text(OWN_PARAMS)
    with caplog.at_level(logging.WARNING, logger="export.server.config"):
        assert load_per_model_batching_parameters(str(tmp_path)) is None  # TF Serving does not read it there
    assert "belong in" in caplog.text and str(tmp_path / PER_MODEL_BATCHING_FILE) in caplog.text
    (tmp_path / PER_MODEL_BATCHING_FILE).write_text(
        "max_batch_size { value: 8 } batch_timeout_micros { value: 500 } pad_variable_length_inputs: true\n"
        "max_padding_ratio { value: 2 }\n")
    options = load_per_model_batching_parameters(str(tmp_path))
    assert (options.max_batch_size, options.batch_timeout_micros, options.pad_variable_length_inputs,
            options.max_padding_ratio) == (8, 500, True, 2.0)
    (tmp_path / PER_MODEL_BATCHING_FILE).write_text("max_batch_size { value 8 }\n")
    with pytest.raises(ValueError, match="cannot parse") as info:
        load_per_model_batching_parameters(str(tmp_path))
    assert str(tmp_path / PER_MODEL_BATCHING_FILE) in str(info.value)


@pytest.mark.parametrize("flag", ["--enable_per_model_batching_parameters", "--enable_per_model_batching_params"])
def test_cli_flag(flag):
    base = ["serve", "--model_name", "m", "--model_base_path", os.sep + "m"]
    options = server_options(build_parser().parse_args(base + ["--enable_batching", flag]))
    assert options.per_model_batching and options.batching is not None
    options = server_options(build_parser().parse_args(base + [flag]))  # no --enable_batching: the server warns
    assert options.per_model_batching and options.batching is None
    assert not server_options(build_parser().parse_args(base + ["--enable_batching"])).per_model_batching
