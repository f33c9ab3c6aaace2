"""Tests for tfrec.models.next_item: NextItemRecommender and keep_last.

Tiny synthetic data: vocab 30 (items 2..29), sequences follow the cycle
item k -> k + 1 (28 items, wrapping around). One model per backbone is trained
once per module (full softmax, graph mode) and shared by the scoring / windowing /
save-load tests; the sampled-loss tests train their own models for a handful of
eager steps (no tracing: cheaper for so few steps) on sequences that repeat one
item, which every backbone can start learning within a few steps.
"""

import keras
import numpy as np
import pytest

from tfrec.data.pipelines import training_dataset
from tfrec.data.vocab import NUM_RESERVED
from tfrec.layers import BERT4RecBackbone, GRU4RecBackbone, IdItemEncoder, SASRecBackbone
from tfrec.models.next_item import NextItemRecommender, keep_last

VOCAB = 30
NUM_ITEMS = VOCAB - NUM_RESERVED  # 28 real items
L = 6  # max_length
DIM = 16

PAIRS = {  # backbone name -> (objective, backbone factory)
    "sasrec": ("causal", lambda: SASRecBackbone(L, num_layers=1, num_heads=1, dropout=0.0)),
    "gru4rec": ("causal", lambda: GRU4RecBackbone(DIM, num_layers=1, dropout=0.0)),
    "bert4rec": ("cloze", lambda: BERT4RecBackbone(L, num_layers=1, num_heads=1, dropout=0.0)),
}
LOSSES = ("softmax", "sampled_softmax", "bce")


def cycle(start, n):
    """n consecutive items of the cycle 2 -> 3 -> ... -> 29 -> 2, starting at offset `start`."""
    return (np.arange(start, start + n) % NUM_ITEMS) + NUM_RESERVED


def next_item(item):
    return (item - NUM_RESERVED + 1) % NUM_ITEMS + NUM_RESERVED


# One sequence of L + 1 items per start: every transition k -> k+1 at every position.
SEQUENCES = [cycle(i, L + 1) for i in range(NUM_ITEMS)]
# Each item repeated: the next (or masked) item is the item itself.
REPEATS = [np.full(L + 1, k) for k in range(NUM_RESERVED, VOCAB)]


def make_model(name, loss="softmax", **kwargs):
    objective, backbone = PAIRS[name]
    kwargs.setdefault("num_negatives", 16)
    return NextItemRecommender(IdItemEncoder(VOCAB, DIM), backbone(), max_length=L,
                               objective=objective, loss=loss, seed=1, **kwargs)


def compile_model(model, learning_rate=0.05, run_eagerly=False):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), jit_compile=False, run_eagerly=run_eagerly)
    return model


def cloze_end_mask_data(mask_token_id):
    """Cloze rows whose mask sits right after 1..L-1 items: the slot `user_embedding` reads."""
    x, y = [], []
    for start in range(NUM_ITEMS):
        for n in range(1, L):
            row, target = np.zeros(L, np.int32), np.zeros(L, np.int32)
            row[:n] = cycle(start, n)
            row[n] = mask_token_id
            target[n] = next_item(row[n - 1])
            x.append(row)
            y.append(target)
    return np.array(x), np.array(y)


@pytest.fixture(scope="module")
def trained():
    """{backbone: (model, loss history)}, trained on the cycle with the full softmax."""
    models = {}
    for name in PAIRS:
        keras.utils.set_random_seed(0)
        model = compile_model(make_model(name))
        if model.objective == "causal":
            ds = training_dataset(SEQUENCES, L, batch_size=NUM_ITEMS, seed=0, bucket_batches=1)
            history = model.fit(ds, epochs=20, verbose=0)
        else:
            x, y = cloze_end_mask_data(model.mask_token_id)
            history = model.fit({"item_ids": x}, y, batch_size=len(x), epochs=40, verbose=0, shuffle=False)
        models[name] = (model, history.history["loss"])
    return models


@pytest.fixture(scope="module")
def untrained():
    """{backbone: freshly initialised model} (built by a first scoring call)."""
    models = {}
    for name in PAIRS:
        keras.utils.set_random_seed(0)
        models[name] = make_model(name)
    return models


