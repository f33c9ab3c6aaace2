"""A user's own CTR data (`data.interactions_path` / `items_path` / `users_path`) and the
bundled movielens-100k as a second lifelong CTR dataset."""

import json

import numpy as np
import pytest

from tfrec_cli.main import main as tfrec_main
from tfrec.ctr import CTRDataConfig, load_ctr_config, load_ctr_data
from tfrec.data.lifelong import load_lifelong_files
from tfrec.data.readers import DataFormatError


def write_log(folder, label=True, rows=None):
    """12 users x 12 events, a time trend the split can cut; users like even items."""
    lines = ["user_id,item_id,timestamp," + ("label" if label else "rating")]
    rows = rows if rows is not None else [
        (f"u{u}", f"i{(3 * u + t) % 9}", 1000 + 100 * t + u, int((3 * u + t) % 9 % 2 == 0))
        for u in range(12) for t in range(12)]
    for user, item, stamp, liked in rows:
        lines.append(f"{user},{item},{stamp},{liked if label else (5 if liked else 2)}")
    path = folder / "log.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_side(folder):
    items = folder / "items.tsv"
    items.write_text("item_id\ttitle\tgenres\n" + "".join(
        f"i{k}\tMovie {k}\t{'Drama' if k % 2 else 'Comedy'}|{'Sci-Fi' if k % 3 else 'War'}\n" for k in range(9)))
    users = folder / "users.csv"
    users.write_text("user_id,gender,age_bucket\n" + "".join(f"u{u},{'MF'[u % 2]},{u % 3}\n" for u in range(11)))
    return items, users


def test_own_files_load_with_side_tables(tmp_path):
    log = write_log(tmp_path)
    items, users = write_side(tmp_path)
    data = load_lifelong_files(log, items, users)
    assert data.item_genres is not None and data.genre_vocab.size == 2 + 4
    assert list(data.profile_vocabs) == ["gender", "age_bucket"]
    assert data.metadata["user_profile"]["users_without_profile"] == 1  # u11 is not in the users file
    assert sum(len(s) for s in data.splits.values()) > 100
    only = load_lifelong_files(log, users_path=users, user_fields=["gender"])
    assert list(only.profile_vocabs) == ["gender"] and only.item_genres is None


@pytest.mark.parametrize("row, message", [
    (("u1", "i1", "noon", 1), r"log\.csv: line 3: non-numeric timestamp 'noon'"),
    (("u1", "", 5, 1), r"log\.csv: line 3: empty item_id"),
    (("u1", "i2", 5, ""), r"log\.csv: line 3: missing label"),
    (("u1", "i2", 5, 3), r"label.*0/1.*data row 2"),
])
def test_malformed_interactions_name_line_and_column(tmp_path, row, message):
    log = write_log(tmp_path, rows=[("u0", "i0", 1, 1), row, ("u2", "i3", 9, 0)])
    with pytest.raises(DataFormatError, match=message):
        load_lifelong_files(log)


def test_config_errors_for_missing_labels_and_side_files(tmp_path):
    log = write_log(tmp_path, label=False)
    with pytest.raises(DataFormatError, match="data.click_threshold"):
        load_ctr_data(CTRDataConfig(interactions_path=str(log)))
    assert load_ctr_data(CTRDataConfig(interactions_path=str(log), click_threshold=4.0)).splits["train"].label.max() == 1
    with pytest.raises(ValueError, match=r"no user side file: set data.users_path"):
        load_ctr_data(CTRDataConfig(interactions_path=str(log), click_threshold=4.0, user_fields=("gender",)))
    _, users = write_side(tmp_path)
    with pytest.raises(KeyError, match="occupation"):
        load_ctr_data(CTRDataConfig(interactions_path=str(log), users_path=str(users), click_threshold=4.0,
                                    user_fields=("gender", "occupation")))
    with pytest.raises(ValueError, match="go with data.interactions_path"):
        load_ctr_data(CTRDataConfig(users_path=str(users)))
    bad_users = tmp_path / "bad_users.csv"
    bad_users.write_text("user_id,gender\nu0,M\nu1,F,extra\n")
    with pytest.raises(DataFormatError, match="line 3: expected 2 fields"):
        load_ctr_data(CTRDataConfig(interactions_path=str(log), users_path=str(bad_users), click_threshold=4.0))


def test_tiny_own_dataset_trains_through_tfrec_ctr(tmp_path, capsys):
    log = write_log(tmp_path)
    items, users = write_side(tmp_path)
    config = tmp_path / "ctr.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "name": "tiny", "output_dir": str(tmp_path / "runs"),
        "data": {"interactions_path": str(log), "items_path": str(items), "users_path": str(users),
                 "valid_fraction": 0.2, "test_fraction": 0.2},
        "model": {"name": "din", "embedding_dim": 8, "mlp_units": [8], "max_history": 16, "top_k": 4,
                  "wide_profile": "required", "wide_genres": "required"},
        "train": {"batch_size": 16, "eval_batch_size": 32, "epochs": 2, "patience": 1}}))
    assert tfrec_main(["ctr", "train", "--config", str(config)]) == 0
    results = json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())
    assert results["data"]["source"] == str(log)
    assert results["config"]["model"]["wide_profile"] == "required"
    assert 0.0 <= results["splits"]["test"]["auc"] <= 1.0 and results["epochs"] >= 1
    assert tfrec_main(["ctr", "evaluate", "--config", str(config)]) == 0
    # a model that asks for the profile, without the users file: a clear error, not a crash
    assert tfrec_main(["ctr", "train", "--config", str(config), "data.users_path=null"]) == 2
    assert "user profile" in capsys.readouterr().err


def test_movielens_100k_loads_as_a_second_dataset():
    data = load_ctr_data(load_ctr_config(None, ["data.dataset=movielens-100k"]).data)
    counts = data.metadata["num_samples"]
    assert counts["train"] > 70_000 and counts["test"] > 9_000
    assert 0.5 < data.metadata["click_rate"]["train"] < 0.6  # rating >= 4
    assert list(data.profile_vocabs) == ["gender", "age", "occupation"]
    assert data.genre_vocab.size == 2 + 19 and (data.item_genres[2:] > 0).any(1).all()
    h = data.splits["test"].history_length
    assert np.median(h) > 50


def test_r2led_on_own_data_encodes_its_items_file(tmp_path, capsys):
    log = write_log(tmp_path)
    items, _ = write_side(tmp_path)
    config = tmp_path / "r2led.yaml"
    config.write_text(json.dumps({
        "name": "tiny-r2led", "output_dir": str(tmp_path / "runs"),
        "data": {"interactions_path": str(log), "valid_fraction": 0.2, "test_fraction": 0.2},
        "model": {"name": "r2led", "embedding_dim": 8, "mlp_units": [8], "max_history": 16, "top_k": 2},
        "sids": {"store_path": str(tmp_path / "store"), "levels": 2, "codebook_size": [2, 2], "iterations": 5},
        "train": {"batch_size": 16, "eval_batch_size": 32, "epochs": 1}}))
    assert tfrec_main(["ctr", "encode", "--config", str(config)]) == 2  # no item texts
    assert "data.items_path" in capsys.readouterr().err
    with_items = [f"data.items_path={items}"]
    assert tfrec_main(["ctr", "encode", "--config", str(config), *with_items]) == 0
    assert tfrec_main(["ctr", "train", "--config", str(config), *with_items]) == 0
    results = json.loads((tmp_path / "runs" / "tiny-r2led" / "results.json").read_text())
    assert results["semantics"]["codebook_sizes"] == [2, 2] and results["model"]["class"] == "R2LED"
