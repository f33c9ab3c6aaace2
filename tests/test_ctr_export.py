"""CTR ranker export (`export.saved_model.export_ctr`, `tfrec ctr export`): raw tokens in, probabilities out.

Two tiny untrained CTR models (DIN and R2LED, seeded) over a 12-item vocabulary
are exported once per module; every signature of the reloaded SavedModel is
checked against `model.predict` on the ids a lifelong dataset would give
(`""` and unknown history tokens dropped, most recent `MAX_HISTORY` kept,
right-padded with 0), plus padding / unknown-candidate behaviour, the
`tf.Example` signature, metadata, stock ops and the CLI.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from export.saved_model import METADATA_FILE, PADDING_PROBABILITY, export_ctr, vocab_fingerprint
from export.stock_ops import assert_stock_ops
import tfrec_cli as cli
from tfrec.data.lifelong import gap_bucket
from tfrec.data.pipelines import pad_right
from tfrec.data.vocab import NUM_RESERVED, OOV_ID, Vocabulary
from tfrec.models.ctr_baselines import build_ctr_baseline
from tfrec.models.r2led import R2LED

TOKENS = [f"item-{i}" for i in range(10)] + ["é ü", "two words"]
VOCAB = Vocabulary(TOKENS)
MAX_HISTORY = 4
HISTORIES = [  # padded with "" to one width; "" and unknown tokens anywhere
    ["item-0", "item-1", "", "", "", "", ""],
    ["", "item-3", "not-an-item", "é ü", "", "", ""],
    ["item-2", "item-4", "item-6", "item-8", "item-9", "two words", "item-1"],  # longer than MAX_HISTORY
    ["unknown-a", "", "", "", "", "", ""],  # no known item: scored as an empty history
]
CANDIDATES = [
    ["item-5", "item-6", "", ""],
    ["two words", "brand-new", "item-0", ""],  # "brand-new" -> OOV
    ["item-3", "", "", ""],
    ["item-7", "é ü", "item-1", "item-2"],
]


def build(name):
    keras.utils.set_random_seed(0)
    if name == "din":
        model = build_ctr_baseline("din", VOCAB.size, embedding_dim=8, mlp_units=(8,), top_k=3)
    else:
        sids = np.random.default_rng(0).integers(0, 3, (VOCAB.size, 2))
        sids[:NUM_RESERVED] = -1
        model = R2LED(VOCAB.size, sids, sid_codebook_sizes=[3, 3], embedding_dim=8, mlp_units=(8,), top_k=2)
    model.compile()
    model.predict({"history_ids": np.array([[2, 3]]), "target_id": np.array([4])}, verbose=0)  # build
    return model


@pytest.fixture(scope="module")
def export_of(tmp_path_factory):
    """`name -> (model, version dir, loaded SavedModel)`, built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            model = build(name)
            path = export_ctr(model, VOCAB, tmp_path_factory.mktemp(name) / "ranker", max_history=MAX_HISTORY,
                              data_fingerprint="abc123", experiment_config={"name": "tiny"})
            cache[name] = (model, path, tf.saved_model.load(str(path)))
        return cache[name]

    return get


@pytest.fixture
def din(export_of):
    return export_of("din")


NOW = 1_700_000_000  # request time of the tiny requests


def feedback_of(histories):
    """Deterministic feedback of every history slot (padding and unknown tokens get some too)."""
    shape = np.array(histories, dtype=object).shape
    cols = np.arange(shape[1])[None, :] + 3 * np.arange(shape[0])[:, None]
    return {"history_ratings": np.where(cols % 3 == 0, 0.0, cols % 5 + 1).astype("float32"),
            "history_labels": (cols % 2).astype("float32"),
            "history_timestamps": (NOW - 4_000 * (40 - cols) ** 2).astype("int64"),  # oldest first
            "timestamp": np.full(shape[0], NOW, "int64"),
            "user": np.array(["u"] * shape[0], dtype=object)}


def request(histories, candidates, **overrides):
    inputs = {"history": np.array(histories, dtype=object), "candidates": np.array(candidates, dtype=object),
              **feedback_of(histories)}
    inputs.update(overrides)
    return {k: tf.constant(v) for k, v in inputs.items()}


def score(loaded, histories, candidates, **overrides):
    out = loaded.signatures["score"](**request(histories, candidates, **overrides))
    return out["probabilities"].numpy(), out["valid"].numpy()


