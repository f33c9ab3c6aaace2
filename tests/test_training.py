"""Tests for tfrec.evaluation, tfrec.training and tfrec.config.

- `SequentialEvaluator` against hand-computed ranks, with a stub model (a plain
  class whose `score_items` looks fixed score rows up by the history's last item);
- leave-one-out on MovieLens-100K: no validation/test item leaks into training;
- `BestEpochTracker`: early stopping and best-weight restore with scripted metrics;
- end-to-end `train_sequential` on MovieLens-100K: a small SASRec beats popularity,
  writes its artifacts and is reproducible for a seed;
- `load_config`: overrides and error messages.
"""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfrec import metrics
from tfrec.config import ExperimentConfig, load_config
from tfrec.data.pipelines import causal_training_arrays
from tfrec.data.preprocess import leave_one_out, prepare
from tfrec.data.readers import DEFAULT_DATA_ROOT, load_dataset
from tfrec.data.vocab import Vocabulary
from tfrec.evaluation import SequentialEvaluator
from tfrec.training import BestEpochTracker, train_sequential

ML100K = DEFAULT_DATA_ROOT / "movielens-100k"
needs_ml100k = pytest.mark.skipif(not ML100K.is_dir(), reason="bundled movielens-100k not available")


# ============================================================= SequentialEvaluator
class LastItemStub:
    """`score_items` = a fixed score row chosen by each history's last item.

    The reserved ids 0/1 get the HIGHEST scores on purpose: the evaluator must
    never rank them. Also asserts the evaluator passes windows of at most
    `max_width` columns, right-padded.
    """

    def __init__(self, table, max_width):
        self.table = tf.constant(table, tf.float32)
        self.max_width = max_width

    def score_items(self, history_ids):
        h = tf.convert_to_tensor(history_ids)
        tf.debugging.assert_less_equal(tf.shape(h)[1], self.max_width)
        lengths = tf.reduce_sum(tf.cast(h > 0, tf.int32), axis=1)
        last = tf.gather(h, lengths - 1, batch_dims=1)
        return tf.gather(self.table, last)


VOCAB = 8  # ids 0, 1 reserved; items 2..7
MAX_LENGTH = 3
TABLE = np.zeros((VOCAB, VOCAB))
#                    0    1    2    3    4    5    6    7
TABLE[5] = [100, 100, 0.9, 0.5, 0.6, 0.8, 0.7, 0.55]  # user A: history [2, 5], target 3
TABLE[4] = [100, 100, 0.1, 0.2, 0.9, 0.3, 0.8, 0.0]   # user B: history [4], target 6
TABLE[3] = [100, 100, 0.6, 0.9, 0.6, 0.1, 0.7, 0.2]   # user C: history [7, 6, 4, 3], target 4
HISTORIES = [np.array([2, 5]), np.array([4]), np.array([7, 6, 4, 3])]
TARGETS = np.array([3, 6, 4])
KS = (1, 2, 4, 6)
# Pessimistic 0-based ranks worked out by hand:
# full:  A: 2, 4, 5, 6, 7 score >= 0.5 -> 5;  B: only 4 beats 0.8 -> 1;  C: 3, 6 and tie 2 -> 3.
# full, history excluded: A: 4, 6, 7 -> 3;  B: -> 0;  C: 7, 6, 3 dropped (target 4 kept) -> tie 2 -> 1.
# sampled2: negatives come from outside history + target. A: {4, 6, 7} all beat 0.5 -> 2;
#   B: {2, 3, 5, 7} all below 0.8 -> 0;  C: exactly {2, 5}: 2 ties -> 1.
RANKS = {"full": [5, 1, 3], "full_excl": [3, 0, 1], "sampled2": [2, 0, 1]}


def hand_metrics(ranks, ks=KS):
    out = {}
    for k in ks:
        out[f"hr@{k}"] = np.mean([r < k for r in ranks])
        out[f"ndcg@{k}"] = np.mean([1 / math.log2(r + 2) if r < k else 0.0 for r in ranks])
        out[f"mrr@{k}"] = np.mean([1 / (r + 1) if r < k else 0.0 for r in ranks])
    return out


