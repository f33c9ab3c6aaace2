"""Tests for tfrec.models.ctr_wide and the feedback/wide inputs every CTR model shares.

A small random log (users with profiles, items with genres, ratings) feeds R2LED and
the baselines: untrained models with the wide part score exactly the click prior's
AUC; bucketed-and-trimmed batches give the padded batches' outputs; feedback reaches
the models; the logistic-regression reference fits; save/load round trips.
"""

import numpy as np
import pandas as pd
import pytest

from tfrec.data.lifelong import attach_user_profiles, build_lifelong_data, lifelong_dataset
from tfrec.metrics import auc
from tfrec.models.ctr_baselines import CTR_BASELINES, build_ctr_baseline
from tfrec.models.ctr_wide import WideCTR, WidePart, feedback_tokens, fit_logistic_regression, wide_options
from tfrec.models.r2led import R2LED

NUM_ITEMS = 30


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        taste = rng.random()
        for t in sorted(rng.choice(10_000, size=rng.integers(5, 40), replace=False)):
            item = int(rng.integers(NUM_ITEMS))
            rating = float(np.clip(np.round(1 + 4 * (0.5 * taste + 0.5 * (item % 3) / 2) + rng.normal(0, 0.7)), 1, 5))
            rows.append((f"u{u}", f"i{item}", int(t) * 3600, rating))
    log = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    genres = ["Action|Comedy", "Drama", "Comedy|Drama|Horror"]
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(NUM_ITEMS)],
                          "genres": [genres[i % 3] for i in range(NUM_ITEMS)]})
    lifelong = build_lifelong_data(log, items, click_threshold=4.0, valid_fraction=0.2, test_fraction=0.2)
    profiles = pd.DataFrame({"user_id": [f"u{u}" for u in range(40)], "gender": list("MF") * 20,
                             "age": [str(18 + 7 * (u % 5)) for u in range(40)]})
    return attach_user_profiles(lifelong, profiles, ["gender", "age"])


def make_models(data, wide=True):
    options = wide_options(data) if wide else None
    v = data.item_vocab.size
    sids = np.random.default_rng(1).integers(0, 3, size=(v, 2))
    sids[:2] = -1
    models = {"r2led": R2LED(v, sids, embedding_dim=8, top_k=3, wide=options),
              "r2led-split": R2LED(v, sids, embedding_dim=8, top_k=3, wide=options, split_feedback=True)}
    for name in CTR_BASELINES:
        extra = {"item_genres": data.item_genres} if name == "sim-hard" else {}
        if name == "sim-soft":
            extra["item_semantic"] = np.random.default_rng(2).standard_normal((v, 4)).astype("float32")
        models[name] = build_ctr_baseline(name, v, embedding_dim=8, top_k=4, wide=options, **extra)
    return models


def predictions(model, dataset):
    return np.concatenate([np.asarray(model(x)) for x, _ in dataset])


def test_untrained_wide_models_score_the_prior_auc(data):
    samples = data.splits["test"]
    prior_auc = auc(samples.label, data.item_click_prior()[samples.target_id])
    dataset = lifelong_dataset(data, "test", batch_size=16, max_history=16)
    for name, model in make_models(data).items():
        p = predictions(model, dataset)
        np.testing.assert_allclose(p, data.item_click_prior()[samples.target_id], rtol=1e-5, err_msg=name)
        assert auc(samples.label, p) == pytest.approx(prior_auc, abs=1e-9), name


def test_trimmed_bucketed_batches_give_the_padded_outputs(data):
    """Models with random weights (no wide part, so the deep part matters) score every
    training sample the same from padded batches and from length-bucketed, trimmed ones."""
    padded = lifelong_dataset(data, "train", batch_size=8, max_history=24, trim_to_longest=False)
    bucketed = list(lifelong_dataset(data, "train", batch_size=8, max_history=24, shuffle=True, seed=3))  # 1st pass
    # recover the sample order of the bucketed batches from their features
    from tfrec.data.lifelong import BUCKET_WINDOW, batch_indices

    order = np.concatenate(batch_indices(np.minimum(data.splits["train"].history_length, 24), 8,
                                         np.random.default_rng(3), BUCKET_WINDOW))
    for name, model in make_models(data, wide=False).items():
        reference = predictions(model, padded)
        trimmed = predictions(model, bucketed)
        assert max(x["history_ids"].shape[1] for x, _ in bucketed) == 24 > bucketed[0][0]["history_ids"].shape[1]
        np.testing.assert_allclose(trimmed, reference[order], atol=1e-5, err_msg=name)


def test_feedback_reaches_every_model(data):
    x, _ = next(iter(lifelong_dataset(data, "test", batch_size=16, max_history=16)))
    flipped = {**x, "history_labels": 1.0 - x["history_labels"], "history_ratings": 6.0 - x["history_ratings"]}
    for name, model in make_models(data, wide=False).items():
        assert not np.allclose(model(x), model(flipped), atol=1e-6), name
    off = build_ctr_baseline("full", data.item_vocab.size, embedding_dim=8, feedback=False)
    np.testing.assert_allclose(off(x), off(flipped), atol=1e-7)
    assert feedback_tokens(np.array([[2, 0]])).numpy().tolist() == [[1, 0]]  # unknown feedback