def keras_probabilities(model, histories, candidates):
    """`model.score` on what a lifelong dataset would hold: known history items with their feedback,
    last MAX_HISTORY, right-padded; gap buckets of the request time minus each behaviour's time."""
    feedback = feedback_of(histories)
    rows = {k: [] for k in ("history_ids", "history_ratings", "history_labels", "history_gaps")}
    for r, history in enumerate(histories):
        ids = VOCAB.lookup(history)
        keep = [c for c, i in enumerate(ids.tolist()) if i >= NUM_RESERVED][-MAX_HISTORY:]
        rows["history_ids"].append(ids[keep].tolist())
        rows["history_ratings"].append(feedback["history_ratings"][r, keep].tolist())
        rows["history_labels"].append(feedback["history_labels"][r, keep].tolist())
        rows["history_gaps"].append(gap_bucket(NOW - feedback["history_timestamps"][r, keep]).numpy().tolist())
    features = {}
    for name, values in rows.items():
        dtype = "float32" if name in ("history_ratings", "history_labels") else "int32"
        out = np.zeros((len(values), MAX_HISTORY), dtype)
        for r, row in enumerate(values):
            out[r, : len(row)] = row
        features[name] = out  # (B, MAX_HISTORY) right-padded with 0
    features["user_id"] = np.full(len(histories), OOV_ID, "int32")  # exported without users: all unknown
    candidate_ids = VOCAB.lookup(np.array(candidates).reshape(-1)).astype("int32").reshape(len(candidates), -1)
    return np.asarray(model.score(features.pop("history_ids"), candidate_ids, **features))


@pytest.mark.parametrize("name", ["din", "r2led"])
def test_score_equals_keras_predict_on_mapped_ids(export_of, name):
    model, _, loaded = export_of(name)
    probabilities, valid = score(loaded, HISTORIES, CANDIDATES)
    want = keras_probabilities(model, HISTORIES, CANDIDATES)
    expected_valid = np.array(CANDIDATES) != ""
    np.testing.assert_array_equal(valid, expected_valid)
    np.testing.assert_allclose(probabilities[valid], want[valid], atol=1e-6)
    assert (probabilities[~valid] == PADDING_PROBABILITY).all()
    assert len(np.unique(probabilities[valid])) > 5  # the comparison is not vacuous
    default = loaded.signatures["serving_default"](**request(HISTORIES, CANDIDATES))
    np.testing.assert_array_equal(default["probabilities"].numpy(), probabilities)


def test_unknown_candidate_is_scored_as_oov(din):
    model, _, loaded = din
    probabilities, valid = score(loaded, [HISTORIES[0]], [["brand-new", "other-new"]])
    assert valid.all()
    assert probabilities[0, 0] == pytest.approx(probabilities[0, 1], abs=1e-7)  # both are the OOV id
    oov = keras_probabilities(model, [HISTORIES[0]], [["brand-new"]])
    assert probabilities[0, 0] == pytest.approx(float(oov[0, 0]), abs=1e-6)


def columns(histories, start, stop=None):
    """The feedback of `feedback_of(histories)` columns `[start, stop)` (a request cut out of a longer one)."""
    return {k: v[:, start:stop] for k, v in feedback_of(histories).items() if v.ndim == 2}


def test_long_history_reads_the_most_recent_max_history_and_padding_is_ignored(din):
    _, _, loaded = din
    long = score(loaded, [HISTORIES[2]], [CANDIDATES[3]])[0]
    recent = score(loaded, [HISTORIES[2][3:]], [CANDIDATES[3]], **columns([HISTORIES[2]], 3))[0]
    np.testing.assert_allclose(long, recent, atol=1e-6)
    padded = score(loaded, [HISTORIES[2] + [""] * 5], [CANDIDATES[3] + [""] * 3])[0]
    np.testing.assert_allclose(padded[:, :4], long, atol=1e-6)
    older = score(loaded, [HISTORIES[2][:4]], [CANDIDATES[3]], **columns([HISTORIES[2]], 0, 4))[0]
    assert not np.allclose(older, long)  # items beyond MAX_HISTORY were not read