def assert_metrics(got, ranks):
    want = hand_metrics(ranks)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def evaluate(order=(0, 1, 2), exclude_history=False, batch_size=1024, protocols=("full", "sampled2")):
    ev = SequentialEvaluator([HISTORIES[i] for i in order], TARGETS[list(order)], vocab_size=VOCAB,
                             max_length=MAX_LENGTH, protocols=protocols, ks=KS,
                             exclude_history=exclude_history, batch_size=batch_size, seed=3)
    return ev.evaluate(LastItemStub(TABLE, MAX_LENGTH))


def test_evaluator_hand_computed_full_and_sampled():
    result = evaluate()
    assert set(result) == {"full", "sampled2"}
    assert_metrics(result["full"], RANKS["full"])
    assert_metrics(result["sampled2"], RANKS["sampled2"])
    # A few literal values, independent of hand_metrics.
    assert result["full"]["hr@1"] == 0.0
    assert result["full"]["hr@4"] == pytest.approx(2 / 3)
    assert result["full"]["ndcg@6"] == pytest.approx((1 / math.log2(7) + 1 / math.log2(3) + 1 / math.log2(5)) / 3)
    assert result["sampled2"]["mrr@2"] == pytest.approx((1 / 1 + 1 / 2) / 3)


def test_evaluator_exclude_history():
    result = evaluate(exclude_history=True)
    assert_metrics(result["full"], RANKS["full_excl"])
    assert_metrics(result["sampled2"], RANKS["sampled2"])  # sampled negatives never include history


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
@pytest.mark.parametrize("batch_size", [1, 2, 1024])
def test_evaluator_user_order_and_batching_do_not_matter(order, batch_size):
    result = evaluate(order=order, batch_size=batch_size)
    assert_metrics(result["full"], RANKS["full"])
    assert_metrics(result["sampled2"], RANKS["sampled2"])


def test_evaluator_negatives_outside_history_and_target():
    ev = SequentialEvaluator(HISTORIES, TARGETS, VOCAB, MAX_LENGTH, protocols=("sampled2",), seed=0)
    negatives = ev.negatives["sampled2"]
    assert negatives.shape == (3, 2)
    for history, target, neg in zip(ev.histories, ev.targets, negatives):
        assert len(set(neg.tolist())) == 2
        assert not set(neg.tolist()) & (set(history.tolist()) | {int(target), 0, 1})


@pytest.mark.parametrize("histories, targets, match", [
    ([np.array([2]), np.array([], np.int64)], [3, 4], r"must not be empty; empty at users \[1\]"),
    ([np.array([2])], [3, 4], "one history per target"),
    ([], [], "at least one user"),
])
def test_evaluator_bad_inputs(histories, targets, match):
    with pytest.raises(ValueError, match=match):
        SequentialEvaluator(histories, np.array(targets), VOCAB, MAX_LENGTH)


@pytest.mark.parametrize("protocol", ["sampled", "top10", "Full", "sampled10x"])
def test_evaluator_unknown_protocol(protocol):
    with pytest.raises(ValueError, match="unknown protocol"):
        SequentialEvaluator(HISTORIES, TARGETS, VOCAB, MAX_LENGTH, protocols=("full", protocol))


class CountingStub(LastItemStub):
    """Counts Python executions of `score_items`: under tf.function, one per trace."""

    traces = 0

    def score_items(self, history_ids):
        self.traces += 1
        return super().score_items(history_ids)


def test_evaluator_does_not_retrace_on_every_call():
    ev = SequentialEvaluator(HISTORIES, TARGETS, VOCAB, MAX_LENGTH, protocols=("full",), ks=KS)
    model = CountingStub(TABLE, MAX_LENGTH)
    first = ev.evaluate(model)
    assert model.traces == 1  # one batch of one width
    assert ev.evaluate(model) == first
    assert model.traces == 1


# ============================================================= leakage (ML-100K)
@pytest.fixture(scope="module")
def ml100k():
    if not ML100K.is_dir():
        pytest.skip("bundled movielens-100k not available")
    data = prepare(load_dataset("movielens-100k").interactions)
    return data, leave_one_out(data.sequences)


@needs_ml100k
def test_leave_one_out_split_on_movielens(ml100k):
    data, split = ml100k
    assert len(split.eval_users) == len(data.sequences) == 943  # every ML-100K user has >= 20 ratings
    for e, u in enumerate(split.eval_users):
        s = data.sequences[u]
        np.testing.assert_array_equal(split.train[u], s[:-2])
        np.testing.assert_array_equal(split.valid_history[e], s[:-2])
        assert split.valid_targets[e] == s[-2]
        np.testing.assert_array_equal(split.test_history[e], s[:-1])
        assert split.test_targets[e] == s[-1]


