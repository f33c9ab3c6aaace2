"""Tests for `tfrec.ctr`: CTR config, item semantics from the store, train_ctr end to end.

A synthetic lifelong log with planted structure (users like 2 of 6 item clusters;
a rating is a click iff the item's cluster is liked; every item is clicked by some
users and not by others, so an item's click rate says little) and a tiny semantic
store whose pooled vectors follow the clusters. R2LED and DIN, trained for a few
epochs by `train_ctr`, must beat the item-popularity reference on test AUC; the
saved model and results round-trip; config errors name the key; a store built for
another vocabulary is rejected with the command that builds the right one.
"""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

import tfrec_cli as cli
from tfrec.ctr import (
    CTRConfig, ctr_sids_defaults, load_ctr_config, load_ctr_model, load_store_for, prepare_item_semantics, subsample_users, train_ctr,
    evaluate_saved_ctr)
from tfrec.data.lifelong import build_lifelong_data
from tfrec.data.vocab import Vocabulary
from tfrec.semantics.store import SemanticStore, SemanticView, VocabularyMismatchError, save_version

CLUSTERS, ITEMS, USERS, EVENTS = 6, 60, 90, 30


def synthetic_log(seed=0):
    rng = np.random.default_rng(seed)
    cluster = {f"i{k}": k % CLUSTERS for k in range(ITEMS)}
    by_cluster = [[i for i, c in cluster.items() if c == k] for k in range(CLUSTERS)]
    rows = []
    for u in range(USERS):
        liked = rng.choice(CLUSTERS, 2, replace=False)
        times = np.sort(rng.choice(10_000, EVENTS, replace=False))  # one global clock: a time split
        for t in times:
            c = rng.choice(liked) if rng.random() < 0.6 else rng.integers(CLUSTERS)
            item = rng.choice(by_cluster[c])
            rows.append((f"u{u}", item, int(t), float(c in liked)))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "label"]), cluster


@pytest.fixture(scope="module")
def log():
    frame, cluster = synthetic_log()
    data = build_lifelong_data(frame, valid_fraction=0.15, test_fraction=0.2, source="synthetic")
    return data, cluster