def test_feedback_changes_the_score_and_unknown_tokens_drop_their_feedback(din):
    _, _, loaded = din
    base = score(loaded, [HISTORIES[0][:2]], [CANDIDATES[0]])[0]
    fb = columns([HISTORIES[0]], 0, 2)
    liked = {**fb, "history_ratings": np.array([[5.0, 5.0]], "float32"), "history_labels": np.ones((1, 2), "float32")}
    assert not np.allclose(score(loaded, [HISTORIES[0][:2]], [CANDIDATES[0]], **liked)[0], base)
    later = {**fb, "timestamp": np.array([NOW + 86_400 * 400], "int64")}  # other gap buckets
    assert not np.allclose(score(loaded, [HISTORIES[0][:2]], [CANDIDATES[0]], **later)[0], base)
    # unknown tokens and padding interleaved, each with feedback of its own: dropped together
    history = [["not-an-item", "item-0", "", "brand-new", "item-1", ""]]
    mixed = {"history_ratings": np.array([[5, fb["history_ratings"][0, 0], 1, 2, fb["history_ratings"][0, 1], 4]],
                                         "float32"),
             "history_labels": np.array([[1, fb["history_labels"][0, 0], 1, 0, fb["history_labels"][0, 1], 1]],
                                        "float32"),
             "history_timestamps": np.array([[NOW - 5, fb["history_timestamps"][0, 0], NOW - 1, 7,
                                              fb["history_timestamps"][0, 1], 0]], "int64")}
    np.testing.assert_allclose(score(loaded, history, [CANDIDATES[0]], **mixed)[0], base, atol=1e-6)


def test_empty_history_is_scored_like_an_all_padding_history(din):
    model, _, loaded = din
    probabilities, _ = score(loaded, [["", "unknown-a"]], [["item-7", "item-2"]])
    want = keras_probabilities(model, [["", "unknown-a"]], [["item-7", "item-2"]])
    np.testing.assert_allclose(probabilities, want, atol=1e-6)


def example(history, target=None, feedback=None, skip=()):
    """A serialized `tf.Example` of one ranker input row (`""` tokens dropped with their feedback);
    `feedback`: one row of `feedback_of`; `skip`: feature names left out."""
    feedback = feedback or feedback_of([history])
    row = {k: (v[0] if np.ndim(v) == 2 else v) for k, v in feedback.items()}
    keep = [c for c, t in enumerate(history) if t]

    def values(name, kind):
        data = np.atleast_1d(row[name])
        data = data[keep] if np.ndim(feedback[name]) == 2 else data[:1]
        if kind == "bytes":
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(v).encode() for v in data]))
        if kind == "float":
            return tf.train.Feature(float_list=tf.train.FloatList(value=data.tolist()))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=data.tolist()))

    feature = {"history": tf.train.Feature(bytes_list=tf.train.BytesList(value=[history[c].encode() for c in keep])),
               "history_ratings": values("history_ratings", "float"),
               "history_labels": values("history_labels", "float"),
               "history_timestamps": values("history_timestamps", "int"),
               "target_timestamp": values("timestamp", "int"),
               "user_id": values("user", "bytes")}
    if target is not None:
        feature["target"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[target.encode()]))
    feature = {k: v for k, v in feature.items() if k not in skip}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_score_examples_matches_score(din):
    _, _, loaded = din
    targets = ["item-5", "brand-new", "item-3", "é ü"]
    histories = HISTORIES + [[""] * 7]  # the last: no history
    feedback = feedback_of(histories)
    serialized = [example(h, t, {k: v[r:r + 1] for k, v in feedback.items()})
                  for r, (h, t) in enumerate(zip(histories, targets + ["item-1"]))]
    out = loaded.signatures["score_examples"](serialized=tf.constant(serialized))["probabilities"].numpy()
    want, _ = score(loaded, histories, [[t] for t in targets] + [["item-1"]])
    assert out.shape == (5,)
    np.testing.assert_allclose(out, want[:, 0], atol=1e-6)


def one_rating_too_many():
    parsed = tf.train.Example.FromString(example(["item-1", "item-2"], "item-3"))
    parsed.features.feature["history_ratings"].float_list.value.append(3.0)
    return parsed.SerializeToString()


