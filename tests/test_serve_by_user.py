"""Serving by user id (issue 22): events ingested over REST, requests naming `user_id` instead of `history`.

Reuses the two-stage test's servables (tiny SASRec recommender, brute-force
retrieval, DIN ranker, two-stage composite). Every by-id answer must equal the
answer for the history the store holds, sent explicitly.
"""

import json
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from export.server import BatchingOptions, ModelServer, ServerOptions
from export.server.user_history import UserHistories
from history_servers import redis_server
from test_two_stage import model_configs, predict  # noqa: F401  (module fixture reused)
from tfrec.history import Event, open_store

EVENTS = [  # (user, item, timestamp, event id, feedback): out of timestamp order, with a tie (u1: item-9 and
    # item-2 at 30); feedback: ratings (> 1), clicks (1, 0.5) and non-clicks (0)
    ("u1", "item-5", 20, "a", 5.0), ("u1", "item-1", 10, "b", 2.0), ("u1", "item-9", 30, "c", 1.0),
    ("u1", "item-2", 30, "d", 0.0),
    ("u2", "item-3", 5, "a", 4.0), ("u2", "é ü", 6, "b", 0.5),
    ("u3", "item-7", 1, "a", 3.0), ("u3", "not-an-item", 2, "b", 5.0), ("u3", "item-11", 3, "c", 0.0),
]
HISTORY_OF = {"u1": ["item-1", "item-5", "item-9", "item-2"], "u2": ["item-3", "é ü"],
              "u3": ["item-7", "not-an-item", "item-11"]}
# What the server makes of them (feedback > 1: a rating, a click when >= 4; else a click when > 0), same order
FEEDBACK_OF = {"u1": {"history_ratings": [2, 5, 0, 0], "history_labels": [0, 1, 1, 0],
                      "history_timestamps": [10, 20, 30, 30]},
               "u2": {"history_ratings": [4, 0], "history_labels": [1, 1], "history_timestamps": [5, 6]},
               "u3": {"history_ratings": [3, 5, 0], "history_labels": [0, 1, 0], "history_timestamps": [1, 2, 3]}}
REQUEST_TIME = 1_000


def event_docs(events):
    return [{"user": u, "item": i, "timestamp": t, "event_id": e, **({"feedback": f[0]} if f else {})}
            for u, i, t, e, *f in events]


