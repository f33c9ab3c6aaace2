"""Retrieval servables: brute force (exact, stock ops) and ScaNN (approximate), saved and reloaded.

The catalog is a 12k x 64 clustered random table (200 Gaussian clusters), the
queries are noisy copies of catalog items, so neighbours are well defined.
Whether the brute-force servable uses only stock ops (and ScaNN does not) is
checked in a fresh process by tests/test_export.py.
"""

import json

import numpy as np
import pytest
import tensorflow as tf

from tfrec.serving.retrieval import (
    EXCLUDED_SCORE,
    BruteForceIndex,
    ScaNNIndex,
    build_indexes,
    recall_at_k,
)
from export.saved_model import METADATA_FILE, export_index

N, D, K = 12_000, 64, 10


@pytest.fixture(scope="module")
def catalog():
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(200, D)).astype("float32")
    table = (centers[rng.integers(0, 200, N)] + 0.5 * rng.normal(size=(N, D))).astype("float32")
    queries = (table[rng.integers(0, N, 200)] + 0.3 * rng.normal(size=(200, D))).astype("float32")
    tokens = np.array([f"item-{i}" for i in range(N)])
    exact = np.argsort(-(queries @ table.T), axis=1, kind="stable")[:, :K]  # (200, K) rows
    return table, tokens, queries, exact


def texts(tensor):
    return tensor.numpy().astype(bytes).astype(str)


def test_bruteforce_is_exact_and_survives_save_and_reload(catalog, tmp_path):
    table, tokens, queries, exact = catalog
    index = BruteForceIndex(table, tokens, k=K)
    out = index.retrieve(queries)
    np.testing.assert_array_equal(texts(out["item_ids"]), tokens[exact])
    np.testing.assert_allclose(out["scores"].numpy(), np.take_along_axis(queries @ table.T, exact, 1), rtol=1e-5)

    path = export_index(index, tmp_path / "retrieval_bruteforce", source={"note": "test"})
    assert path.name == "1"
    meta = json.loads((path / METADATA_FILE).read_text())
    assert meta["kind"] == "retrieval_bruteforce" and meta["stock_ops_only"] and meta["custom_op_namespaces"] == []
    assert meta["signatures"]["retrieve"]["inputs"] == {"queries": {"dtype": "float32", "shape": [None, D]}}
    assert meta["source"] == {"note": "test"}
    loaded = tf.saved_model.load(str(path))
    for name in ("retrieve", "serving_default"):
        again = loaded.signatures[name](queries=tf.constant(queries[:20]))
        np.testing.assert_array_equal(texts(again["item_ids"]), tokens[exact[:20]])


def test_tfrs_layers_answer_as_the_pre_tfrs_code(catalog):
    """The indexes are TFRS `factorized_top_k` layers; answers equal those of the
    code they replaced: brute force = `tf.math.top_k` of the dot products (ids and
    scores bit-identical); ScaNN = a searcher built and queried with `scann_ops`
    directly with the same options."""
    import tensorflow_recommenders as tfrs
    from scann.scann_ops.py import scann_ops

    table, tokens, queries, _ = catalog
    brute = BruteForceIndex(table, tokens, k=K)
    assert isinstance(brute.top_k, tfrs.layers.factorized_top_k.BruteForce)
    out = brute.retrieve(queries)
    top = tf.math.top_k(tf.linalg.matmul(queries, table, transpose_b=True), k=K)
    np.testing.assert_array_equal(out["scores"].numpy(), top.values.numpy())
    np.testing.assert_array_equal(texts(out["item_ids"]), tokens[top.indices.numpy()])

    scann = ScaNNIndex(table, tokens, k=K, num_leaves=100, num_leaves_to_search=30, reorder=200)
    assert isinstance(scann.top_k, tfrs.layers.factorized_top_k.ScaNN)
    found = scann.retrieve(queries)
    direct = scann._builder(scann_ops, table).build().search_batched_parallel(queries, final_num_neighbors=K)
    # Two ScaNN builds (threaded k-means) may differ in a few neighbours; measured: equal
    # in 3 runs of 4, >= 99.6% of ids otherwise. Scores of shared ids are the same dot products.
    assert recall_at_k(texts(found["item_ids"]), tokens[direct.indices.numpy()]) >= 0.99
    same = found["item_ids"].numpy() == tokens[direct.indices.numpy()].astype(bytes)  # (200, K)
    assert same.mean() >= 0.99
    np.testing.assert_allclose(found["scores"].numpy()[same], direct.distances.numpy()[same], rtol=1e-5)


def test_bruteforce_excludes_rows_and_marks_empty_slots():
    table = np.diag([4.0, 3.0, 2.0, 1.0]).astype("float32")  # with all-ones queries item i scores 4 - i
    index = BruteForceIndex(table, list("abcd"), k=3)
    queries = tf.ones((2, 4))
    scores, rows = index.search(queries, exclude_rows=tf.constant([[0, -1, -1], [0, 1, 3]]))
    assert rows.numpy().tolist() == [[1, 2, 3], [2, -1, -1]]  # -1 entries of exclude_rows are ignored
    assert scores.numpy()[1, 0] == 2.0 and (scores.numpy()[1, 1:] == EXCLUDED_SCORE).all()
    assert texts(index.tokens_of(rows)).tolist() == [["b", "c", "d"], ["c", "", ""]]


