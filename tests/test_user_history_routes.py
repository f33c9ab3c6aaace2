"""Stateful R2LED routes through the server (issue 22 item 4): `score` by user id from the SID-prefix
buckets equals the stateless ranker over the whole history, under the condition of `tfrec.history.routes`.

One tiny untrained R2LED (2 SID levels, top_k 3) is exported once and served under two names on one
SQLite store: `r2led` (the store's routes are set for it) and `plain` (no routes: reads the whole
history). The user's 300 events: 40 match the candidates' level-1 codes (20 per code, 4 per level-2
prefix: every route has >= top_k matches, no bucket of 16 overflows), spread over time, the other 260
match none; the `recent` window (8) holds only non-matching ones.
"""

import json
import urllib.request

import keras
import numpy as np
import pytest

from export.routes import savedmodel_routes
from export.saved_model import export_ctr
from export.server import ModelServer, ServedModelConfig, ServerOptions
from export.server.user_history import feedback_columns
from test_two_stage import predict
from tfrec_cli.main import main
from tfrec.data.vocab import NUM_RESERVED, Vocabulary
from tfrec.history import open_store
from tfrec.models.ctr_baselines import build_ctr_baseline
from tfrec.models.r2led import R2LED

TOKENS = [f"it-{n}" for n in range(60)]
CODES = {f"it-{n}": (n % 6, (n // 6) % 5) for n in range(60)}  # two items per (level 1, level 2) prefix


def item_with(a, b, nth=0):
    return [t for t, c in CODES.items() if c == (a, b)][nth]


def user_events():
    """300 events of "long": level-1 codes 0 and 1 every 7th event up to t = 276, the rest codes 2..5."""
    events, matching, other = [], 0, 0
    for t in range(300):
        if t % 7 == 3 and matching < 40:  # t = 3 .. 276
            a, b = matching % 2, (matching // 2) % 5
            item, matching = item_with(a, b, matching % 3 % 2), matching + 1
        else:
            item, other = item_with(2 + other % 4, other % 5, other % 2), other + 1
        events.append({"user": "long", "item": item, "timestamp": 1000 + t, "event_id": f"e{t}",
                       "feedback": [1.0, 5.0, 0.0, 3.0][t % 4]})
    assert matching == 40
    return events


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("routes")
    keras.utils.set_random_seed(0)
    vocab = Vocabulary(TOKENS)
    sids = np.full((vocab.size, 2), -1)
    for token, codes in CODES.items():
        sids[vocab.tokens.index(token) + NUM_RESERVED] = codes
    model = R2LED(vocab.size, sids, sid_codebook_sizes=[6, 5], embedding_dim=8, mlp_units=(8,), top_k=3)
    model.compile()
    model.predict({"history_ids": np.array([[2, 3]]), "target_id": np.array([4])}, verbose=0)  # build
    rng = np.random.default_rng(0)
    for weight in model.weights:  # untrained embeddings are ~0.02: make the scores depend on the history
        if weight.path.endswith("embeddings"):
            weight.assign(rng.normal(0.0, 1.0, weight.shape).astype("float32"))
    version = export_ctr(model, vocab, root / "r2led")
    din = build_ctr_baseline("din", vocab.size, embedding_dim=8, mlp_units=(8,), top_k=3)
    din.compile()
    din.predict({"history_ids": np.array([[2, 3]]), "target_id": np.array([4])}, verbose=0)
    din_version = export_ctr(din, vocab, root / "din")
    url = f"sqlite://{root / 'events.db'}"
    assert main(["events", "routes", "--store", url, "--model_dir", str(version), "--model", "r2led",
                 "--bucket_size", "16", "--recent", "8"]) == 0
    configs = [ServedModelConfig("r2led", str(root / "r2led")), ServedModelConfig("plain", str(root / "r2led"))]
    server = ModelServer(configs, ServerOptions(port=0, rest_api_port=0, history_store=url,
                                                history_length=1024)).start()
    body = json.dumps({"events": user_events()}).encode()
    with urllib.request.urlopen(urllib.request.Request(server.rest_url + "/v1/events", data=body), timeout=60) as r:
        assert json.loads(r.read()) == {"received": 300, "appended": 300}
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield {"stub": prediction_service_pb2_grpc.PredictionServiceStub(channel), "url": url, "version": version,
           "din_version": din_version}
    channel.close()
    server.stop()


def by_id(stub, model, candidates):
    return predict(stub, model, "score", user_id=np.array([b"long"], dtype=object),
                   candidates=np.array([[c.encode() for c in candidates]], dtype=object),
                   timestamp=np.array([2000], np.int64))["probabilities"]


@pytest.mark.parametrize("candidates", [
    [item_with(0, 1), item_with(1, 3), item_with(0, 4, 1)],
    [item_with(1, 0)],
])
def test_stateful_scores_equal_stateless_over_the_whole_history(served, candidates):
    stateful = by_id(served["stub"], "r2led", candidates)
    stateless = by_id(served["stub"], "plain", candidates)
    np.testing.assert_allclose(stateful, stateless, rtol=1e-5, atol=1e-6)
    store = open_store(served["url"])
    try:
        gathered = store.route_events("long", candidates, store.routes.recent)
    finally:
        store.close()
    assert len(gathered) <= 20 * 2 + 8 < 300  # what the stateful request read instead of 300 events


def test_routes_cli_refuses_what_is_not_an_r2led_ranker(served, tmp_path):
    url = f"sqlite://{tmp_path / 'h.db'}"
    with pytest.raises(ValueError, match="stateful routes need an exported R2LED ranker"):
        savedmodel_routes(str(served["din_version"]), "din")
    with pytest.raises(ValueError, match="below the model's top_k=3"):
        savedmodel_routes(str(served["version"]), "r2led", bucket_size=2)
    with pytest.raises(ValueError, match="not an exported tfrec model"):
        savedmodel_routes(str(tmp_path), "x")
    assert main(["events", "routes", "--store", url, "--clear"]) == 0
    assert open_store(url).routes is None


def explicit(events, candidates):
    """The score request sending ``events`` (dicts, oldest first) as the history."""
    ratings, labels = feedback_columns(np.array([e["feedback"] for e in events]))
    return {"history": np.array([[e["item"].encode() for e in events]], dtype=object),
            "candidates": np.array([[c.encode() for c in candidates]], dtype=object),
            "history_ratings": ratings[None], "history_labels": labels[None],
            "history_timestamps": np.array([[e["timestamp"] for e in events]], np.int64),
            "timestamp": np.array([2000], np.int64), "user": np.array([b"long"], dtype=object)}


def test_the_buckets_bring_old_behaviours_the_recent_window_lacks(served):
    candidates = [item_with(0, 1), item_with(1, 3), item_with(0, 4, 1)]
    stateful = by_id(served["stub"], "r2led", candidates)
    events = user_events()
    whole = predict(served["stub"], "plain", "score", **explicit(events, candidates))["probabilities"]
    np.testing.assert_allclose(stateful, whole, rtol=1e-5, atol=1e-6)
    # the same number of behaviours, but the most recent ones: another answer (the test can tell)
    recent = predict(served["stub"], "plain", "score", **explicit(events[-48:], candidates))["probabilities"]
    assert np.abs(recent - stateful).max() > 1e-3


def test_an_unreachable_redis_store_is_unavailable_for_a_score_by_id():
    import time

    import grpc
    import tensorflow as tf

    from export.server.errors import ServingError
    from export.server.servable import Signature
    from export.server.user_history import UserHistories
    from history_servers import free_port

    store = open_store(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_seconds=0.5)  # nobody listens
    histories = UserHistories(store)
    signature = Signature.of("score", {"history": tf.TensorSpec([None, None], tf.string),
                                       "candidates": tf.TensorSpec([None, None], tf.string),
                                       "history_timestamps": tf.TensorSpec([None, None], tf.int64)}, {})
    time.sleep(1.05)  # past the routes' re-check interval: the request asks the store for them
    with pytest.raises(ServingError) as info:
        histories.replace_user_ids({"user_id": np.array([b"u"], dtype=object),
                                    "candidates": np.array([[b"it-1"]], dtype=object)}, signature, model="r2led")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "unreachable" in info.value.message
    store.close()
