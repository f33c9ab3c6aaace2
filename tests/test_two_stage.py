"""Two-stage serving (`export.two_stage`): recommender -> retrieval -> CTR ranker, one gRPC endpoint.

A tiny untrained SASRec (seeded) over a 20-item catalog is exported as the
recommender and a brute-force retrieval index returning its top `TOP_N` items;
a tiny DIN ranker is exported over a vocabulary in another order (so items
travel between stages as tokens). One `ModelServer` serves the three models and
two composite models configured through `base_path` options, with request
batching on (one batch slot). Over the stock `PredictionServiceStub`, the answer
must be exactly: the first `CANDIDATES` retrieved items outside the history,
ordered by the ranker's probability.
"""

from concurrent.futures import ThreadPoolExecutor

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tfrec.serving.retrieval import EXCLUDED_SCORE, BruteForceIndex
from export.saved_model import catalog_table, export_ctr, export_index, export_sequential
from export.server import BatchingOptions, ServedModelConfig, ModelServer, ServerOptions
from export.server.config import python_factory_spec
from export.two_stage import factory, select_candidates, top_by_probability
from tfrec.config import ModelConfig as RecommenderConfig
from tfrec.data.vocab import Vocabulary
from tfrec.models.ctr_baselines import build_ctr_baseline
from tfrec.training import build_model

TOKENS = [f"item-{i}" for i in range(19)] + ["é ü"]
TOP_N, CANDIDATES, K = 12, 8, 4
HISTORIES = np.array([
    [b"item-1", b"item-5", b"item-9", b"", b""],
    [b"item-2", "é ü".encode(), b"not-an-item", b"item-7", b"item-11"],
    [b"item-3", b"", b"", b"", b""],
], dtype=object)


NOW = 1_700_000_000  # request time


def with_feedback(history, user=b"u"):
    """`history` with the ranker's feedback inputs: one rating, click and time per slot (by column, so a
    row sent alone or in a batch, padded or not, carries the same feedback), the request time and user."""
    history = np.asarray(history, dtype=object)
    cols = np.broadcast_to(np.arange(history.shape[-1]), history.shape)
    return {"history": history, "history_ratings": ((cols * 3) % 6).astype("float32"),
            "history_labels": (cols % 2).astype("float32"),
            "history_timestamps": (NOW - 3_600 * (10 - cols) ** 2).astype("int64"),
            "timestamp": np.full(history.shape[:1], NOW, "int64"), "user": np.full(history.shape[:1], user, object)}


@pytest.fixture(scope="module")
def model_configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("servables")
    keras.utils.set_random_seed(0)
    vocab = Vocabulary(TOKENS)
    recommender = build_model(RecommenderConfig(backbone="sasrec", embedding_dim=8, max_length=6, num_layers=1,
                                                num_heads=1, dropout=0.0), vocab.size, seed=0)
    recommender.score_items(np.array([[2, 3, 0]]))  # build
    export_sequential(recommender, vocab, root / "recommender", k=3)
    export_index(BruteForceIndex(*catalog_table(recommender, vocab), k=TOP_N), root / "retrieval")
    ranker_vocab = Vocabulary(list(reversed(TOKENS)))  # another id order: stages exchange tokens
    ranker = build_ctr_baseline("din", ranker_vocab.size, embedding_dim=8, mlp_units=(8,), top_k=3)
    ranker.compile()
    ranker.predict({"history_ids": np.array([[2, 3]]), "target_id": np.array([4])}, verbose=0)  # build
    export_ctr(ranker, ranker_vocab, root / "ctr", max_history=4)
    configs = [
        ServedModelConfig("seq", str(root / "recommender")),
        ServedModelConfig("retrieval", str(root / "retrieval")),
        ServedModelConfig("ctr", str(root / "ctr")),
        ServedModelConfig("two_stage", "export.two_stage:factory?recommender=seq&retrieval=retrieval&ranker=ctr"
                                 f"&candidates={CANDIDATES}&k={K}", platform="python"),
        ServedModelConfig("no_ranker", "export.two_stage:factory?recommender=seq&retrieval=retrieval&ranker=missing",
                    platform="python"),
    ]
    return configs


def start_server(configs, **batching):
    # One batch slot: a composite holding it while its inner calls waited for batches would deadlock.
    options = BatchingOptions(num_batch_threads=1, pad_variable_length_inputs=True, **batching)
    return ModelServer(configs, ServerOptions(port=0, rest_api_port=-1, batching=options,
                                                  allowed_python_modules=("export.two_stage",))).start()