def test_wide_scalars_use_only_the_given_history():
    wide = WidePart(item_prior=np.full(6, 0.5), item_genres=np.array([[0], [0], [2], [2], [3], [3]]),
                    global_rate=0.5, smoothing=1.0)
    x = {"history_ids": np.array([[2, 3, 4, 0]]), "target_id": np.array([5]),
         "history_labels": np.array([[1.0, 1.0, 0.0, 1.0]]), "history_ratings": np.array([[5.0, 4.0, 2.0, 5.0]])}
    wide(x)
    s = np.asarray(wide.scalars(x))[0]
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert s[0] == pytest.approx(logit((2 + 0.5) / (3 + 1)))  # padding's label ignored
    assert s[1] == pytest.approx(11 / 3 / 5)
    assert s[2] == pytest.approx(np.log1p(3))
    assert s[3] == pytest.approx(logit((0 + 2.5 / 4) / (1 + 1)))  # one genre-3 behaviour, not clicked
    assert s[4] == pytest.approx(np.log1p(1))


def test_logreg_reference_fits_and_round_trips(data, tmp_path):
    import keras

    model = WideCTR(wide_options(data), name="logreg")
    fit_logistic_regression(model, lifelong_dataset(data, "train", batch_size=32, max_history=32))
    train = data.splits["train"]
    p = predictions(model, lifelong_dataset(data, "train", batch_size=32, max_history=32))
    assert auc(train.label, p) > auc(train.label, data.item_click_prior()[train.target_id]) + 0.02
    model.save(tmp_path / "logreg.keras")
    loaded = keras.saving.load_model(tmp_path / "logreg.keras")
    np.testing.assert_allclose(predictions(loaded, lifelong_dataset(data, "train", batch_size=32, max_history=32)),
                               p, rtol=1e-5)


def test_wide_deep_models_round_trip(data, tmp_path):
    import keras

    x, y = next(iter(lifelong_dataset(data, "train", batch_size=16, max_history=16)))
    for name in ("r2led", "twin", "sim-hard"):
        model = make_models(data)[name]
        model.compile(optimizer="adam")
        model.fit(x, y, epochs=1, verbose=0)
        model.save(tmp_path / f"{name}.keras")
        loaded = keras.saving.load_model(tmp_path / f"{name}.keras")
        np.testing.assert_allclose(loaded(x), model(x), rtol=1e-5, err_msg=name)
        scores = model.score(x["history_ids"].numpy(), np.stack([x["target_id"].numpy()] * 2, 1),
                             history_labels=x["history_labels"], history_ratings=x["history_ratings"],
                             history_gaps=x["history_gaps"], user_id=x["user_id"], user_profile=x["user_profile"])
        np.testing.assert_allclose(np.asarray(scores)[:, 1], model(x), rtol=1e-5, err_msg=name)


def test_asking_for_features_the_data_lacks(data):
    bare = build_lifelong_data(pd.DataFrame({"user_id": ["u"] * 4, "item_id": list("abac"), "timestamp": [1, 2, 3, 4],
                                             "label": [1.0, 0.0, 1.0, 1.0]}), valid_fraction=0.25, test_fraction=0.25)
    with pytest.raises(ValueError, match="user profile"):
        wide_options(bare, genres=False)
    with pytest.raises(ValueError, match="genres"):
        wide_options(bare, profile=False)
    assert wide_options(bare, profile=False, genres=False)["num_users"] == 3
    with pytest.raises(ValueError, match="unknown score features"):
        make_models(data)["din"].score(np.array([[2, 3]]), np.array([2]), history_clicks=np.array([[1, 0]]))


def test_recent_and_last_gap_scalars_equal_masks_over_the_whole_history():
    """The windowed recent / last-gap scalars against the masked sums over every position
    (right-padded histories, some shorter than `RECENT`, one empty)."""
    from tfrec.models.ctr_wide import RECENT, SCALARS

    rng = np.random.default_rng(3)
    batch, length = 7, 48
    lengths = np.array([0, 1, 5, RECENT - 1, RECENT, 33, length])
    valid = np.arange(length)[None] < lengths[:, None]
    x = {"history_ids": np.where(valid, rng.integers(1, NUM_ITEMS, (batch, length)), 0).astype("int32"),
         "target_id": rng.integers(1, NUM_ITEMS, batch).astype("int32"),
         "history_labels": ((rng.random((batch, length)) < 0.5) & valid).astype("float32"),
         "history_ratings": (rng.integers(0, 6, (batch, length)) * valid).astype("float32"),
         "history_gaps": (rng.integers(0, 32, (batch, length)) * valid).astype("int32")}
    wide = WidePart(item_prior=np.full(NUM_ITEMS, 0.3), global_rate=0.3, smoothing=5.0)
    scalars = np.asarray(wide(x)[1])[:, :len(SCALARS)]
    recent = valid & (np.arange(length)[None] >= lengths[:, None] - RECENT)
    rate = (x["history_labels"].sum(1) + 5 * 0.3) / (valid.sum(1) + 5)
    recent_rate = ((x["history_labels"] * recent).sum(1) + 5 * rate) / (recent.sum(1) + 5)
    rated = (x["history_ratings"] > 0) & recent
    recent_rating = (x["history_ratings"] * recent).sum(1) / np.maximum(rated.sum(1), 1) / 5
    last = valid & (np.arange(length)[None] == lengths[:, None] - 1)
    np.testing.assert_allclose(scalars[:, SCALARS.index("recent_click_rate")],
                               np.log(recent_rate) - np.log(1 - recent_rate), atol=1e-5)
    np.testing.assert_allclose(scalars[:, SCALARS.index("recent_mean_rating")], recent_rating, atol=1e-6)
    np.testing.assert_allclose(scalars[:, SCALARS.index("last_gap")], (x["history_gaps"] * last).sum(1) / 32)
    np.testing.assert_allclose(scalars[:, SCALARS.index("log_history_length")], np.log1p(lengths), atol=1e-6)
