"""`POST /v1/items` (issue 22 item 5): new items embedded by the server's encoder (`--items_encoder`) and added
to the delta file a served `DeltaRetrievalServable` follows; recommendable without a restart.

Reuses `tests/test_items_add.py`'s tiny SASRec recommender and brute-force retrieval export; the encoder is
`tests/items_encoders.py:vector_encoder` (a row's vector is its `vector` column).
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import items_encoders
from export.client import PredictClient
from export.items_add import MAX_FIELD_BYTES, MAX_REQUEST_ITEMS, load_delta
from export.server import ModelServer, ServerOptions
from export.server.config import ServedModelConfig as ServedModel
from test_items_add import export_models, user_query
from tfrec_cli.main import main

ENCODER = "items_encoders:vector_encoder"
ANSWER_KEYS = {"added", "replaced", "items", "generation", "seconds"}
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def rest(url, path, body=None, raw=None, timeout=60):
    """`(status, JSON answer)` of a REST call: POST `body` (or the bytes `raw`), else GET."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def reported_rest_url(serve, lines=20):
    """The REST url a `tfrec serve` subprocess prints among its first `lines` lines of stdout, else None."""
    for _ in range(lines):
        match = re.search(r"REST on (http://\S+)", serve.stdout.readline())
        if match:
            return match.group(1)
    return None


def csv(vector):
    return ",".join(repr(float(v)) for v in np.asarray(vector).ravel())


def item(item_id, vector, **extra):
    return {"item_id": item_id, "title": f"title of {item_id}", "vector": csv(vector), **extra}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("items_endpoint")
    configs = export_models(root)
    delta = root / "delta" / "items.npz"
    delta.parent.mkdir()
    server = ModelServer(configs(delta), ServerOptions(
        port=0, rest_api_port=0, allowed_python_modules=("export.delta_retrieval",), items_delta=str(delta),
        items_encoder=ENCODER)).start()
    client = PredictClient(server.grpc_address)
    yield {"server": server, "url": server.rest_url, "client": client, "delta": str(delta),
           "query": user_query(client), "root": root}
    client.close()
    server.stop()


def retrieve(live, model="live"):
    out = live["client"].predict(model, {"queries": live["query"]}, signature="retrieve")
    return [t.decode() for t in out["item_ids"][0]]


def wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return True