def test_scann_recall_against_brute_force_and_reload(catalog, tmp_path):
    table, tokens, queries, exact = catalog
    # Measured on this table: recall@10 = 1.0 (also with the defaults: 110 leaves, 11 searched).
    index = ScaNNIndex(table, tokens, k=K, num_leaves=100, num_leaves_to_search=30, reorder=200)
    found = texts(index.retrieve(queries)["item_ids"])
    assert recall_at_k(found, tokens[exact]) >= 0.97

    path = export_index(index, tmp_path / "retrieval_scann")
    meta = json.loads((path / METADATA_FILE).read_text())
    assert meta["custom_op_namespaces"] == ["Scann"] and not meta["stock_ops_only"]
    assert meta["index"] == {**index.config(), "num_leaves": 100, "num_leaves_to_search": 30, "reorder": 200}
    loaded = tf.saved_model.load(str(path))  # this process has imported scann
    again = loaded.signatures["retrieve"](queries=tf.constant(queries))
    np.testing.assert_array_equal(texts(again["item_ids"]), found)


def test_scann_on_a_small_catalog_reorders_everything_exactly():
    rng = np.random.default_rng(1)
    table = rng.normal(size=(60, 8)).astype("float32")
    tokens = [f"t{i}" for i in range(60)]
    indexes = build_indexes(table, tokens, k=5, kinds=("bruteforce", "scann"))  # scann: no tree, reorder 100 >= 60
    assert indexes["scann"].config()["num_leaves"] == 0
    queries = rng.normal(size=(7, 8)).astype("float32")
    exact, approx = (indexes[kind].retrieve(queries) for kind in ("bruteforce", "scann"))
    np.testing.assert_array_equal(texts(approx["item_ids"]), texts(exact["item_ids"]))
    np.testing.assert_allclose(approx["scores"].numpy(), exact["scores"].numpy(), rtol=1e-5)


def test_query_dimension_is_part_of_the_signature(catalog, tmp_path):
    table, tokens, _, _ = catalog
    path = export_index(BruteForceIndex(table[:100], tokens[:100], k=3), tmp_path / "bf")
    signature = tf.saved_model.load(str(path)).signatures["retrieve"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"queries must be \(batch, {D}\)"):
        signature(queries=tf.zeros((2, D + 1)))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t, s: BruteForceIndex(t[0], s), "2-D"),
        (lambda t, s: BruteForceIndex(np.where(np.arange(4)[:, None] == 2, np.nan, t), s),
         r"NaN/inf values in rows \[2\]"),
        (lambda t, s: BruteForceIndex(t, ["a", "b", "a", "c"]), "duplicate vocabulary tokens"),
        (lambda t, s: BruteForceIndex(t, ["a", "", "b", "c"]), "non-empty"),
        (lambda t, s: BruteForceIndex(t, ["a", 2, "b", "c"]), "tokens must be str, got int"),
        (lambda t, s: BruteForceIndex(t, s[:3]), "3 tokens but item_table has 4 rows"),
        (lambda t, s: BruteForceIndex(t, s, k=5), r"k must be an int in \[1, 4\]"),
        (lambda t, s: ScaNNIndex(t, s, k=2, num_leaves=2, num_leaves_to_search=3), "num_leaves_to_search must be in"),
        (lambda t, s: ScaNNIndex(t, s, k=2, num_leaves=9), "num_leaves=9 exceeds the 4 items"),
        (lambda t, s: ScaNNIndex(t, s, k=2, dimensions_per_block=4), "dimensions_per_block=4 exceeds"),
        (lambda t, s: ScaNNIndex(t, s, k=2, reorder=1), "reorder must be 0 or >= k=2"),
        (lambda t, s: build_indexes(t, s, kinds=("annoy",)), r"unknown index kind\(s\) \['annoy'\]"),
        (lambda t, s: build_indexes(t, s, k=2, scann_options={"reorder": 3}), "'scann' is not among"),
    ],
)
def test_bad_index_arguments_name_the_problem(make, message):
    table = np.arange(12, dtype="float32").reshape(4, 3)
    with pytest.raises(ValueError, match=message):
        make(table, ["a", "b", "c", "d"])


def test_recall_at_k_ignores_empty_slots():
    assert recall_at_k([["a", "b"], ["c", ""]], [["b", "a"], ["c", "d"]]) == 0.75
    assert recall_at_k(np.array([[1, -1]]), np.array([[1, 2]])) == 0.5
    with pytest.raises(ValueError, match="equal-shape"):
        recall_at_k([["a"]], [["a", "b"]])