def bad_score(loaded, **overrides):
    inputs = request([["item-1", ""], ["item-2", "item-3"]], [["item-3"], ["item-4"]])
    return loaded.signatures["score"](**{**inputs, **overrides})


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda l: bad_score(l, candidates=tf.constant([["item-3"]])), "candidates needs one row per history row"),
        (lambda l: bad_score(l, history_ratings=tf.zeros((2, 3))), "history_ratings, history_labels and "
                                                                  "history_timestamps need the shape of history"),
        (lambda l: bad_score(l, history_labels=tf.zeros((1, 2))), "need the shape of history"),
        (lambda l: bad_score(l, history_timestamps=tf.zeros((2, 1), tf.int64)), "need the shape of history"),
        (lambda l: bad_score(l, timestamp=tf.constant([1], tf.int64)), "timestamp needs one value per history row"),
        (lambda l: bad_score(l, user=tf.constant(["a", "b", "c"])), "user needs one token per history row"),
        (lambda l: l.signatures["score_examples"](serialized=tf.constant([example(["item-1"])])),
         "target"),
        (lambda l: l.signatures["score_examples"](serialized=tf.constant([example(["item-1"], "item-2",
                                                                                  skip=("user_id",))])),
         "user_id"),
        (lambda l: l.signatures["score_examples"](serialized=tf.constant([example(["item-1"], "item-3"),
                                                                          one_rating_too_many()])),
         "tf.Example feature history_ratings needs one value per history item"),
        (lambda l: l.signatures["score_examples"](serialized=tf.constant([example(["item-1"], "")])),
         "needs a non-empty target item token"),
    ],
)
def test_bad_requests_are_invalid_argument(din, call, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        call(din[2])


def test_metadata_and_vocabulary_asset(din):
    model, path, _ = din
    meta = json.loads((path / METADATA_FILE).read_text())
    assert path.name == "1" and meta["kind"] == "ctr" and meta["max_history"] == MAX_HISTORY
    assert set(meta["signatures"]) == {"serving_default", "score", "score_examples"}
    assert meta["signatures"]["score"]["inputs"] == {
        "history": {"dtype": "string", "shape": [None, None]},
        "candidates": {"dtype": "string", "shape": [None, None]},
        "history_ratings": {"dtype": "float32", "shape": [None, None]},
        "history_labels": {"dtype": "float32", "shape": [None, None]},
        "history_timestamps": {"dtype": "int64", "shape": [None, None]},
        "timestamp": {"dtype": "int64", "shape": [None]},
        "user": {"dtype": "string", "shape": [None]},
    }
    assert meta["signatures"]["score"]["outputs"] == {
        "probabilities": {"dtype": "float32", "shape": [None, None]},
        "valid": {"dtype": "bool", "shape": [None, None]},
    }
    assert meta["signatures"]["score_examples"]["outputs"] == {"probabilities": {"dtype": "float32", "shape": [None]}}
    assert meta["vocab"]["fingerprint"] == vocab_fingerprint(VOCAB) and meta["data_fingerprint"] == "abc123"
    assert meta["model_class"] == "TargetAttentionCTR" and meta["model_config"]["selector"] == "recent"
    assert meta["experiment_config"] == {"name": "tiny"} and meta["stock_ops_only"]
    assert (path / "assets" / "item_vocab.txt").read_text(encoding="utf-8") == VOCAB.to_text()


def test_rankers_use_stock_ops_only(export_of):
    paths = [export_of(name)[1] for name in ("din", "r2led")]
    ops = assert_stock_ops(*paths)  # a fresh TensorFlow-only process loads both
    assert all("LookupTableFindV2" in found for found in ops.values())


def test_export_rejects_bad_arguments(din, tmp_path):
    model = din[0]
    with pytest.raises(ValueError, match="model has 14 item ids but the vocabulary has 13"):
        export_ctr(model, Vocabulary(TOKENS[:-1]), tmp_path)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="max_history must be a positive int or None"):
            export_ctr(model, VOCAB, tmp_path, max_history=bad)
    with pytest.raises(ValueError, match="expected a CTRModel"):
        export_ctr(object(), VOCAB, tmp_path)
    assert not any(tmp_path.iterdir())