@needs_ml100k
def test_training_windows_never_contain_evaluation_targets(ml100k):
    data, split = ml100k
    L = 50
    held_out = {}
    for e, u in enumerate(split.eval_users):
        held_out[int(u)] = {int(split.valid_targets[e]), int(split.test_targets[e])}
    for u, train in enumerate(split.train):
        if len(train) < 2:
            continue
        x, y = causal_training_arrays([train], L)
        # Every (input, target) pair is a consecutive pair of the user's training sequence.
        pairs = sorted(zip(x[x > 0].tolist(), y[y > 0].tolist()))
        assert pairs == sorted(zip(train[:-1].tolist(), train[1:].tolist()))
        seen = set(x[x > 0].tolist()) | set(y[y > 0].tolist())
        # (ML-100K has no repeated (user, item) pairs, so held-out items never appear at all.)
        assert not seen & held_out.get(u, set()), f"user {u} leaks {seen & held_out[u]}"


# ============================================================= BestEpochTracker
class ScriptedEvaluator:
    def __init__(self, values):
        self.values = list(values)
        self.calls = 0

    def evaluate(self, model):
        value = self.values[self.calls]
        self.calls += 1
        return {"full": {"ndcg@10": value, "hr@10": 2 * value}}


class WeightLog(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append([np.array(w) for w in self.model.get_weights()])


def test_best_epoch_tracker_stops_early_and_restores_best_weights():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False)
    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    evaluator = ScriptedEvaluator([0.1, 0.3, 0.2, 0.25, 0.9, 0.9])
    log = WeightLog()  # runs before the tracker: sees each epoch's weights
    tracker = BestEpochTracker(evaluator, monitor="ndcg@10", patience=2)
    history = model.fit(x, y, epochs=6, batch_size=16, verbose=0, callbacks=[log, tracker])
    assert evaluator.calls == 4  # best at epoch 2, epochs 3 and 4 do not improve -> stop
    assert tracker.best_epoch == 2 and tracker.best == 0.3
    assert [h["epoch"] for h in tracker.history] == [1, 2, 3, 4]
    assert history.history["val_ndcg@10"] == [0.1, 0.3, 0.2, 0.25]
    for got, want in zip(model.get_weights(), log.weights[1]):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(log.weights[3][0], log.weights[1][0])  # training did move on


# ============================================================= end to end (ML-100K)
def e2e_config(output_dir, name="e2e"):
    return load_config(None, [
        "data.dataset=movielens-100k", "model.backbone=sasrec", "model.embedding_dim=32",
        "model.num_layers=1", "model.max_length=20", "model.dropout=0.2", "train.epochs=6",
        "train.batch_size=128", "train.learning_rate=0.005", "train.seed=7",
        f"output_dir={output_dir}", f"name={name}",
    ])


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    if not ML100K.is_dir():
        pytest.skip("bundled movielens-100k not available")
    config = e2e_config(tmp_path_factory.mktemp("runs"))
    results, model, data = train_sequential(config, verbose=0, save=True)
    return config, results, model, data


@needs_ml100k
def test_e2e_sasrec_beats_popularity(e2e_run, ml100k):
    config, results, _, _ = e2e_run
    data, split = ml100k
    # Popularity baseline: score = training-item count, full ranking, reserved ids excluded.
    counts = np.bincount(np.concatenate(split.train), minlength=data.item_vocab.size).astype(np.float64)
    scores = np.tile(counts, (len(split.test_targets), 1))
    popularity = metrics.full_ranking_metrics(scores, split.test_targets, ks=(10,), exclude=[0, 1])
    model_ndcg = results["splits"]["test"]["full"]["ndcg@10"]
    assert model_ndcg > popularity["ndcg@10"], (model_ndcg, popularity)
    assert results["splits"]["test"]["full"]["hr@10"] > popularity["hr@10"]
    assert 1 <= results["best_epoch"] <= results["epochs"] <= 6
    assert all(np.isfinite(results["loss_curve"]))
    assert results["loss_curve"][-1] < results["loss_curve"][0]