def make_store(root, item_vocab, cluster, seed=0):
    """A store whose pooled vectors are the item's cluster centre plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLUSTERS, 16))
    pooled = np.zeros((item_vocab.size, 16), np.float32)
    for row, token in enumerate(item_vocab.tokens, start=2):
        pooled[row] = centres[cluster[token]] + 0.1 * rng.normal(size=16)
    pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-9)
    mask = np.arange(item_vocab.size) >= 2
    store = SemanticStore(item_vocab, [SemanticView("title", pooled, mask)], input_fingerprint="synthetic")
    return save_version(root, store)


def tiny_config(tmp_path, store, name="r2led", **overrides):
    values = [f"name={name}", f"output_dir={tmp_path / 'runs'}", f"model.name={name}", "model.embedding_dim=16",
              "model.mlp_units=[16]", "model.max_history=32", "model.top_k=4", f"sids.store_path={store}",
              "sids.num_levels=2", "sids.codebook_size=[6,4]", "train.batch_size=64", "train.eval_batch_size=256",
              "train.learning_rate=0.01", "train.epochs=4", "train.patience=4", "train.seed=0"]
    return load_ctr_config(None, values + [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def store_root(tmp_path_factory, log):
    data, cluster = log
    root = tmp_path_factory.mktemp("store") / "ml"
    make_store(root, data.item_vocab, cluster)
    return root


# --------------------------------------------------------------------- config
@pytest.mark.parametrize("override, key", [
    ("model.nme=r2led", "model.nme"),
    ("model.name=sim-superb", "model.name"),
    ("sids.mode=pq", "sids.mode"),
    ("sids.quantizer=pq", "sids.mode"),  # the older key name reads as sids.mode
    ("sids.levels=0", "sids.num_levels"),
    ("sids.codebook_size=[8,1,8]", "sids.codebook_size"),
    ("sids.codebook=[8,8,8]", "older names: quantizer = mode, levels = num_levels"),
    ("train.epochs=many", "train.epochs"),
    ("train.monitor=logloss", "train.monitor"),
    ("model.top_k=0", "model.top_k"),
    ("sids.codebook_size=[8,8]", "sids.codebook_size"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_ctr_config(None, [override])


def test_sids_section_is_the_shared_sids_config_and_reads_the_older_key_names(tmp_path):
    from tfrec.semantics.sids import SidsConfig

    defaults = load_ctr_config(None).sids
    assert type(defaults) is SidsConfig and defaults == ctr_sids_defaults()
    assert defaults.codebook_size == (32, 32, 32) and defaults.deduplicate is False  # CTR defaults, not the class's
    old = tmp_path / "old.yaml"
    old.write_text("sids:\n  quantizer: rqvae\n  levels: 2\n  codebook_size: [8, 4]\n  seed: 3\n")
    config = load_ctr_config(old)
    assert (config.sids.mode, config.sids.num_levels, config.sids.level_sizes()) == ("rqvae", 2, [8, 4])
    assert config.sids.deduplicate is False and config.sids.seed == 3  # keys not given keep the CTR defaults
    assert load_ctr_config(None, ["sids.levels=2", "sids.codebook_size=8"]).sids.level_sizes() == [8, 8]
    with pytest.raises(ValueError, match=r"sids\.levels and sids\.num_levels name the same setting"):
        load_ctr_config(old, ["sids.num_levels=2"])
    assert "sids" in config.to_dict() and "mode" in config.to_dict()["sids"]  # saved under the current names
    from tfrec.config import describe_keys

    keys = describe_keys(CTRConfig)  # `tfrec ctr train --help`: the CTR defaults and the older names
    assert "sids.codebook_size = [32, 32, 32]" in keys and "sids.quantizer = sids.mode" in keys
    assert load_ctr_config(None, [f"{k}={v}" for k, v in (("sids.mode", "rqvae"), ("sids.seed", 2))]
                           ).sids == dataclasses.replace(ctr_sids_defaults(), mode="rqvae", seed=2)


def test_repository_config_loads_and_cli_reports_bad_input(tmp_path, capsys):
    config = load_ctr_config("configs/r2led_ml1m.yaml")
    assert isinstance(config, CTRConfig) and config.model.max_history == 1024
    assert config.data.dataset == "movielens-1m-subset"
    assert cli.main(["ctr", "train", "--config", "configs/r2led_ml1m.yaml", "train.lr=0.1"]) == 2
    assert "train.lr" in capsys.readouterr().err
    missing = tmp_path / "nowhere" / "model.keras"
    assert cli.main(["ctr", "evaluate", "--config", "configs/r2led_ml1m.yaml", "--model", str(missing)]) == 2
    assert "no trained model" in capsys.readouterr().err


# ------------------------------------------------------------------ semantics
def test_store_must_follow_the_lifelong_vocabulary(tmp_path, log, store_root):
    data, cluster = log
    with pytest.raises(FileNotFoundError, match="tfrec ctr encode"):
        load_store_for(tmp_path / "nowhere", data.item_vocab)
    other = Vocabulary(list(reversed(data.item_vocab.tokens)))
    wrong = tmp_path / "wrong"
    make_store(wrong, other, cluster)
    with pytest.raises(VocabularyMismatchError, match="tfrec ctr encode"):
        prepare_item_semantics(data, wrong)
    # A root holding both vocabularies: the matching version is used even when LATEST is the other one.
    make_store(wrong, data.item_vocab, cluster)
    make_store(wrong, other, cluster)
    assert load_store_for(wrong, data.item_vocab).path.name == "v2"


def test_semantic_ids_follow_the_store_clusters(log, store_root):
    data, cluster = log
    config = load_ctr_config(None, ["sids.num_levels=2", "sids.codebook_size=[6,4]"])
    semantics = prepare_item_semantics(data, store_root, config.sids)
    assert semantics.item_sids.shape == (data.item_vocab.size, 2) and semantics.codebook_sizes == [6, 4]
    assert (semantics.item_sids[:2] == -1).all() and (semantics.item_sids[2:] >= 0).all()
    first = semantics.item_sids[2:, 0]
    truth = np.array([cluster[t] for t in data.item_vocab.tokens])
    assert len(set(zip(first.tolist(), truth.tolist()))) == CLUSTERS  # level 1 = the planted clusters
    assert semantics.pooled.shape == (data.item_vocab.size, 16)
    assert prepare_item_semantics(data, store_root, config.sids, fit=False).item_sids is None


def test_subsample_users_keeps_whole_users(log):
    data, _ = log
    small = subsample_users(data, 200, seed=1)
    assert 0 < len(small.splits["train"]) <= 200 < len(data.splits["train"])
    kept = np.unique(np.concatenate([s.user for s in small.splits.values()]))
    assert len(kept) == small.metadata["subsample"]["users_kept"] < USERS
    for name, full in data.splits.items():  # every sample of a kept user, in the original order
        np.testing.assert_array_equal(small.splits[name].event, full.event[np.isin(full.user, kept)])
    assert small.item_vocab == data.item_vocab


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("name, overrides", [
    ("r2led", {}),  # measured: test AUC 0.80 vs popularity 0.51
    ("sim-soft", {"train.batch_size": 32, "train.epochs": 6}),  # the baseline reading the store's vectors: 0.86
])
def test_train_ctr_beats_popularity_and_round_trips(tmp_path, log, store_root, name, overrides):
    data, _ = log
    config = tiny_config(tmp_path, store_root, name, **overrides)
    results, model, _ = train_ctr(config, verbose=0, save=True, data=data)
    test, popularity = results["splits"]["test"], results["reference"]["popularity"]["test"]
    assert test["auc"] > 0.7 and test["auc"] > popularity["auc"] + 0.15, (test, popularity)
    assert 1 <= results["best_epoch"] <= results["epochs"] <= config.train.epochs
    assert len(results["validation_curve"]) == results["epochs"]
    run = config.run_dir
    saved = json.loads((run / "results.json").read_text())
    assert saved["splits"] == results["splits"] and saved["config"]["model"]["name"] == name
    assert (run / "sids" / "sids.npy").is_file() == (name == "r2led")  # the SIDs R2LED was trained with
    loaded, _ = load_ctr_model(config)
    assert type(loaded) is type(model)
    again = evaluate_saved_ctr(config, loaded, data=data)
    for key in ("auc", "gauc", "logloss"):
        assert again["splits"]["test"][key] == pytest.approx(test[key], abs=1e-6)


def test_references_fit_on_training_samples_and_round_trip(tmp_path, log, store_root):
    from tfrec.ctr import fit_reference

    frame, _ = synthetic_log()
    rng = np.random.default_rng(1)
    stingy = frame["user_id"].str[1:].astype(int) % 2 == 0  # half the users click 30% as often
    frame["label"] = np.where(stingy & (rng.random(len(frame)) > 0.3), 0.0, frame["label"])
    data = build_lifelong_data(frame, valid_fraction=0.15, test_fraction=0.2, source="synthetic")
    popularity, _, _ = fit_reference(tiny_config(tmp_path, store_root, "popularity"), data=data)
    # the prior through float32 logit/sigmoid: equal up to ties float rounding may create
    assert popularity["splits"]["test"] == pytest.approx(popularity["reference"]["popularity"]["test"], abs=1e-4)
    config = tiny_config(tmp_path, store_root, "logreg")
    results, model, _ = fit_reference(config, data=data)
    # the history click-rate scalars carry the users' taste: far above the item prior
    assert results["splits"]["test"]["auc"] > popularity["splits"]["test"]["auc"] + 0.05
    loaded, _ = load_ctr_model(config)
    again = evaluate_saved_ctr(config, loaded, data=data)
    assert again["splits"]["test"]["auc"] == pytest.approx(results["splits"]["test"]["auc"], abs=1e-6)
    with pytest.raises(ValueError, match="not a reference"):
        fit_reference(tiny_config(tmp_path, store_root, "din"), data=data)


@pytest.mark.parametrize("override, message", [
    ("model.wide_profile=required", "user profile"),
    ("model.wide_genres=required", "genres"),
])
def test_config_asking_for_features_the_data_lacks(tmp_path, log, store_root, override, message):
    from tfrec.ctr import build_ctr_model

    data, _ = log  # no user side file, no item table
    config = load_ctr_config(None, ["model.name=din", override])
    with pytest.raises(ValueError, match=message):
        build_ctr_model(config, data, None)