def test_cli_ctr_export_writes_the_ranker(din, tmp_path, capsys):
    model = din[0]
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    model.save(run_dir / "model.keras")
    VOCAB.save(run_dir / "item_vocab.txt")
    (run_dir / "results.json").write_text(json.dumps({"data": {"fingerprint": "f00d"}}))
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny\noutput_dir: {tmp_path / 'runs'}\nmodel:\n  name: din\n  max_history: 3\n")
    out = tmp_path / "servables"

    assert cli.main(["ctr", "export", "--config", str(config), "--out", str(out), "--version", "3"]) == 0
    path = out / "ranker" / "3"
    assert str(path) in capsys.readouterr().out
    meta = json.loads((path / METADATA_FILE).read_text())
    assert meta["kind"] == "ctr" and meta["max_history"] == 3 and meta["data_fingerprint"] == "f00d"
    assert meta["experiment_config"]["name"] == "tiny" and meta["experiment_config"]["model"]["max_history"] == 3
    loaded = tf.saved_model.load(str(path))
    probabilities = loaded.signatures["score"](**request(HISTORIES[:2], CANDIDATES[:2]))["probabilities"].numpy()
    want = keras_probabilities(model, HISTORIES[:2], CANDIDATES[:2])  # at most 2 known items: none cut
    np.testing.assert_allclose(probabilities[np.array(CANDIDATES[:2]) != ""],
                               want[np.array(CANDIDATES[:2]) != ""], atol=1e-6)

    assert cli.main(["ctr", "export", "--config", str(config), "--out", str(out), "--version", "3"]) == 2
    assert "version 3 already exists" in capsys.readouterr().err
    assert cli.main(["ctr", "export", "--config", str(config), "--out", str(out),
                     "--model", str(tmp_path / "none.keras")]) == 2
    err = capsys.readouterr().err
    assert "no trained model at" in err and "Traceback" not in err


# --- real lifelong samples: the served ranker = model.score on what training feeds ---------------------------
LIFELONG_HISTORY = 48


@pytest.fixture(scope="module")
def lifelong(tmp_path_factory):
    """`(data, samples, model, loaded)`: DIN with the wide part (user id, profile, genres) over the bundled
    movielens-1m-subset, every trainable weight randomised (so user and feedback weights matter), exported."""
    from tfrec.data.lifelong import LifelongSamples, load_lifelong_dataset
    from tfrec.models.ctr_wide import wide_options

    data = load_lifelong_dataset("movielens-1m-subset")
    train = data.splits["train"]
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(train), 24, replace=False))  # training histories: every item in the vocabulary
    samples = LifelongSamples(**{f: getattr(train, f)[pick] for f in train.__dataclass_fields__})
    keras.utils.set_random_seed(0)
    model = build_ctr_baseline("din", data.item_vocab.size, embedding_dim=8, mlp_units=(8,), top_k=6,
                               wide=wide_options(data))
    features, _ = next(iter(lifelong_batches(data, samples)))
    model.score(features["history_ids"][:1], features["target_id"][:1, None])  # build
    for weight in model.trainable_weights:
        weight.assign(rng.normal(0.0, 0.3, weight.shape).astype("float32"))
    path = export_ctr(model, data.item_vocab, tmp_path_factory.mktemp("lifelong") / "ranker",
                      max_history=LIFELONG_HISTORY, users=data.users, user_profiles=data.user_profiles)
    return data, samples, model, tf.saved_model.load(str(path))


def lifelong_batches(data, samples):
    from tfrec.data.lifelong import lifelong_dataset

    return lifelong_dataset(data, samples, batch_size=len(samples), max_history=LIFELONG_HISTORY)


def lifelong_request(data, samples, candidates):
    """The raw request of `samples`: each whole history (tokens, feedback, times), request time, user token."""
    rows = [range(s, e) for s, e in zip(samples.history_start.tolist(), samples.history_end.tolist())]
    width = max(map(len, rows))

    def padded(values, dtype, fill):
        out = np.full((len(rows), width), fill, dtype)
        for r, events in enumerate(rows):
            out[r, : len(events)] = values[list(events)]
        return out

    return {"history": padded(data.event_tokens.astype(object), object, ""),
            "candidates": np.array(candidates, dtype=object),
            "history_ratings": padded(np.nan_to_num(data.event_ratings, nan=0.0), "float32", 0.0),
            "history_labels": padded(data.event_labels, "float32", 0.0),
            "history_timestamps": padded(data.event_timestamps, "int64", 0),
            "timestamp": samples.timestamp.astype("int64"), "user": data.users[samples.user].astype(object)}


def served(loaded, inputs):
    return loaded.signatures["score"](**{k: tf.constant(v) for k, v in inputs.items()})["probabilities"].numpy()