# --------------------------------------------------------------------- training
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_training_reduces_loss(trained, name, loss):
    """A few steps of `model.fit` lower the loss, which stays finite.

    softmax: the module's cycle models (20 graph-mode steps, starting at log(28)).
    sampled_softmax / bce: fresh models, a few eager steps on the library's own
    pipeline (`training_dataset`, causal or cloze masking) over the REPEATS data.
    """
    if loss == "softmax":
        losses = trained[name][1]
        assert losses[0] == pytest.approx(np.log(NUM_ITEMS), rel=0.05)  # starts near uniform
        assert losses[-1] < 0.5 * losses[0]
    else:
        keras.utils.set_random_seed(0)
        model = compile_model(make_model(name, loss=loss), run_eagerly=True)
        ds = training_dataset(REPEATS, L, batch_size=NUM_ITEMS, objective=model.objective, mask_prob=0.4,
                              mask_token_id=model.mask_token_id, seed=0, bucket_batches=1)
        # The cloze model only sees its items through attention, which starts nearly
        # uniform: it needs more steps.
        losses = model.fit(ds, epochs=16 if model.objective == "cloze" else 6, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses


def test_popularity_sampling_uses_item_counts():
    model = make_model("sasrec", loss="sampled_softmax", sampling="popularity")
    counts = np.zeros(VOCAB)
    counts[2], counts[3] = 8, 1
    model.set_item_counts(counts)
    log_probs = keras.ops.convert_to_numpy(model.sampling_log_probs)
    assert np.all(np.isneginf(log_probs[:NUM_RESERVED]))
    probs = np.exp(log_probs[NUM_RESERVED:])
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs[0] / probs[1], 9 / 2, rtol=1e-5)  # counts + 1
    with pytest.raises(ValueError, match=r"item_counts must have shape \(30,\)"):
        model.set_item_counts(np.ones(5))


# --------------------------------------------------------------------- scoring
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_trained_model_predicts_the_cycle(trained, name):
    """Scoring reads the same position/direction that training taught: k -> k + 1."""
    model, _ = trained[name]
    for length in (1, 3, L - 1, L, L + 4):
        histories = np.stack([cycle(i, length) for i in range(NUM_ITEMS)])
        scores = keras.ops.convert_to_numpy(model.score_items(histories))
        predicted = scores.argmax(axis=1)
        accuracy = np.mean(predicted == next_item(histories[:, -1]))
        assert accuracy >= 0.9, f"history length {length}: accuracy {accuracy}"


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("is_trained", [False, True])
def test_score_items_shape_and_reserved_ids(trained, untrained, name, is_trained):
    model = trained[name][0] if is_trained else untrained[name]
    histories = np.array([[2, 3, 4, 0], [7, 0, 0, 0], [9, 8, 7, 6]])
    scores = keras.ops.convert_to_numpy(model.score_items(histories))
    assert scores.shape == (3, VOCAB)
    assert np.all(scores[:, :NUM_RESERVED] < -1e8)
    assert np.all(scores[:, :NUM_RESERVED].max(axis=1) < scores[:, NUM_RESERVED:].min(axis=1))
    assert np.all(np.isfinite(scores))
    top = np.argsort(-scores, axis=1)[:, : VOCAB - NUM_RESERVED]
    assert np.all(top >= NUM_RESERVED)


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("is_trained", [False, True])
def test_user_embedding_reads_only_the_window(trained, untrained, name, is_trained):
    model = trained[name][0] if is_trained else untrained[name]
    # The cloze model appends a mask token, so it reads max_length - 1 items.
    window = L - 1 if model.objective == "cloze" else L
    rng = np.random.default_rng(0)
    recent = rng.integers(2, VOCAB, size=(4, window))
    old_a = rng.integers(2, VOCAB, size=(4, 5))
    old_b = rng.integers(2, VOCAB, size=(4, 5))
    a = keras.ops.convert_to_numpy(model.score_items(np.concatenate([old_a, recent], 1)))
    b = keras.ops.convert_to_numpy(model.score_items(np.concatenate([old_b, recent], 1)))
    alone = keras.ops.convert_to_numpy(model.score_items(recent))
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, alone, atol=1e-5)
    # ... while the oldest item inside the window does matter (untrained model: the
    # trained cloze model attends to the previous item only, exactly).
    if not is_trained:
        changed = recent.copy()
        changed[:, 0] = (changed[:, 0] - 2 + 7) % NUM_ITEMS + 2
        c = keras.ops.convert_to_numpy(model.score_items(changed))
        assert not np.allclose(c[:, NUM_RESERVED:], alone[:, NUM_RESERVED:], atol=1e-6)
    # user_embedding itself: one vector per history.
    assert tuple(model.user_embedding(recent).shape) == (4, DIM)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_extra_right_padding_does_not_change_scores(trained, name):
    model, _ = trained[name]
    histories = [cycle(0, 2), cycle(5, 4), cycle(9, L + 3), cycle(3, 1)]
    tight = np.zeros((4, L + 3), np.int32)
    for row, h in enumerate(histories):
        tight[row, : len(h)] = h
    padded = np.concatenate([tight, np.zeros((4, 7), np.int32)], axis=1)
    want = keras.ops.convert_to_numpy(model.score_items(tight))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.score_items(padded)), want, atol=1e-5)
    for row, h in enumerate(histories):  # each history alone, unpadded
        alone = keras.ops.convert_to_numpy(model.score_items(h[None, :]))
        np.testing.assert_allclose(alone[0], want[row], atol=1e-5)


