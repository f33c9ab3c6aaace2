"""Sequential SavedModel export: raw-token signatures, versions, metadata, CLI, stock ops.

Two tiny models (SASRec with temperature 0.5; BERT4Rec for the cloze path, used
by the equality tests only) are trained for a few eager steps on a 15-item
cycle and written once per module; every signature of the reloaded SavedModel
is checked against the Keras model itself.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfrec.serving.retrieval import EXCLUDED_SCORE, BruteForceIndex
from export.saved_model import (
    METADATA_FILE,
    WARMUP_BATCH_SIZES,
    catalog_table,
    export_sequential,
    vocab_fingerprint,
    write_saved_model,
)
from export.server.servable import read_warmup_requests
from export.stock_ops import NonStockOpsError, assert_stock_ops
import tfrec_cli as cli
from tfrec.config import ModelConfig
from tfrec.data.pipelines import pad_right, training_dataset
from tfrec.data.vocab import NUM_RESERVED, Vocabulary
from tfrec.training import build_model

TOKENS = [f"item-{i}" for i in range(12)] + ["é ü", "two words", "tab\there"]  # 15 items
VOCAB = Vocabulary(TOKENS)
L, K = 6, 5
TEMPERATURE = {"sasrec": 0.5, "bert4rec": 1.0, "gru4rec": 1.0}
HISTORIES = [  # padded with "" to one width; "" and unknown tokens anywhere
    ["item-0", "item-1", "item-2", "", "", "", "", "", "", ""],
    ["", "item-3", "not-an-item", "é ü", "", "", "", "", "", ""],
    [*TOKENS[:10]],  # longer than max_length
    ["two words", "tab\there", "", "", "", "", "", "", "", ""],
]


def train(backbone):
    keras.utils.set_random_seed(0)
    config = ModelConfig(backbone=backbone, embedding_dim=8, max_length=L, num_layers=1, num_heads=1,
                         dropout=0.0, temperature=TEMPERATURE[backbone])
    model = build_model(config, VOCAB.size, seed=0)
    # Eager: four steps cost less than tracing a train step.
    model.compile(optimizer=keras.optimizers.Adam(0.05), jit_compile=False, run_eagerly=True)
    sequences = [np.arange(s, s + L + 1) % len(TOKENS) + NUM_RESERVED for s in range(len(TOKENS))]
    data = training_dataset(sequences, L, 8, objective=model.objective, mask_token_id=model.mask_token_id, seed=0)
    model.fit(data, epochs=2, verbose=0)
    return model


@pytest.fixture(scope="module")
def export_of(tmp_path_factory):
    """`backbone -> (model, version dir, loaded SavedModel)`, built once per module."""
    cache = {}

    def get(backbone):
        if backbone not in cache:
            model = train(backbone)
            path = export_sequential(model, VOCAB, tmp_path_factory.mktemp(backbone) / "recommender", k=K,
                                     data_fingerprint="abc123")
            cache[backbone] = (model, path, tf.saved_model.load(str(path)))
        return cache[backbone]

    return get


@pytest.fixture
def sasrec(export_of):
    return export_of("sasrec")


def texts(tensor):
    """UTF-8 strings of a 2-D string tensor."""
    return np.array([[token.decode("utf-8") for token in row] for row in tensor.numpy()])


def recommend(loaded, histories, exclude):
    out = loaded.signatures["recommend"](history=tf.constant(histories), exclude_history=tf.constant(exclude))
    return texts(out["item_ids"]), out["scores"].numpy()


def known_ids(histories):
    """The in-vocabulary item ids of each history, in order."""
    return [[i for i in VOCAB.lookup(h).tolist() if i >= NUM_RESERVED] for h in histories]


def keras_top_k(model, histories, exclude):
    """Top-K tokens and scores from `model.score_items` on the known items of each history."""
    ids = known_ids(histories)
    scores = model.score_items(pad_right(ids, max(map(len, ids)))).numpy()[:, NUM_RESERVED:]
    for row, (items, drop) in enumerate(zip(ids, exclude)):
        if drop:
            scores[row, np.array(items) - NUM_RESERVED] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return np.array(TOKENS)[top], np.take_along_axis(scores, top, axis=1)


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec", "gru4rec"])
def test_recommend_equals_keras_top_k(export_of, backbone):
    model, _, loaded = export_of(backbone)
    for exclude in ([False] * 4, [True, False, True, True]):
        ids, scores = recommend(loaded, HISTORIES, exclude)
        want_ids, want_scores = keras_top_k(model, HISTORIES, exclude)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
        for row, history in enumerate(HISTORIES):
            if exclude[row]:
                assert not set(ids[row]) & set(history)
    default = loaded.signatures["serving_default"](history=tf.constant(HISTORIES),
                                                   exclude_history=tf.constant([False] * 4))
    np.testing.assert_array_equal(texts(default["item_ids"]), recommend(loaded, HISTORIES, [False] * 4)[0])


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec", "gru4rec"])
def test_user_embedding_feeds_retrieval_like_recommend(export_of, backbone):
    model, _, loaded = export_of(backbone)
    embedding = loaded.signatures["user_embedding"](history=tf.constant(HISTORIES))["embedding"].numpy()
    np.testing.assert_allclose(embedding, model.user_embedding(pad_right(known_ids(HISTORIES), 10)).numpy(), atol=1e-5)
    # Two-stage serving (user_embedding -> retrieval index) gives recommend's answer.
    retrieved = BruteForceIndex(*catalog_table(model, VOCAB), k=K).retrieve(embedding)
    ids, scores = recommend(loaded, HISTORIES, [False] * 4)
    np.testing.assert_array_equal(texts(retrieved["item_ids"]), ids)
    np.testing.assert_allclose(retrieved["scores"].numpy(), scores, atol=1e-5)


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec", "gru4rec"])
def test_xla_export_answers_as_the_plain_graph_at_every_batch_size(export_of, backbone, tmp_path):
    """The default (XLA, batches padded to powers of two) against `jit_compile=False`: same items,
    same scores, for batches that fall in several buckets and histories of every width."""
    model, path, loaded = export_of(backbone)
    assert json.loads((path / METADATA_FILE).read_text())["jit_compile"] is True
    plain_path = export_sequential(model, VOCAB, tmp_path / "plain", k=K, jit_compile=False)
    assert json.loads((plain_path / METADATA_FILE).read_text())["jit_compile"] is False
    plain = tf.saved_model.load(str(plain_path))
    # The XLA export ships warm-up requests (every batch bucket, both numeric signatures); the plain one none.
    warmup = read_warmup_requests(str(path))
    assert sorted({(name, len(inputs["history"])) for name, inputs in warmup}) == sorted(
        (name, size) for name in ("recommend", "user_embedding") for size in WARMUP_BATCH_SIZES)
    assert read_warmup_requests(str(plain_path)) == []
    rng = np.random.default_rng(0)
    for batch in (1, 3, 5, 8, 9):
        width = int(rng.integers(1, 12))
        histories = [[TOKENS[i] if i < len(TOKENS) else "" for i in rng.integers(0, len(TOKENS) + 3, width)]
                     for _ in range(batch)]
        histories = [h if any(h) else ["item-0"] + h[1:] for h in histories]
        exclude = rng.random(batch) < 0.5
        got_ids, got_scores = recommend(loaded, histories, exclude)
        want_ids, want_scores = recommend(plain, histories, exclude)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
        got = loaded.signatures["user_embedding"](history=tf.constant(histories))["embedding"].numpy()
        want = plain.signatures["user_embedding"](history=tf.constant(histories))["embedding"].numpy()
        assert got.shape == (batch, 8)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_long_history_reads_only_last_max_length(sasrec):
    _, _, loaded = sasrec
    long, recent = recommend(loaded, [TOKENS[:12]], [False]), recommend(loaded, [TOKENS[12 - L:12]], [False])
    np.testing.assert_array_equal(long[0], recent[0])
    np.testing.assert_allclose(long[1], recent[1], atol=1e-6)


def test_examples_signature_matches_recommend(sasrec):
    _, _, loaded = sasrec

    def example(history, exclude=None):
        feature = {"history": tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode() for t in history if t]))}
        if exclude is not None:
            feature["exclude_history"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(exclude)]))
        return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

    serialized = [example(HISTORIES[0], True), example(HISTORIES[1]),
                  example(HISTORIES[2], False), example(HISTORIES[3])]
    out = loaded.signatures["recommend_examples"](serialized=tf.constant(serialized))
    ids, scores = recommend(loaded, HISTORIES, [True, False, False, False])  # no feature = not excluded
    np.testing.assert_array_equal(texts(out["item_ids"]), ids)
    np.testing.assert_allclose(out["scores"].numpy(), scores, atol=1e-6)


def test_excluding_most_of_the_catalog_leaves_empty_slots(sasrec):
    _, _, loaded = sasrec
    ids, scores = recommend(loaded, [TOKENS[:12]], [True])  # 3 unseen items for K = 5 slots
    assert sorted(ids[0][:3]) == sorted(TOKENS[12:])
    assert ids[0][3:].tolist() == ["", ""]
    assert (scores[0][3:] == EXCLUDED_SCORE).all() and (scores[0][:3] > EXCLUDED_SCORE).all()


@pytest.mark.parametrize(
    "history, exclude, message",
    [
        ([["item-1"], [""]], [False, False], "no known item token"),
        ([["unknown-a", "unknown-b"]], [False], "no known item token"),
        ([["item-1"], ["item-2"]], [False], "one flag per history row"),
    ],
)
def test_bad_requests_are_invalid_argument(sasrec, history, exclude, message):
    _, _, loaded = sasrec
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        recommend(loaded, history, exclude)


def test_metadata_and_vocabulary_asset(sasrec):
    _, path, _ = sasrec
    meta = json.loads((path / METADATA_FILE).read_text())
    assert path.name == "1" and meta["version"] == 1 and meta["kind"] == "sequential"
    assert set(meta["signatures"]) == {"serving_default", "recommend", "user_embedding", "recommend_examples"}
    assert meta["signatures"]["recommend"]["inputs"] == {
        "history": {"dtype": "string", "shape": [None, None]},
        "exclude_history": {"dtype": "bool", "shape": [None]},
    }
    assert meta["signatures"]["recommend"]["outputs"]["item_ids"] == {"dtype": "string", "shape": [None, K]}
    assert meta["vocab"]["fingerprint"] == vocab_fingerprint(VOCAB) and meta["data_fingerprint"] == "abc123"
    assert meta["model_config"]["max_length"] == L and meta["k"] == K and meta["temperature"] == 0.5
    assert (path / "assets" / "item_vocab.txt").read_text(encoding="utf-8") == VOCAB.to_text()


class Doubler(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec((None,), tf.float32, name="x")])
    def double(self, x):
        return {"y": 2 * x}


def test_versions_are_numbered_and_published_whole(sasrec, tmp_path):
    module, base = Doubler(), tmp_path / "doubler"
    signatures = {"serving_default": module.double}
    assert write_saved_model(module, base, signatures).name == "1"
    assert write_saved_model(module, base, signatures, version=5).name == "5"
    assert write_saved_model(module, base, signatures, metadata={"note": "x"}).name == "6"
    assert sorted(p.name for p in base.iterdir()) == ["1", "5", "6"]  # no staging directories left
    assert json.loads((base / "6" / METADATA_FILE).read_text())["note"] == "x"
    loaded = tf.saved_model.load(str(base / "6"))
    np.testing.assert_allclose(loaded.signatures["serving_default"](x=tf.constant([1.5]))["y"].numpy(), [3.0])
    with pytest.raises(ValueError, match="version 5 already exists"):
        write_saved_model(module, base, signatures, version=5)
    for bad in (0, -1, "2", True):
        with pytest.raises(ValueError, match="version must be a positive int"):
            write_saved_model(module, base, signatures, version=bad)
    with pytest.raises(ValueError, match="must include 'serving_default'"):
        write_saved_model(module, base, {"double": module.double})
    with pytest.raises(ValueError, match="version 1 already exists"):  # before the model is traced
        export_sequential(sasrec[0], VOCAB, base, version=1)


def test_export_rejects_bad_arguments(sasrec, tmp_path):
    model = sasrec[0]
    with pytest.raises(ValueError, match="model has 17 item ids but the vocabulary has 16"):
        export_sequential(model, Vocabulary(TOKENS[:-1]), tmp_path)
    for k in (0, len(TOKENS) + 1):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 15\]"):
            export_sequential(model, VOCAB, tmp_path, k=k)
    assert not any(tmp_path.iterdir())


def test_cli_export_writes_servables_and_only_scann_needs_custom_ops(sasrec, tmp_path, capsys):
    model, first_export, _ = sasrec
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    model.save(run_dir / "model.keras")
    VOCAB.save(run_dir / "item_vocab.txt")
    (run_dir / "results.json").write_text(json.dumps({"data": {"fingerprint": "f00d"}}))
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny\noutput_dir: {tmp_path / 'runs'}\n")
    out = tmp_path / "servables"

    assert cli.main(["export", "--config", str(config), "--out", str(out), "--k", str(K), "--scann"]) == 0
    printed = capsys.readouterr().out
    recommender, bruteforce, scann = (
        out / name / "1" for name in ("recommender", "retrieval_bruteforce", "retrieval_scann")
    )
    for path in (recommender, bruteforce, scann):
        assert str(path) in printed and (path / "saved_model.pb").is_file()
    meta = json.loads((recommender / METADATA_FILE).read_text())
    assert meta["data_fingerprint"] == "f00d" and meta["experiment_config"]["name"] == "tiny"
    assert meta["model_config"] == json.loads((first_export / METADATA_FILE).read_text())["model_config"]
    retrieval = json.loads((scann / METADATA_FILE).read_text())
    assert retrieval["index"]["num_items"] == len(TOKENS) and retrieval["source"]["data_fingerprint"] == "f00d"
    assert meta["jit_compile"] is True and "--xla_cpu_compilation_enabled=true" in printed
    assert cli.main(["export", "--config", str(config), "--out", str(out), "--k", str(K), "--no-xla"]) == 0
    assert json.loads((out / "recommender" / "2" / METADATA_FILE).read_text())["jit_compile"] is False

    # One fresh process without scann: the recommender and brute force load and
    # use stock ops only; the ScaNN servable is flagged and fails to load there.
    with pytest.raises(NonStockOpsError) as caught:
        assert_stock_ops(recommender, bruteforce, scann)
    assert list(caught.value.offenders) == [scann]
    found = caught.value.offenders[scann]
    assert found["non_stock"] and all(op.startswith("Scann>") for op in found["non_stock"])
    assert "Op type not registered" in found["load_error"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/nonexistent/model.keras"], "no trained model at /nonexistent/model.keras"),
        (["--scann-num-leaves", "4"], "--scann-* options need --scann"),
        (["--k", "0"], "k must be an int in [1, 15]"),
    ],
)
def test_cli_export_errors_are_one_line(sasrec, argv, message, tmp_path, capsys):
    if "--model" not in argv:
        sasrec[0].save(tmp_path / "model.keras")
        VOCAB.save(tmp_path / "item_vocab.txt")
        argv = ["--model", str(tmp_path / "model.keras"), *argv]
    assert cli.main(["export", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