def rest(server, path, body=None, method=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.rest_url + path, data=data, method=method or ("POST" if data else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def start(configs, store_url=None, history_length=256):
    options = BatchingOptions(num_batch_threads=1, pad_variable_length_inputs=True, max_batch_size=8,
                              batch_timeout_micros=2_000)
    return ModelServer(configs, ServerOptions(port=0, rest_api_port=0, batching=options, history_store=store_url,
                                              history_length=history_length,
                                              allowed_python_modules=("export.two_stage",))).start()


def histories(users):
    rows = [HISTORY_OF[u] for u in users]
    out = np.full((len(rows), max(map(len, rows))), b"", dtype=object)
    for r, row in enumerate(rows):
        out[r, : len(row)] = [t.encode() for t in row]
    return out


def explicit_request(names, timestamp=REQUEST_TIME):
    """The explicit request equal to a by-id request of users `names` to a signature taking the feedback."""
    history = histories(names)
    out = {"history": history, "timestamp": np.full(len(names), timestamp, np.int64), "user": users(*names)}
    for field, dtype in (("history_ratings", np.float32), ("history_labels", np.float32),
                         ("history_timestamps", np.int64)):
        out[field] = np.zeros(history.shape, dtype)
        for r, name in enumerate(names):
            out[field][r, : len(FEEDBACK_OF[name][field])] = FEEDBACK_OF[name][field]
    return out


@pytest.fixture(scope="module")
def server(model_configs, tmp_path_factory):  # noqa: F811
    srv = start(model_configs, f"sqlite://{tmp_path_factory.mktemp('store') / 'events.db'}")
    status, body = rest(srv, "/v1/events", {"events": event_docs(EVENTS)})
    assert (status, body) == (200, {"received": len(EVENTS), "appended": len(EVENTS)})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(server.grpc_address) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def users(*names):
    return np.array([n.encode() for n in names], dtype=object)


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("model, signature, extra", [
    ("seq", "recommend", {"exclude_history": np.array([True, False, True])}),
    ("seq", "user_embedding", {}),
])
def test_grpc_by_user_id_equals_by_history(stub, model, signature, extra):
    by_id = predict(stub, model, signature, user_id=users("u1", "u2", "u3"), **extra)
    by_history = predict(stub, model, signature, history=histories(["u1", "u2", "u3"]), **extra)
    assert_same(by_id, by_history)


@pytest.mark.parametrize("signature, extra", [("recommend", {}), ("recommend_k", {"k": np.array(3, np.int32)})])
def test_two_stage_by_user_id_equals_by_history_with_feedback(stub, signature, extra):
    names = ["u1", "u2", "u3"]
    by_id = predict(stub, "two_stage", signature, user_id=users(*names),
                    timestamp=np.full(3, REQUEST_TIME, np.int64), **extra)
    assert_same(by_id, predict(stub, "two_stage", signature, **explicit_request(names), **extra))


def test_ranker_score_by_user_id_fills_feedback_times_and_user(stub):
    candidates = np.array([[b"item-4", b"item-6"], [b"item-8", b""]], dtype=object)
    by_id = predict(stub, "ctr", "score", user_id=users("u3", "u1"), candidates=candidates,
                    timestamp=np.full(2, REQUEST_TIME, np.int64))
    explicit = explicit_request(["u3", "u1"])
    assert_same(by_id, predict(stub, "ctr", "score", candidates=candidates, **explicit))
    no_feedback = {**explicit, "history_ratings": np.zeros_like(explicit["history_ratings"]),
                   "history_labels": np.zeros_like(explicit["history_labels"])}
    assert not np.allclose(by_id["probabilities"],  # the stored feedback reached the ranker
                           predict(stub, "ctr", "score", candidates=candidates, **no_feedback)["probabilities"])
    # without a timestamp: the server's clock (the events are decades old: one gap bucket either way)
    now = predict(stub, "ctr", "score", user_id=users("u3", "u1"), candidates=candidates)
    later = predict(stub, "ctr", "score", candidates=candidates, **explicit_request(["u3", "u1"], int(time.time())))
    np.testing.assert_allclose(now["probabilities"], later["probabilities"], atol=1e-6)
    assert not np.allclose(now["probabilities"], by_id["probabilities"])


def test_rest_by_user_id_row_and_columnar(server, stub):
    expected = predict(stub, "two_stage", "recommend", **explicit_request(["u2", "u1"], int(time.time())))
    status, columnar = rest(server, "/v1/models/two_stage:predict",
                            {"signature_name": "recommend", "inputs": {"user_id": ["u2", "u1"]}})
    assert status == 200
    assert columnar["outputs"]["item_ids"] == [[t.decode() for t in row] for row in expected["item_ids"]]
    np.testing.assert_allclose(columnar["outputs"]["scores"], expected["scores"], rtol=1e-6)
    status, rows = rest(server, "/v1/models/seq:predict", {"signature_name": "recommend", "instances": [
        {"user_id": "u1", "exclude_history": True}]})
    by_history = predict(stub, "seq", "recommend", history=histories(["u1"]), exclude_history=np.array([True]))
    assert status == 200 and rows["predictions"][0]["item_ids"] == [t.decode() for t in by_history["item_ids"][0]]


def test_new_events_change_the_answer_at_once(server, stub):
    status, body = rest(server, "/v1/events", {"events": event_docs([("u9", "item-4", 1, "x")])})
    assert (status, body) == (200, {"received": 1, "appended": 1})
    first = predict(stub, "seq", "user_embedding", user_id=users("u9"))["embedding"]
    rest(server, "/v1/events", {"events": event_docs([("u9", "item-13", 2, "y"), ("u9", "item-4", 1, "x")])})
    second = predict(stub, "seq", "user_embedding", user_id=users("u9"))["embedding"]
    assert not np.allclose(first, second)
    history = np.array([[b"item-4", b"item-13"]], dtype=object)
    np.testing.assert_array_equal(second, predict(stub, "seq", "user_embedding", history=history)["embedding"])


def test_unknown_user_and_bad_requests_are_clear_errors(server, stub):
    with pytest.raises(grpc.RpcError) as info:
        predict(stub, "seq", "user_embedding", user_id=users("u1", "nobody"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "'nobody' has no events" in info.value.details()
    status, body = rest(server, "/v1/models/two_stage:predict", {"inputs": {"user_id": ["nobody"]}})
    assert status == 404 and "cold start" in body["error"]
    with pytest.raises(grpc.RpcError) as info:  # both forms at once
        predict(stub, "seq", "user_embedding", user_id=users("u1"), history=histories(["u1"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        predict(stub, "seq", "user_embedding", user_id=np.array([[b"u1"]], dtype=object))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user_id" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        predict(stub, "seq", "user_embedding", user_id=users("x" * 300))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user:" in info.value.details()
    # still serving
    assert predict(stub, "seq", "user_embedding", user_id=users("u2"))["embedding"].shape[0] == 1


@pytest.mark.parametrize("events, needle", [
    ([{"user": "u7", "item": "a", "timestamp": 1, "event_id": "e"}, {"user": "u7", "item": "a", "timestamp": "x",
                                                                      "event_id": "f"}], "event 1: timestamp"),
    ([{"user": "u7", "item": "a", "timestamp": 1}], "event 0: event_id: missing"),
    ([{"user": "u7", "item": "a", "timestamp": 1, "event_id": "e", "extra": 1}], "extra: unknown field"),
    ([{"user": "u7", "item": "", "timestamp": 1, "event_id": "e"}], "event 0: item"),
    ([["u7", "a", 1, "e"]], "event 0: event: must be a JSON object"),
    ([], "non-empty"),
])
def test_bad_events_are_refused_and_nothing_written(server, events, needle):
    status, body = rest(server, "/v1/events", {"events": events})
    assert status == 400 and needle in body["error"]
    assert server.history_store.count("u7") == 0
    assert rest(server, "/v1/events", {"event": []})[0] == 400
    assert rest(server, "/v1/events", {"events": [{}] * 10_001})[0] == 400


def test_history_length_reads_the_most_recent(tmp_path):
    store = open_store(f"sqlite://{tmp_path / 'h.db'}")
    store.append([Event("u", f"i{t}", t, 1.0, f"e{t}") for t in range(10)])
    got = UserHistories(store, history_length=3).histories(users("u"))
    assert got.tolist() == [[b"i7", b"i8", b"i9"]]
    with pytest.raises(ValueError, match="max_read"):
        UserHistories(store, history_length=store.max_read + 1)
    with pytest.raises(Exception, match="limit of 2"):
        UserHistories(store, max_users=2).histories(users("u", "u", "u"))
    store.close()


def test_without_store_user_ids_and_events_are_refused(model_configs):  # noqa: F811
    srv = start(model_configs[:1])
    try:
        status, body = rest(srv, "/v1/events", {"events": event_docs(EVENTS[:1])})
        assert status == 501 and "--history_store" in body["error"]
        status, body = rest(srv, "/v1/models/seq:predict", {"signature_name": "user_embedding",
                                                            "inputs": {"user_id": ["u1"]}})
        assert status == 400 and "history store" in body["error"]
    finally:
        srv.stop()


def test_redis_store_serves_by_id_and_survives_redis_going_away(model_configs, tmp_path):  # noqa: F811
    with redis_server(tmp_path) as (url, process):
        srv = start(model_configs[:1], url)
        try:
            assert rest(srv, "/v1/events", {"events": event_docs(EVENTS)})[1]["appended"] == len(EVENTS)
            body = {"signature_name": "recommend", "inputs": {"user_id": ["u1", "u3"],
                                                              "exclude_history": [True, True]}}
            status, by_id = rest(srv, "/v1/models/seq:predict", body)
            hist = [[t.decode() for t in row] for row in histories(["u1", "u3"])]
            status2, by_history = rest(srv, "/v1/models/seq:predict", {"signature_name": "recommend", "inputs": {
                "history": hist, "exclude_history": [True, True]}})
            assert status == status2 == 200 and by_id == by_history
            process.kill()
            process.wait()
            status, err = rest(srv, "/v1/models/seq:predict", body)
            assert status == 503 and "unreachable" in err["error"]
            status, err = rest(srv, "/v1/events", {"events": event_docs(EVENTS[:1])})
            assert status == 503
            from tensorflow_serving.apis import prediction_service_pb2_grpc

            with grpc.insecure_channel(srv.grpc_address) as channel:
                grpc_stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                with pytest.raises(grpc.RpcError) as info:
                    predict(grpc_stub, "seq", "user_embedding", user_id=users("u1"))
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "unreachable" in info.value.details()
                embedding = predict(grpc_stub, "seq", "user_embedding", history=histories(["u1"]))["embedding"]
                assert embedding.shape[0] == 1
            status, again = rest(srv, "/v1/models/seq:predict", {"signature_name": "recommend", "inputs": {
                "history": hist, "exclude_history": [True, True]}})
            assert status == 200 and again == by_history  # requests with a history still served
        finally:
            srv.stop()


def test_tfrec_query_by_user_id(server, stub, capsys):
    from tfrec_cli import main

    argv = ["query", "--address", server.grpc_address, "--model", "seq", "--signature", "recommend",
            "--input", "user_id=u1", "--input", "exclude_history=[true]"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = predict(stub, "seq", "recommend", history=histories(["u1"]), exclude_history=np.array([True]))
    assert printed["outputs"]["item_ids"] == [[t.decode() for t in expected["item_ids"][0]]]


def test_events_acknowledged_by_a_killed_server_are_kept(tmp_path):
    """`tfrec serve --history_store` is SIGKILLed while a client posts events: every acknowledged one is stored."""
    import os
    import re
    import signal
    import subprocess
    import sys
    from types import SimpleNamespace

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    url = f"sqlite://{tmp_path / 'events.db'}"
    command = [sys.executable, "-m", "tfrec_cli", "serve", "--model_name", "none", "--model_base_path",
               str(tmp_path / "no-models"), "--port", "0", "--rest_api_port", "0", "--history_store", url]
    serve = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, "PYTHONPATH": root})
    try:
        rest_url = None
        for _ in range(20):
            line = serve.stdout.readline()
            match = re.search(r"REST on (http://\S+)", line)
            if match:
                rest_url = match.group(1)
                break
        assert rest_url, "the server did not report its REST port"
        server = SimpleNamespace(rest_url=rest_url)
        acknowledged = []

        def post_events():  # until the server dies
            for i in range(100_000):
                try:
                    status, body = rest(server, "/v1/events",
                                        {"events": event_docs([(f"k{i % 3}", f"item-{i}", i, f"e{i}")])})
                except OSError:
                    return
                assert (status, body["appended"]) == (200, 1)
                acknowledged.append(i)

        import threading

        client = threading.Thread(target=post_events)
        client.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        os.kill(serve.pid, signal.SIGKILL)  # mid-ingestion: the client is still posting
        serve.wait()
    client.join(30)
    assert len(acknowledged) >= 40
    store = open_store(url)
    stored = {e.item for u in range(3) for e in store.recent(f"k{u}", 10_000)}
    store.close()
    assert {f"item-{i}" for i in acknowledged} <= stored  # every acknowledged event survived
    assert len(stored) <= len(acknowledged) + 1  # at most the one in flight when killed