@pytest.fixture(scope="module")
def server(model_configs):
    srv = start_server(model_configs, max_batch_size=8, batch_timeout_micros=2_000)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def predict(stub, model, signature="", **inputs):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    response = stub.Predict(request, 30)
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def expected_answer(stub, history, k):
    """The two stages called one by one: first CANDIDATES retrieved items outside the history, by probability."""
    embedding = predict(stub, "seq", "user_embedding", history=history[None])["embedding"]
    retrieved = predict(stub, "retrieval", "retrieve", queries=embedding)
    top_n, retrieval_scores = retrieved["item_ids"][0].tolist(), retrieved["scores"][0]
    assert len(top_n) == TOP_N
    picked = [j for j, item in enumerate(top_n) if item not in set(history.tolist())][:CANDIDATES]
    candidates = np.array([[top_n[j] for j in picked]], dtype=object)
    ranked = predict(stub, "ctr", "score", candidates=candidates, **with_feedback(history[None]))
    probabilities = ranked["probabilities"][0]
    order = np.argsort(-probabilities, kind="stable")[:k]
    return candidates[0][order], probabilities[order], retrieval_scores[picked][order], set(top_n)


def test_two_stage_returns_reranked_retrieval_candidates_outside_the_history(stub):
    out = predict(stub, "two_stage", "", **with_feedback(HISTORIES))
    assert out["item_ids"].shape == out["scores"].shape == out["retrieval_scores"].shape == (len(HISTORIES), K)
    assert out["scores"].dtype == np.float32 and out["num_candidates"].tolist() == [CANDIDATES] * len(HISTORIES)
    reranked = 0
    for row, history in enumerate(HISTORIES):
        items, probabilities, retrieval_scores, top_n = expected_answer(stub, history, K)
        reranked += (np.diff(retrieval_scores) > 0).any()  # the ranker's order is not the retrieval order
        assert len(set(out["item_ids"][row])) == K and not set(out["item_ids"][row]) & set(history.tolist())
        assert set(out["item_ids"][row]) <= top_n
        np.testing.assert_array_equal(out["item_ids"][row], items)
        # The ranker's and the retrieval's own scores (batched with the other rows: equal up to float rounding).
        np.testing.assert_allclose(out["scores"][row], probabilities, atol=1e-6)
        np.testing.assert_allclose(out["retrieval_scores"][row], retrieval_scores, atol=1e-6)
        assert (np.diff(out["scores"][row]) <= 0).all() and (0 < out["scores"][row]).all()
    assert reranked  # the test is not vacuous
    same = predict(stub, "two_stage", "recommend", **with_feedback(HISTORIES))
    np.testing.assert_array_equal(same["item_ids"], out["item_ids"])


def test_two_stage_passes_the_feedback_to_the_ranker(stub):
    base = with_feedback(HISTORIES)
    liked = {**base, "history_ratings": np.full(HISTORIES.shape, 5.0, "float32"),
             "history_labels": np.ones(HISTORIES.shape, "float32")}
    out, out_liked = predict(stub, "two_stage", "", **base), predict(stub, "two_stage", "", **liked)
    assert not np.allclose(out["scores"], out_liked["scores"])  # the feedback reached the ranker
    for row in range(len(HISTORIES)):
        ranked = predict(stub, "ctr", "score", candidates=out_liked["item_ids"][row:row + 1],
                         **{k: v[row:row + 1] for k, v in liked.items()})
        np.testing.assert_allclose(out_liked["scores"][row], ranked["probabilities"][0], atol=1e-6)


def unpadded(row):
    """Row `row` of HISTORIES without its trailing padding: requests of different lengths."""
    history = HISTORIES[row]
    return history[: max(i + 1 for i, item in enumerate(history) if item)][None]


def test_concurrent_requests_merge_where_they_enter_the_two_stage_without_deadlock(stub, model_configs):
    alone = [predict(stub, "two_stage", "", **with_feedback(unpadded(row))) for row in range(len(HISTORIES))]
    # Four requests of lengths 3, 5, 1, 3 and a batch that closes at four rows (the timeout is far
    # away): they must run as ONE two-stage batch, padded to length 5, whose three stages are one
    # call each, inside the batch's slot (the only one).
    rows = [0, 1, 2, 0]
    srv = start_server(model_configs, max_batch_size=len(rows), batch_timeout_micros=30_000_000)
    try:
        with grpc.insecure_channel(srv.grpc_address) as channel:
            batched_stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            with ThreadPoolExecutor(len(rows)) as pool:
                answers = list(pool.map(
                    lambda row: predict(batched_stub, "two_stage", "", **with_feedback(unpadded(row))), rows))
        batch_size = srv.metrics.batch_size
        for model, signature in [("two_stage", "serving_default"), ("seq", "user_embedding"),
                                 ("retrieval", "retrieve"), ("ctr", "score")]:
            assert batch_size.count((model, signature)) == 1, (model, signature)
            assert batch_size.counts_above((model, signature), len(rows) - 1) == 1, (model, signature)
    finally:
        srv.stop()
    for row, answer in zip(rows, answers):
        np.testing.assert_array_equal(answer["item_ids"], alone[row]["item_ids"])
        np.testing.assert_allclose(answer["scores"], alone[row]["scores"], atol=1e-6)
        np.testing.assert_allclose(answer["retrieval_scores"], alone[row]["retrieval_scores"], atol=1e-6)


