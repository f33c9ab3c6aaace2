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
from tfrec import cli
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


def score(loaded, histories, candidates):
    out = loaded.signatures["score"](history=tf.constant(histories), candidates=tf.constant(candidates))
    return out["probabilities"].numpy(), out["valid"].numpy()


def keras_probabilities(model, histories, candidates):
    """`model.predict` per (history, candidate): known history items, last MAX_HISTORY, right-padded."""
    rows = []
    for history in histories:
        known = [i for i in VOCAB.lookup(history).tolist() if i >= NUM_RESERVED][-MAX_HISTORY:]
        rows.append(known)
    history_ids = pad_right(rows, MAX_HISTORY)  # (B, MAX_HISTORY), as lifelong_dataset
    width = len(candidates[0])
    target_ids = VOCAB.lookup(np.array(candidates).reshape(-1)).astype("int32")  # unknown -> OOV (1)
    probabilities = model.predict({"history_ids": np.repeat(history_ids, width, axis=0), "target_id": target_ids},
                                  verbose=0)
    return probabilities.reshape(len(histories), width)


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
    default = loaded.signatures["serving_default"](history=tf.constant(HISTORIES), candidates=tf.constant(CANDIDATES))
    np.testing.assert_array_equal(default["probabilities"].numpy(), probabilities)


def test_unknown_candidate_is_scored_as_oov(din):
    model, _, loaded = din
    probabilities, valid = score(loaded, [HISTORIES[0]], [["brand-new", "other-new"]])
    assert valid.all()
    assert probabilities[0, 0] == pytest.approx(probabilities[0, 1], abs=1e-7)  # both are the OOV id
    oov = model.predict({"history_ids": pad_right([VOCAB.lookup(["item-0", "item-1"]).tolist()], MAX_HISTORY),
                         "target_id": np.array([OOV_ID])}, verbose=0)
    assert probabilities[0, 0] == pytest.approx(float(oov[0]), abs=1e-6)


def test_long_history_reads_the_most_recent_max_history_and_padding_is_ignored(din):
    _, _, loaded = din
    long = score(loaded, [HISTORIES[2]], [CANDIDATES[3]])[0]
    recent = score(loaded, [["item-8", "item-9", "two words", "item-1"]], [CANDIDATES[3]])[0]
    np.testing.assert_allclose(long, recent, atol=1e-6)
    padded = score(loaded, [HISTORIES[2] + [""] * 5], [CANDIDATES[3] + [""] * 3])[0]
    np.testing.assert_allclose(padded[:, :4], long, atol=1e-6)
    older = score(loaded, [["item-2", "item-4", "item-6", "item-8"]], [CANDIDATES[3]])[0]
    assert not np.allclose(older, long)  # items beyond MAX_HISTORY were not read


def test_empty_history_is_scored_like_an_all_padding_history(din):
    model, _, loaded = din
    probabilities, _ = score(loaded, [["", "unknown-a"]], [["item-7", "item-2"]])
    want = model.predict({"history_ids": np.zeros((2, MAX_HISTORY), "int32"),
                          "target_id": VOCAB.lookup(["item-7", "item-2"]).astype("int32")}, verbose=0)
    np.testing.assert_allclose(probabilities[0], want, atol=1e-6)


def example(history, target=None):
    feature = {"history": tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode() for t in history if t]))}
    if target is not None:
        feature["target"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[target.encode()]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_score_examples_matches_score(din):
    _, _, loaded = din
    targets = ["item-5", "brand-new", "item-3", "é ü"]
    serialized = [example(h, t) for h, t in zip(HISTORIES, targets)] + [example([], "item-1")]  # no history
    out = loaded.signatures["score_examples"](serialized=tf.constant(serialized))["probabilities"].numpy()
    want, _ = score(loaded, HISTORIES + [[""] * 7], [[t] for t in targets] + [["item-1"]])
    assert out.shape == (5,)
    np.testing.assert_allclose(out, want[:, 0], atol=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda l: l.signatures["score"](history=tf.constant([["item-1"], ["item-2"]]),
                                         candidates=tf.constant([["item-3"]])),
         "candidates needs one row per history row"),
        (lambda l: l.signatures["score_examples"](serialized=tf.constant([example(["item-1"])])),
         "target"),
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
    probabilities = loaded.signatures["score"](history=tf.constant(HISTORIES[:2]),
                                               candidates=tf.constant(CANDIDATES[:2]))["probabilities"].numpy()
    want = keras_probabilities(model, HISTORIES[:2], CANDIDATES[:2])  # at most 2 known items: none cut
    np.testing.assert_allclose(probabilities[np.array(CANDIDATES[:2]) != ""],
                               want[np.array(CANDIDATES[:2]) != ""], atol=1e-6)

    assert cli.main(["ctr", "export", "--config", str(config), "--out", str(out), "--version", "3"]) == 2
    assert "version 3 already exists" in capsys.readouterr().err
    assert cli.main(["ctr", "export", "--config", str(config), "--out", str(out),
                     "--model", str(tmp_path / "none.keras")]) == 2
    err = capsys.readouterr().err
    assert "no trained model at" in err and "Traceback" not in err