# --------------------------------------------------------------------- save / load
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_save_and_load(trained, name, tmp_path):
    model, _ = trained[name]
    histories = np.array([[2, 3, 4, 0, 0], [7, 8, 9, 10, 11], [5, 0, 0, 0, 0]])
    want = keras.ops.convert_to_numpy(model.score_items(histories))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is NextItemRecommender
    assert type(loaded.backbone) is type(model.backbone)
    assert (loaded.objective, loaded.max_length, loaded.loss_name) == (model.objective, L, "softmax")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded.score_items(histories)), want, atol=1e-6)


def test_config_round_trip_without_weights():
    keras.utils.set_random_seed(0)
    model = make_model("bert4rec", loss="bce", temperature=0.5, num_negatives=7)
    config = model.get_config()
    clone = NextItemRecommender.from_config(config)
    for key in ("max_length", "objective", "loss", "num_negatives", "sampling", "temperature", "seed",
                "loss_reduction", "label_smoothing"):
        assert clone.get_config()[key] == config[key]
    assert clone.mask_token_id == VOCAB
    assert isinstance(clone.backbone, BERT4RecBackbone) and isinstance(clone.item_encoder, IdItemEncoder)


# --------------------------------------------------------------------- keep_last
@pytest.mark.parametrize("window, expected", [
    (3, [[2, 3, 4], [7, 8, 9], [0, 0, 0], [6, 0, 0]]),                   # shorter / longer / empty
    (1, [[4], [9], [0], [6]]),
    (5, [[2, 3, 4, 0, 0], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0], [6, 0, 0, 0, 0]]),  # == seq_len
    (7, [[2, 3, 4, 0, 0, 0, 0], [5, 6, 7, 8, 9, 0, 0], [0] * 7, [6] + [0] * 6]),  # > seq_len
])
def test_keep_last_hand_cases(window, expected):
    ids = np.array([[2, 3, 4, 0, 0], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0], [6, 0, 0, 0, 0]], np.int32)
    out = keras.ops.convert_to_numpy(keep_last(ids, window))
    np.testing.assert_array_equal(out, expected)


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize("objective, backbone, match", [
    ("causal", lambda: BERT4RecBackbone(L), "needs objective='cloze'"),
    ("cloze", lambda: SASRecBackbone(L), "needs a bidirectional backbone"),
    ("cloze", lambda: GRU4RecBackbone(8), "needs a bidirectional backbone"),
])
def test_mismatched_objective_and_backbone(objective, backbone, match):
    with pytest.raises(ValueError, match=match):
        NextItemRecommender(IdItemEncoder(VOCAB, DIM), backbone(), max_length=L, objective=objective)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss="hinge"), "loss must be one of"),
    (dict(objective="mlm"), "objective must be one of"),
    (dict(sampling="zipf"), "sampling must be 'uniform' or 'popularity'"),
    (dict(loss_reduction="sum"), "loss_reduction must be one of"),
    (dict(label_smoothing=1.0), "label_smoothing must be in"),
    (dict(label_smoothing=0.1, loss="bce"), "label_smoothing needs loss='softmax'"),
])
def test_unknown_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NextItemRecommender(IdItemEncoder(VOCAB, DIM), SASRecBackbone(L), max_length=L, **kwargs)


# --------------------------------------------------------------------- loss reduction
def _per_target_losses(model, ids, targets):
    """Cross-entropy of every target position, computed by hand from the model's states."""
    states = keras.ops.convert_to_numpy(model({"item_ids": ids}, training=False))
    table = keras.ops.convert_to_numpy(model.item_encoder.all_items())[NUM_RESERVED:]
    rows, cols = np.nonzero(targets)
    logits = states[rows, cols] @ table.T
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(rows)), targets[rows, cols] - NUM_RESERVED]


