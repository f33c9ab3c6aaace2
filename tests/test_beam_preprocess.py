"""The Beam pipeline writes exactly what prepare() + save_prepared() write."""

import filecmp
import os

import numpy as np
import pandas as pd
import pytest

import apache_beam as beam  # noqa: F401

from tfrec.data.beam_preprocess import DEFAULT_BEAM_ARGS, build_prepare_pipeline, run_prepare_beam  # noqa: E402
from tfrec.data.preprocess import (  # noqa: E402
    PrepareConfig, kcore_filter, load_prepared, prepare, save_prepared)
from conftest import assert_prepared_equal  # noqa: E402
from tfrec.data.readers import DEFAULT_DATA_ROOT, read_interactions  # noqa: E402

ML100K = str(DEFAULT_DATA_ROOT / "movielens-100k" / "ml-100k.inter")
CONFIG = PrepareConfig(user_core=5, item_core=5, max_core_rounds=12)
SAME_BYTES = ["item_vocab.txt", "user_vocab.txt", "metadata.json"]


@pytest.fixture(scope="module")
def ml_slice(tmp_path_factory):
    """First 3000 ML-100K rows, timestamps cut to whole days (many same-user ties)."""
    if not os.path.exists(ML100K):
        pytest.skip("bundled movielens-100k not available")
    df = read_interactions(ML100K).iloc[:3000]
    df = pd.DataFrame({"user_id": df["user_id"], "item_id": df["item_id"],
                       "timestamp": df["timestamp"] // 86400 * 86400})
    path = tmp_path_factory.mktemp("slice") / "interactions.tsv"
    df.to_csv(path, sep="\t", index=False)
    return path


@pytest.fixture(scope="module")
def ml_outputs(ml_slice, tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    mem, bm = root / "memory", root / "beam"
    expected = prepare(read_interactions(ml_slice), CONFIG)
    save_prepared(expected, mem)
    run_prepare_beam(ml_slice, bm, CONFIG)
    return expected, mem, bm


def test_slice_is_a_hard_case(ml_slice):
    df = read_interactions(ml_slice)
    with pytest.raises(RuntimeError):  # k-core cascades over several rounds
        kcore_filter(df, 5, 5, max_rounds=3)
    kept = kcore_filter(df, 5, 5, max_rounds=CONFIG.max_core_rounds)
    assert kept.duplicated(["user_id", "timestamp"]).sum() > 100  # timestamp ties survive


def test_beam_matches_in_memory(ml_outputs):
    expected, mem, bm = ml_outputs
    files = sorted(os.listdir(bm))
    assert [f for f in files if f.startswith("sequences")] == ["sequences-00000-of-00001.tfrecord"]
    assert set(SAME_BYTES) <= set(files)
    for name in SAME_BYTES:  # identical vocabularies (order) and metadata (counts, fingerprint)
        assert filecmp.cmp(mem / name, bm / name, shallow=False), name
    from_beam = load_prepared(bm)
    assert_prepared_equal(from_beam, load_prepared(mem))
    assert_prepared_equal(from_beam, expected)
    assert expected.metadata["num_interactions"] < 3000 and expected.metadata["num_users"] > 50


def test_beam_rerun_replaces_shards(ml_slice, ml_outputs):
    """A stale shard from an earlier run must not be read back."""
    expected, _, bm = ml_outputs
    stale = bm / "sequences-00001-of-00002.tfrecord"
    stale.write_bytes((bm / "sequences-00000-of-00001.tfrecord").read_bytes())
    run_prepare_beam(ml_slice, bm, CONFIG)
    assert not stale.exists()
    assert_prepared_equal(load_prepared(bm), expected)


HAND_ROWS = [("u1", "i1", 1), ("u3", "i2", 2), ("u1", "i2", 3), ("u2", "i1", 4), ("u4", "i3", 5),
             ("u2", "i2", 6), ("u3", "i3", 7), ("u1", "i1", 1), ("u2", "i2", 4), ("u2", "i1", 4)]


def run_on_rows(rows, cfg, out_dir, source=None):
    with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(list(DEFAULT_BEAM_ARGS))) as p:
        pcoll = p | beam.Create([(k, u, i, t) for k, (u, i, t) in enumerate(rows)])
        build_prepare_pipeline(p, pcoll, cfg, out_dir, source=source)
    return load_prepared(out_dir)


def test_beam_pcollection_input_no_filtering(tmp_path):
    df = pd.DataFrame(HAND_ROWS, columns=["user_id", "item_id", "timestamp"])
    got = run_on_rows(HAND_ROWS, PrepareConfig(), tmp_path)
    assert_prepared_equal(got, prepare(df))
    assert got.metadata["num_interactions"] == len(HAND_ROWS)


def test_beam_pcollection_input_dedupe(tmp_path):
    df = pd.DataFrame(HAND_ROWS, columns=["user_id", "item_id", "timestamp"])
    cfg = PrepareConfig(user_core=2, item_core=2, max_core_rounds=4, dedupe=True)
    expected = prepare(df, cfg, source="hand")
    got = run_on_rows(HAND_ROWS, cfg, tmp_path, source="hand")
    assert_prepared_equal(got, expected)
    assert got.user_vocab.tokens == ["u2", "u1"] and got.item_vocab.tokens == ["i2", "i1"]
    assert [s.tolist() for s in got.sequences] == [[3, 2, 2], [3, 2]]  # u2: i1@4, i2@4 (tie), i2@6
    assert got.metadata["num_interactions"] == 5 and got.metadata["source"] == "hand"


def test_beam_fails_loudly_when_kcore_not_converged(ml_slice, tmp_path):
    with pytest.raises(RuntimeError, match="did not converge"):
        run_prepare_beam(ml_slice, tmp_path, PrepareConfig(user_core=5, item_core=5, max_core_rounds=2))
    written = [f for f in os.listdir(tmp_path) if not f.startswith("beam-temp")]
    assert written == []  # nothing gated on the check was written