def test_recommend_k_takes_k_per_request(stub):
    full = predict(stub, "two_stage", "recommend", **with_feedback(HISTORIES))
    two = predict(stub, "two_stage", "recommend_k", **with_feedback(HISTORIES), k=np.int32(2))
    np.testing.assert_array_equal(two["item_ids"], full["item_ids"][:, :2])
    eight = predict(stub, "two_stage", "recommend_k", **with_feedback(HISTORIES[:1]), k=np.int32(CANDIDATES))
    np.testing.assert_array_equal(eight["item_ids"][:, :K], full["item_ids"][:1])


@pytest.mark.parametrize(
    "model, signature, inputs, code, message",
    [
        ("two_stage", "", {**with_feedback(HISTORIES[:1]), "history": np.array([b"item-1", b"item-2"], dtype=object)},
         grpc.StatusCode.INVALID_ARGUMENT, "expects shape [-1,-1]"),
        ("two_stage", "", {**with_feedback(HISTORIES[:1]), "history": np.array([[1, 2]], np.int32)},
         grpc.StatusCode.INVALID_ARGUMENT, "DT_STRING"),
        ("two_stage", "recommend_k", {**with_feedback(HISTORIES), "k": np.int32(CANDIDATES + 1)},
         grpc.StatusCode.INVALID_ARGUMENT, f"k must be in [1, {CANDIDATES}]"),
        ("two_stage", "", with_feedback([[b"unknown", b""]]),  # from the recommender
         grpc.StatusCode.INVALID_ARGUMENT, ("recommender model 'seq' (user_embedding)", "history has no known item")),
        ("no_ranker", "", with_feedback(HISTORIES), grpc.StatusCode.UNAVAILABLE, "ranker model 'missing' (score)"),
    ],
)
def test_errors_keep_their_status_and_the_server_stays_up(stub, model, signature, inputs, code, message):
    with pytest.raises(grpc.RpcError) as caught:
        predict(stub, model, signature, **inputs)
    assert caught.value.code() == code
    for part in (message,) if isinstance(message, str) else message:
        assert part in caught.value.details()
    assert predict(stub, "two_stage", "", **with_feedback(HISTORIES[:1]))["item_ids"].shape == (1, K)


def test_few_candidates_leave_empty_slots():
    history = np.array([[b"a", b"c", b""]], dtype=object)
    candidates, scores, counts = select_candidates(
        history, np.array([[b"a", b"b", b"c", b"", b"d"]], dtype=object), np.arange(5.0)[None], count=8)
    assert candidates.tolist() == [[b"b", b"d"]] and scores.tolist() == [[1.0, 4.0]] and counts.tolist() == [2]
    items, probabilities, retrieval = top_by_probability(candidates, np.array([[0.3, 0.7]]), scores, k=3)
    assert items.tolist() == [[b"d", b"b", b""]]
    np.testing.assert_allclose(probabilities, [[0.7, 0.3, EXCLUDED_SCORE]])
    np.testing.assert_allclose(retrieval, [[4.0, 1.0, EXCLUDED_SCORE]])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: factory("ts", None, k="200"), "k=200 exceeds candidates=100"),
        (lambda: factory("ts", None, candidates="ten"), "candidates must be a positive int, got 'ten'"),
        (lambda: factory("ts", None, rankers="x"), "unknown two-stage option(s) ['rankers']"),
        (lambda: factory("ts", None, ranker="ts"), "ranker must name another served model"),
        (lambda: python_factory_spec("export.two_stage:factory?k=1&k=2"), "repeat a key"),
        (lambda: python_factory_spec("export.two_stage:factory?k"), "'key=value' pairs"),
        (lambda: ServedModelConfig("ts", "export.two_stage:fac tory", platform="python"), "'package.module:factory"),
    ],
)
def test_configuration_errors_name_the_option(make, message):
    with pytest.raises(ValueError) as caught:
        make()
    assert message in str(caught.value)


def test_tf_serving_example_style_client_reads_typed_fields(server, stub):
    """As TF Serving's example clients: `outputs[...].float_val` / `string_val`, no make_ndarray (issue 21)."""
    def raw(model, signature, **inputs):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = signature
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        return stub.Predict(request, 30).outputs

    history = HISTORIES[:2]
    outputs = raw("seq", "recommend", history=history, exclude_history=np.array([True, False]))
    expected = server.core.predict_outputs("seq", {"history": history, "exclude_history": np.array([True, False])},
                                           signature="recommend")
    for name, field in (("item_ids", "string_val"), ("scores", "float_val")):
        assert not outputs[name].tensor_content
        assert [d.size for d in outputs[name].tensor_shape.dim] == list(expected[name].shape)
        assert list(getattr(outputs[name], field)) == pytest.approx(expected[name].ravel().tolist())
    candidates = np.array([[b"item-4", b"item-6", b""]] * 2, dtype=object)
    outputs = raw("ctr", "score", candidates=candidates, **with_feedback(history))
    expected = server.core.predict_outputs("ctr", {"candidates": candidates, **with_feedback(history)},
                                           signature="score")
    assert list(outputs["probabilities"].float_val) == pytest.approx(expected["probabilities"].ravel().tolist())
    assert len(outputs["probabilities"].float_val) == 6