def test_served_score_equals_offline_score_on_lifelong_samples(lifelong):
    data, samples, model, loaded = lifelong
    features, _ = next(iter(lifelong_batches(data, samples)))
    assert (samples.history_length > LIFELONG_HISTORY).any() and (samples.history_length < LIFELONG_HISTORY).any()
    tokens = np.asarray(["", ""] + list(data.item_vocab.tokens), dtype=object)  # by id (0, 1 reserved)
    others = np.random.default_rng(1).integers(NUM_RESERVED, data.item_vocab.size, (len(samples), 2))
    candidate_ids = np.concatenate([samples.target_id[:, None], others], axis=1).astype("int32")  # (B, 3)
    offline = np.asarray(model.score(features["history_ids"], candidate_ids,
                                     **{k: v for k, v in features.items() if k not in ("history_ids", "target_id")}))
    online = served(loaded, lifelong_request(data, samples, tokens[candidate_ids]))
    np.testing.assert_allclose(online, offline, atol=2e-6)
    assert offline.std() > 0.05  # randomised weights: the comparison is not vacuous
    target = np.asarray(model.predict(features, verbose=0))
    np.testing.assert_allclose(online[:, 0], target, atol=2e-6)  # = the training forward pass on the target


def test_feedback_user_and_time_all_reach_the_served_score(lifelong):
    data, samples, _, loaded = lifelong
    tokens = np.asarray(["", ""] + list(data.item_vocab.tokens), dtype=object)  # by id (0, 1 reserved)
    inputs = lifelong_request(data, samples, tokens[samples.target_id][:, None])
    base = served(loaded, inputs)
    for name, changed in [("history_labels", 1.0 - inputs["history_labels"]),
                          ("history_ratings", np.where(inputs["history_ratings"] > 0,
                                                       6 - inputs["history_ratings"], 0)),
                          ("timestamp", inputs["timestamp"] + 86_400 * 365),
                          ("user", inputs["user"][::-1].copy())]:
        assert not np.allclose(served(loaded, {**inputs, name: changed.astype(inputs[name].dtype)}), base), name


def test_unknown_user_is_scored_as_a_new_user(lifelong):
    data, samples, model, loaded = lifelong
    tokens = np.asarray(["", ""] + list(data.item_vocab.tokens), dtype=object)  # by id (0, 1 reserved)
    inputs = lifelong_request(data, samples, tokens[samples.target_id][:, None])
    online = served(loaded, {**inputs, "user": np.array(["no-such-user"] * len(samples), dtype=object)})
    features, _ = next(iter(lifelong_batches(data, samples)))
    features["user_id"] = np.full(len(samples), OOV_ID, "int32")
    features["user_profile"] = np.full((len(samples), data.user_profiles.shape[1]), OOV_ID, "int32")
    np.testing.assert_allclose(online[:, 0], np.asarray(model.predict(features, verbose=0)), atol=2e-6)
    assert not np.allclose(online[:, 0], served(loaded, inputs)[:, 0])


def test_export_needs_the_users_a_wide_model_reads(lifelong, tmp_path):
    data, _, model, _ = lifelong
    with pytest.raises(ValueError, match="user-id bias"):
        export_ctr(model, data.item_vocab, tmp_path)
    with pytest.raises(ValueError, match="user profile"):
        export_ctr(model, data.item_vocab, tmp_path, users=data.users)
    assert not any(tmp_path.iterdir())


def test_cli_ctr_export_gives_a_wide_model_its_users(lifelong, tmp_path):
    data, samples, model, loaded = lifelong
    run_dir = tmp_path / "runs" / "wide"
    run_dir.mkdir(parents=True)
    model.save(run_dir / "model.keras")
    data.item_vocab.save(run_dir / "item_vocab.txt")
    config = tmp_path / "wide.yaml"
    config.write_text(f"name: wide\noutput_dir: {tmp_path / 'runs'}\nmodel:\n  name: din\n"
                      f"  max_history: {LIFELONG_HISTORY}\n")
    assert cli.main(["ctr", "export", "--config", str(config), "--out", str(tmp_path / "servables")]) == 0
    exported = tf.saved_model.load(str(tmp_path / "servables" / "ranker" / "1"))
    tokens = np.asarray(["", ""] + list(data.item_vocab.tokens), dtype=object)  # by id (0, 1 reserved)
    inputs = lifelong_request(data, samples, tokens[samples.target_id][:, None])
    np.testing.assert_allclose(served(exported, inputs), served(loaded, inputs), atol=1e-6)