def test_loss_reduction_targets_and_rows():
    """"targets": mean over the batch's targets; "rows": their sum over the batch's rows, so a
    long row's targets are not down-weighted against a short row's. Equal with one target per row."""
    keras.utils.set_random_seed(0)
    ids = np.array([[2, 3, 4, 5], [6, 7, 0, 0]], np.int32)
    targets = np.array([[3, 4, 5, 6], [7, 8, 0, 0]], np.int32)
    by_target = make_model("sasrec")
    by_row = NextItemRecommender.from_config({**by_target.get_config(), "loss_reduction": "rows"})
    by_target({"item_ids": ids}), by_row({"item_ids": ids})
    by_row.set_weights(by_target.get_weights())
    expected = _per_target_losses(by_target, ids, targets)  # 6 targets, 2 rows
    states = by_target({"item_ids": ids}, training=False)
    got_target = float(by_target.compute_loss(y=targets, y_pred=states))
    got_row = float(by_row.compute_loss(y=targets, y_pred=states))
    np.testing.assert_allclose(got_target, expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(got_row, expected.sum() / 2, rtol=1e-5)
    one = np.array([[0, 0, 0, 6], [0, 8, 0, 0]], np.int32)  # one target per row: the same loss
    np.testing.assert_allclose(float(by_row.compute_loss(y=one, y_pred=states)),
                               float(by_target.compute_loss(y=one, y_pred=states)), rtol=1e-6)


def test_label_smoothing_mixes_in_the_uniform_target():
    """The smoothed loss is Keras' smoothed categorical cross-entropy over the catalogue (reserved ids
    left out), and 0 gives the plain loss."""
    keras.utils.set_random_seed(0)
    ids = np.array([[2, 3, 4, 5], [6, 7, 0, 0]], np.int32)
    targets = np.array([[3, 4, 5, 6], [7, 8, 0, 0]], np.int32)
    plain = make_model("sasrec")
    smooth = NextItemRecommender.from_config({**plain.get_config(), "label_smoothing": 0.2})
    plain({"item_ids": ids}), smooth({"item_ids": ids})
    smooth.set_weights(plain.get_weights())
    states = plain({"item_ids": ids}, training=False)
    table = keras.ops.convert_to_numpy(plain.item_encoder.all_items())[NUM_RESERVED:]
    rows, cols = np.nonzero(targets)
    logits = keras.ops.convert_to_numpy(states)[rows, cols] @ table.T  # (6, catalogue)
    onehot = np.eye(table.shape[0])[targets[rows, cols] - NUM_RESERVED]
    want = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2)(onehot, logits)
    np.testing.assert_allclose(float(smooth.compute_loss(y=targets, y_pred=states)), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(plain.compute_loss(y=targets, y_pred=states)),
                               _per_target_losses(plain, ids, targets).mean(), rtol=1e-5)
    assert float(smooth.compute_loss(y=targets, y_pred=states)) != float(plain.compute_loss(y=targets, y_pred=states))


# --------------------------------------------------------------------- packed rows
def test_packed_rows_give_each_sequence_its_own_outputs():
    """Several sequences in one row (segment ids, restarting positions) give the states each gets
    alone; GRU4Rec cannot read packed rows and says so."""
    from tfrec.data.pipelines import causal_training_arrays, pack_rows

    keras.utils.set_random_seed(0)
    model = make_model("sasrec")
    seqs = [np.array([2, 3, 4]), np.array([5, 6]), np.array([7, 8, 9, 10])]
    inputs, targets = causal_training_arrays(seqs, L)
    packed, packed_targets = pack_rows(inputs, targets, L, seed=0)
    alone = keras.ops.convert_to_numpy(model({"item_ids": inputs}, training=False))
    together = keras.ops.convert_to_numpy(model({k: v for k, v in packed.items()}, training=False))
    for i, row in enumerate(inputs):
        n = int((row > 0).sum())
        r, c = np.argwhere((packed["item_ids"] == row[0]) & (packed["positions"] == 0))[0]
        np.testing.assert_allclose(together[r, c : c + n], alone[i, :n], atol=1e-5)
    # The same loss (every target once) packed or not.
    np.testing.assert_allclose(float(model.compute_loss(y=packed_targets, y_pred=together)),
                               float(model.compute_loss(y=targets, y_pred=alone)), rtol=1e-5)
    gru = make_model("gru4rec")
    with pytest.raises(ValueError, match="cannot read packed rows"):
        gru(packed)