@needs_ml100k
def test_e2e_artifacts(e2e_run):
    config, results, model, data = e2e_run
    run_dir = config.run_dir
    for name in ("results.json", "model.keras", "item_vocab.txt"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "logs").is_dir()
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["config"] == config.to_dict()
    for split in ("valid", "test"):
        assert set(saved["splits"][split]) == {"full", "sampled100"}  # protocols kept apart
        assert saved["splits"][split]["full"]["ndcg@10"] == pytest.approx(results["splits"][split]["full"]["ndcg@10"])
    assert Vocabulary.load(run_dir / "item_vocab.txt") == data.item_vocab
    loaded = keras.saving.load_model(run_dir / "model.keras")
    histories = np.array([data.sequences[0][-20:], data.sequences[1][-20:]])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded.score_items(histories)),
                               keras.ops.convert_to_numpy(model.score_items(histories)), atol=1e-5)


@needs_ml100k
def test_e2e_same_seed_same_results(e2e_run, tmp_path):
    config, results, _, _ = e2e_run
    again, _, _ = train_sequential(e2e_config(tmp_path, name="again"), verbose=0, save=False)
    assert again["splits"]["test"] == results["splits"]["test"]
    assert again["splits"]["valid"] == results["splits"]["valid"]
    assert again["loss_curve"] == results["loss_curve"]
    assert not (tmp_path / "again").exists()  # save=False writes nothing


# ============================================================= load_config
def test_load_config_defaults_and_overrides():
    assert load_config() == ExperimentConfig()
    cfg = load_config(None, [
        "train.epochs=3", "model.backbone=gru4rec", "eval.ks=[5,10]",
        "model.dropout=0.25", "eval.exclude_history=true", "name=run-1", "data.user_core=5",
        "data.user_core=7",  # the later override wins
        "train.learning_rate=0.01", "data.interactions_path=my.tsv", "train.max_train_seconds=60",
        "model.ffn_dim=128",
    ])
    assert cfg.data.interactions_path == "my.tsv"  # Optional[str] stays a string
    assert cfg.train.max_train_seconds == 60.0 and cfg.model.ffn_dim == 128
    assert cfg.train.epochs == 3 and cfg.model.backbone == "gru4rec"
    assert cfg.eval.ks == (5, 10)  # list -> tuple
    assert cfg.model.dropout == 0.25
    assert load_config(None, ["model.ffn_dim=null"]).model.ffn_dim is None
    assert cfg.eval.exclude_history is True and cfg.name == "run-1"
    assert cfg.data.user_core == 7 and cfg.train.learning_rate == 0.01
    assert cfg.run_dir.name == "run-1"
    assert cfg.model.embedding_dim == ExperimentConfig().model.embedding_dim  # untouched


def test_load_config_yaml_file_and_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from-file\nmodel: {backbone: bert4rec, dropout: 0.1}\ntrain:\n  epochs: 9\n")
    cfg = load_config(path, ["train.epochs=2"])
    assert (cfg.name, cfg.model.backbone, cfg.model.dropout, cfg.train.epochs) == ("from-file", "bert4rec", 0.1, 2)
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == ExperimentConfig()


@pytest.mark.parametrize("overrides, match", [
    (["model.hidden_size=3"], r"unknown config key\(s\) model\.hidden_size; valid: .*embedding_dim"),
    (["trian.epochs=3"], r"unknown config key\(s\) trian; valid: .*train"),
    (["epochs=3"], r"unknown config key\(s\) epochs"),
    (["train.epochs"], "must look like section.key=value"),
    (["train.seed=1", "train.seed.x=2"], "seed is not a section"),
    (["model=3"], "must be a mapping"),
])
def test_load_config_errors_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_load_config_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("eval: {protocol: [full]}\n")
    with pytest.raises(ValueError, match=r"eval\.protocol;"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


# Values are checked against the field types.
def test_load_config_scientific_notation_is_a_float():
    assert load_config(None, ["train.learning_rate=1e-3"]).train.learning_rate == 0.001


@pytest.mark.parametrize("override", ["train.epochs=abc", "train.epochs.x=3"])
def test_load_config_wrong_type_raises(override):
    with pytest.raises(ValueError, match="train.epochs"):
        load_config(None, [override])


def test_load_config_scalar_for_tuple_field():
    assert load_config(None, ["eval.protocols=full"]).eval.protocols == ("full",)