def stamp(path):
    """What identifies the delta file's content: (generation, bytes), or None when there is none."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as handle:
        return load_delta(path).generation, handle.read()


def test_posted_items_are_recommendable_without_restart(live):
    assert retrieve(live) == retrieve(live, "retrieval")
    posted_at = time.monotonic()
    status, body = rest(live["url"], "/v1/items", {"items": [item("posted-1", live["query"] * 100.0),
                                                             item("posted-2", live["query"] * -100.0)]})
    assert status == 200 and set(body) == ANSWER_KEYS, body
    assert (body["added"], body["replaced"]) == (2, 0) and body["items"] >= 2 and body["seconds"] >= 0
    wait_until(lambda: retrieve(live)[0] == "posted-1", 5)  # reload_seconds 0.1: well within
    assert time.monotonic() - posted_at < 5
    assert "posted-2" not in retrieve(live)  # its vector points away from the user
    got = load_delta(live["delta"])
    row = got.tokens.tolist().index("posted-1")
    np.testing.assert_allclose(got.vectors[row], live["query"][0] * 100.0, rtol=1e-6)
    # posting it again replaces it: now the worst item
    status, again = rest(live["url"], "/v1/items", {"items": [item("posted-1", live["query"] * -100.0)]})
    assert status == 200 and (again["added"], again["replaced"]) == (0, 1)
    assert again["generation"] == body["generation"] + 1
    wait_until(lambda: "posted-1" not in retrieve(live), 5)


LONG = "x" * (MAX_FIELD_BYTES + 1)


@pytest.mark.parametrize("items, needle", [
    ([{"item_id": "ok", "vector": "1"}, {"item_id": "b", "title": 3, "vector": "1"}], "items[1] field 'title': must be a string"),
    ([{"title": "no id", "vector": "1"}], "items[0]: no item_id"),
    ([{"item_id": "", "vector": "1"}], "items[0] field 'item_id': empty"),
    ([{"item_id": "a\tb", "vector": "1"}], "items[0] field 'item_id': contains a control character"),
    ([{"item_id": "x" * 257, "vector": "1"}], "items[0] field 'item_id'"),
    ([{"item_id": "a", "vector": "1"}, {"item_id": "a", "vector": "1"}], "items[1] field 'item_id': 'a' already"),
    ([{"item_id": "a", "vector": "1", "title": LONG}], f"more than the limit of {MAX_FIELD_BYTES}"),
    ([{"item_id": "a", "vector": "1"}, ["not", "an", "object"]], "items[1]: must be an object"),
    ([{"item_id": "a", "vector": "1", "title": None}], "items[0] field 'title': must be a string, got NoneType"),
    # a row the encoder would crash on comes first: the bad row is found before anything is encoded
    ([{"item_id": "a", "vector": "1", "fail": "crash"}, {"item_id": 7}], "items[1] field 'item_id'"),
    ([{"item_id": "\ud800", "vector": "1"}], "items[0] field 'item_id': not valid UTF-8"),  # JSON allows it
    ([{"item_id": "a", "vector": "1", "title": "x\udfff"}], "items[0] field 'title': not valid UTF-8"),
    ([], "non-empty"),
])
def test_bad_rows_are_400_naming_the_row_and_nothing_is_written(live, items, needle):
    rest(live["url"], "/v1/items", {"items": [item("baseline", live["query"])]})  # the delta file exists
    before, calls = stamp(live["delta"]), len(items_encoders.CALLS)
    status, body = rest(live["url"], "/v1/items", {"items": items})
    assert status == 400 and needle in body["error"], body
    assert stamp(live["delta"]) == before and len(items_encoders.CALLS) == calls


def test_malformed_documents_and_too_many_items_are_400(live):
    before = stamp(live["delta"])
    for document in ({"item": []}, {"items": {"item_id": "a"}}, {"items": [], "more": 1}):
        status, body = rest(live["url"], "/v1/items", document)
        assert status == 400 and "items" in body["error"], body
    assert rest(live["url"], "/v1/items", raw=b"[1, 2]")[0] == 400
    too_many = [{"item_id": f"n{i}", "vector": "1"} for i in range(MAX_REQUEST_ITEMS + 1)]
    status, body = rest(live["url"], "/v1/items", {"items": too_many})
    assert status == 400 and f"more than the limit of {MAX_REQUEST_ITEMS}" in body["error"], body
    assert stamp(live["delta"]) == before
    at_the_limit = [item(f"n{i}", live["query"] * -1.0) for i in range(MAX_REQUEST_ITEMS)]  # never recommended
    status, body = rest(live["url"], "/v1/items", {"items": at_the_limit})
    assert status == 200 and body["added"] + body["replaced"] == MAX_REQUEST_ITEMS, body


def test_encoder_failures_are_clear_errors_and_the_server_keeps_serving(live):
    rest(live["url"], "/v1/items", {"items": [item("baseline", live["query"])]})
    before = stamp(live["delta"])
    status, body = rest(live["url"], "/v1/items", {"items": [item("v", live["query"], fail="value")]})
    assert status == 400 and "the encoder refused the items: a row asks to be refused" in body["error"]
    status, body = rest(live["url"], "/v1/items", {"items": [item("c", live["query"], fail="crash")]})
    assert status == 500 and "the encoder failed: RuntimeError: the encoder crashed" in body["error"]
    status, body = rest(live["url"], "/v1/items", {"items": [item("n", live["query"], fail="nan")]})
    assert status == 500 and "NaN" in body["error"]
    status, body = rest(live["url"], "/v1/items", {"items": [item("w", [1.0, 2.0, 3.0])]})  # 3 dims, the delta 8
    assert status == 400 and "the delta file refused the items" in body["error"] and "dims" in body["error"]
    assert stamp(live["delta"]) == before
    assert retrieve(live)  # still serving
    status, body = rest(live["url"], "/v1/items", {"items": [item("after-errors", live["query"])]})
    assert status == 200 and body["added"] == 1


def test_concurrent_posts_lose_nothing_and_encode_one_at_a_time(live):
    batches = [[item(f"c{t}-{i}", live["query"] * (i + 1), sleep="0.1") for i in range(3)] for t in range(4)]
    answers, calls = [None] * len(batches), len(items_encoders.CALLS)

    def post(t):
        answers[t] = rest(live["url"], "/v1/items", {"items": batches[t]})

    threads = [threading.Thread(target=post, args=(t,)) for t in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(status == 200 for status, _ in answers), answers
    generations = sorted(body["generation"] for _, body in answers)
    assert generations == list(range(generations[0], generations[0] + len(batches)))  # one write each
    tokens = set(load_delta(live["delta"]).tokens.tolist())
    assert {row["item_id"] for batch in batches for row in batch} <= tokens
    spans = sorted((start, end) for _, start, end in items_encoders.CALLS[calls:])
    assert len(spans) == len(batches)
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))  # never two encodes at once


def test_without_items_delta_the_endpoint_is_unimplemented(tmp_path):
    server = ModelServer([ServedModel("none", str(tmp_path / "none"))], ServerOptions(port=0, rest_api_port=0)).start()
    try:
        status, body = rest(server.rest_url, "/v1/items", {"items": [{"item_id": "a"}]})
        assert status == 501 and "--items_delta" in body["error"]
    finally:
        server.stop()


@pytest.mark.parametrize("flags, needle", [
    (["--items_encoder", ENCODER], "--items_encoder needs --items_delta"),
    (["--items_delta", "{tmp}/d.npz"], "exactly one of --items_model"),
    (["--items_delta", "{tmp}/d.npz", "--items_model", "r", "--items_encoder", ENCODER], "exactly one of"),
    (["--items_delta", "{tmp}/d.npz", "--items_encoder", ENCODER, "--items_store", "s"], "--items_store goes with"),
    (["--items_delta", "{tmp}/d.npz", "--items_encoder", "no_such_module_x:f"], "--items_encoder: cannot load"),
    (["--items_delta", "{tmp}/d.npz", "--items_encoder", "nocolon"], "--items_encoder: --encoder must be"),
    (["--items_delta", "{tmp}/no/such/dir/d.npz", "--items_encoder", ENCODER], "--items_delta"),
    (["--items_delta", "{tmp}/bad.npz", "--items_encoder", ENCODER], "--items_delta: delta file"),
    (["--items_delta", "{tmp}/d.npz", "--items_model", "{tmp}/no-run"], "--items_model"),
    # the ranker side (--items_ranker RUN --items_ranker_out BASE): both or neither, with --items_delta
    (["--items_ranker", "r", "--items_ranker_out", "{tmp}/o"], "--items_ranker needs --items_delta"),
    (["--items_delta", "{tmp}/d.npz", "--items_encoder", ENCODER, "--items_ranker", "r"],
     "--items_ranker needs --items_ranker_out"),
    (["--items_delta", "{tmp}/d.npz", "--items_encoder", ENCODER, "--items_ranker_out", "{tmp}/o"],
     "--items_ranker_out goes with --items_ranker"),
    (["--items_delta", "{tmp}/d.npz", "--items_encoder", ENCODER, "--items_ranker_init", "zero"],
     "--items_ranker_init goes with --items_ranker"),
    (["--items_delta", "{tmp}/d.npz", "--items_encoder", ENCODER, "--items_ranker", "r", "--items_ranker_out",
      "{tmp}/o", "--items_ranker_init", "random"], "--items_ranker_init must be one of sid_neighbours, zero"),
    (["--items_delta", "{tmp}/d.npz", "--items_encoder", ENCODER, "--items_ranker", "{tmp}/no-run",
      "--items_ranker_out", "{tmp}/o"], "--items_ranker {tmp}/no-run: cannot load the ranker run"),
    (["--items_delta", "{tmp}/d.npz", "--items_encoder", ENCODER, "--items_ranker", "{tmp}/no-run",
      "--items_ranker_out", "{tmp}/bad.npz"], "--items_ranker_out {tmp}/bad.npz: exists and is not a directory"),
    (["--items_delta", "{tmp}/d.npz", "--items_encoder", ENCODER, "--items_ranker", "{tmp}/no-run",
      "--items_ranker_out", "{tmp}/no/such/o"], "--items_ranker_out {tmp}/no/such/o: it (or its folder) is missing"),
])
def test_bad_items_flags_fail_start_up_naming_the_flag(tmp_path, capsys, flags, needle):
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert main(["serve", "--model_name", "none", "--model_base_path", str(tmp_path / "none"), "--port", "0",
                 "--rest_api_port", "-1", *flags]) == 2
    assert needle.format(tmp=tmp_path) in capsys.readouterr().err


def test_tfrec_serve_with_items_flags(tmp_path):
    """`tfrec serve --items_delta --items_encoder` in its own process: a POST lands in the delta file."""
    delta = tmp_path / "items.npz"
    command = [sys.executable, "-m", "tfrec_cli", "serve", "--model_name", "none", "--model_base_path",
               str(tmp_path / "no-models"), "--port", "0", "--rest_api_port", "0", "--items_delta", str(delta),
               "--items_encoder", ENCODER]
    serve = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS])})
    try:
        url = reported_rest_url(serve)
        assert url, "the server did not report its REST port"
        status, body = rest(url, "/v1/items", {"items": [{"item_id": "cli-1", "vector": "1,2"}]})
        assert (status, body["added"], body["generation"]) == (200, 1, 1)
        assert load_delta(str(delta)).tokens.tolist() == ["cli-1"]
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0


def test_a_delta_no_served_model_follows_is_warned_about(tmp_path, caplog, live):
    options = dict(port=0, rest_api_port=0, items_delta=str(tmp_path / "d.npz"), items_encoder=ENCODER)
    with caplog.at_level("WARNING", logger="export.server.server"):
        ModelServer([ServedModel("none", str(tmp_path / "none"))], ServerOptions(**options))
    assert "no served model follows this file" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="export.server.server"):
        ModelServer([ServedModel("live", f"export.delta_retrieval:factory?retrieval=retrieval&delta={live['delta']}",
                                 platform="python")], ServerOptions(**{**options, "items_delta": live["delta"],
                                                      "allowed_python_modules": ("export.delta_retrieval",)}))
    assert "no served model follows" not in caplog.text
