"""Tests for tfrec.semantics.sids: diagnostics, de-duplication, the SID artifact and `tfrec sids`."""

import json

import numpy as np
import pytest

from tfrec_cli import main
from tfrec.semantics.sids import (
    NO_SID,
    SidsConfig,
    SidsFingerprintError,
    array_fingerprint,
    code_utilisation,
    collision_rate,
    deduplicate_codes,
    fit_sids,
    load_sids,
    reconstruction_error,
    save_sids,
)

SMALL = SidsConfig(num_levels=2, codebook_size=[8, 4], seed=0)


def item_table(num_rows=202, dim=16, num_clusters=6, seed=0):
    """(V, d) table: rows 0/1 reserved (zeros), a few clusters so that codes collide."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_clusters, dim))
    table = centres[rng.integers(num_clusters, size=num_rows)] + 0.1 * rng.normal(size=(num_rows, dim))
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    table[:2] = 0.0
    return table.astype("float32")


def test_deduplicate_appends_running_index_in_item_id_order():
    codes = np.array([[-1, -1], [-1, -1], [3, 1], [0, 2], [3, 1], [3, 1], [0, 2], [5, 5]])
    dedup = deduplicate_codes(codes)
    assert dedup.dtype == np.int32
    np.testing.assert_array_equal(dedup[:, :2], codes)
    assert dedup[:, 2].tolist() == [-1, -1, 0, 0, 1, 2, 1, 0]
    assert collision_rate(codes[2:]) == pytest.approx(5 / 6)
    assert collision_rate(dedup[2:]) == 0.0


def test_diagnostics_on_hand_computed_cases():
    codes = np.array([[0, 1], [0, 1], [1, 1], [2, 0]])
    assert code_utilisation(codes, [4, 2]) == [0.75, 1.0]
    assert collision_rate(codes) == 0.5
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    x_hat = np.array([[1.0, 1.0], [0.0, 2.0]])  # squared errors 0, 1, 0, 0; cosines 1/sqrt(2), 1
    error = reconstruction_error(x, x_hat)
    assert error["mse"] == pytest.approx(0.25)
    assert error["mean_cosine"] == pytest.approx((2**-0.5 + 1) / 2)


def test_fit_sids_reserves_padding_oov_and_missing_rows():
    table = item_table()
    table[7] = 0.0  # an item without text: all-zero row, no SID
    sids, quantizer = fit_sids(table, "store-fp", SMALL)
    assert sids.codes.shape == (202, 3) and sids.codes.dtype == np.int32
    for row in (0, 1, 7):
        assert sids.codes[row].tolist() == [NO_SID] * 3
    fitted = np.setdiff1d(np.arange(202), [0, 1, 7])
    np.testing.assert_array_equal(sids.codes[fitted, :2], np.asarray(quantizer.compute_codes(table[fitted])))
    # De-duplicated SIDs are unique; the extra level's size is recorded.
    assert len(np.unique(sids.codes[fitted], axis=0)) == len(fitted)
    assert sids.metadata["dedup_level_size"] == sids.codes[:, 2].max() + 1
    diag = sids.metadata["diagnostics"]
    assert diag["num_items"] == 199 and diag["collision_rate"] > 0  # 6 clusters, 32 codes: collisions
    assert diag["level_reconstruction_mse"][1] < diag["level_reconstruction_mse"][0]
    # An explicit mask wins over the zero-row rule; without de-dup there is no extra level.
    mask = np.ones(202, bool)
    mask[5] = False
    plain, _ = fit_sids(table, "store-fp", SidsConfig(num_levels=2, codebook_size=[8, 4], deduplicate=False),
                        mask=mask)
    assert plain.codes.shape == (202, 2) and plain.codes[5].tolist() == [NO_SID] * 2
    assert plain.codes[7].min() >= 0  # masked in: gets a code although all zeros


@pytest.mark.parametrize("mode", ["rqkmeans", "rqvae"])
def test_save_load_round_trip(mode, tmp_path):
    table = item_table()
    config = SidsConfig(mode=mode, num_levels=2, codebook_size=[8, 4], epochs=1, batch_size=64,
                        latent_dim=4, hidden_dims=[8])
    sids, quantizer = fit_sids(table, "store-fp", config)
    saved = save_sids(sids, quantizer, tmp_path / "sids")
    assert sorted(p.name for p in saved.path.iterdir()) == [
        "codebooks.npz", "metadata.json", "quantizer.keras", "sids.npy"
    ]
    loaded = load_sids(tmp_path / "sids", expected_fingerprint="store-fp")
    np.testing.assert_array_equal(loaded.codes, sids.codes)
    for a, b in zip(loaded.codebooks, sids.codebooks):
        np.testing.assert_array_equal(a, b)
    assert loaded.metadata == json.loads(json.dumps(sids.metadata))
    assert loaded.metadata["mode"] == mode and loaded.source_fingerprint == "store-fp"
    # The saved quantizer gives the same codes (e.g. for items added later).
    restored = loaded.load_quantizer()
    np.testing.assert_array_equal(np.asarray(restored.compute_codes(table[2:])), sids.codes[2:, :2])


def test_fingerprint_mismatch_and_broken_artifacts_raise_clear_errors(tmp_path):
    sids, quantizer = fit_sids(item_table(), "store-fp-1", SMALL)
    path = save_sids(sids, quantizer, tmp_path / "sids").path
    with pytest.raises(SidsFingerprintError, match="fitted on source fingerprint store-fp-1, expected store-fp-2"):
        load_sids(path, expected_fingerprint="store-fp-2")
    with pytest.raises(FileNotFoundError, match="no semantic-ID artifact"):
        load_sids(tmp_path / "nothing")
    np.save(path / "sids.npy", sids.codes[:, :2])
    with pytest.raises(ValueError, match=r"sids.npy: int32 \(202, 2\), metadata says int32 \(202, 3\)"):
        load_sids(path)
    (path / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a semantic-ID metadata file"):
        load_sids(path)
    (path / "metadata.json").unlink()
    with pytest.raises(FileNotFoundError, match="metadata.json is missing"):
        load_sids(path)


def test_fit_is_deterministic_and_fingerprint_tracks_inputs():
    table = item_table()
    a, _ = fit_sids(table, "store-fp", SMALL)
    b, _ = fit_sids(table, "store-fp", SMALL)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert a.fingerprint == b.fingerprint
    c, _ = fit_sids(table, "other-store", SMALL)
    assert c.fingerprint != a.fingerprint


def test_bad_inputs_raise_clear_errors():
    table = item_table()
    with pytest.raises(ValueError, match=r"\(V, d\) with V >= 3"):
        fit_sids(table[0], "fp", SMALL)
    with pytest.raises(ValueError, match=r"mask must be a bool array of shape \(202,\)"):
        fit_sids(table, "fp", SMALL, mask=np.ones(5, bool))
    with pytest.raises(ValueError, match="no item row has an embedding"):
        fit_sids(np.zeros((10, 4), "float32"), "fp", SMALL)
    with pytest.raises(ValueError, match="level 0: k-means needs at least as many points as clusters: got 7"):
        fit_sids(table[:9], "fp", SMALL)  # 7 items (rows 2..8) for 8 codewords


def test_cli_with_embeddings_file(tmp_path, capsys):
    table = item_table()
    np.save(tmp_path / "emb.npy", table)
    out = tmp_path / "sids"
    argv = ["sids", "--embeddings", str(tmp_path / "emb.npy"), "--out", str(out), "--levels", "2",
            "--codebook-size", "8,4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| level | codebook_size | codes_used | utilisation" in printed
    assert "collision rate (full 2-level code)" in printed and "final SIDs unique" in printed
    loaded = load_sids(out, expected_fingerprint=array_fingerprint(table))
    assert loaded.codes.shape == (202, 3) and loaded.metadata["codebook_sizes"] == [8, 4]

    assert main(["sids", "--embeddings", str(tmp_path / "missing.npy"), "--out", str(out)]) == 2
    assert "tfrec sids: error: embeddings file not found" in capsys.readouterr().err
    assert main(argv[:-1] + ["8,x"]) == 2
    assert "--codebook-size expects an int or comma-separated ints, got '8,x'" in capsys.readouterr().err


def test_cli_with_semantic_store(tmp_path, capsys):
    from tfrec.semantics import store as store_module
    from tfrec.data.vocab import Vocabulary

    table = item_table()
    mask = np.any(table != 0, axis=1)
    vocab = Vocabulary([f"item{i}" for i in range(200)])
    store = store_module.SemanticStore(
        vocab, [store_module.SemanticView("title", table, mask)], input_fingerprint="test"
    )
    store_module.save_version(tmp_path / "store", store)
    out = tmp_path / "sids"
    argv = ["sids", "--store", str(tmp_path / "store"), "--out", str(out), "--levels", "2",
            "--codebook-size", "8,4"]
    assert main(argv) == 0
    assert "items fitted: 200 of 202 rows" in capsys.readouterr().out
    loaded = load_sids(out, expected_fingerprint=store.fingerprint)
    assert loaded.metadata["source"]["view"] == "title"
    assert main(argv + ["--view", "mllm_text"]) == 2  # the store has no such view
    assert "mllm_text" in capsys.readouterr().err
