"""The TFX pipeline with the CTR task (`task: ctr`): R2LED on MovieLens-100K, rating >= 4 = click.

One end-to-end run of `configs/pipeline_r2led_ml100k.yaml` (module fixture, through
`tfrec pipeline run`): ExampleGen input from the lifelong time split, curated CTR
schema, Transform vocabulary, ItemSemantics -> SemanticIds -> R2LED Trainer, TFMA
AUC/LogLoss with thresholds, Pusher. The pushed SavedModel answers raw tokens.
"""

import contextlib
import dataclasses
import glob
import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfrec_cli import main
from tfrec.config import build_config
from tfrec.data.lifelong import build_lifelong_data
from tfrec.data.readers import DEFAULT_DATA_ROOT
from tfrec.metrics import auc
from tfrec.semantics.sids import SidsConfig
from tfx_pipeline.config import load_pipeline_config
from tfx_pipeline.data import (
    EXAMPLES_FILE, HISTORY, HISTORY_BUCKET, HISTORY_LABELS, HISTORY_LENGTH, HISTORY_RATINGS, HISTORY_TIMESTAMPS, LABEL,
    TARGET, TARGET_TIMESTAMP, USER_ID, ctr_examples)

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "pipeline_r2led_ml100k.yaml")
SMALL = ["train.epochs=2"]

pytestmark = [
    pytest.mark.skipif(not (DEFAULT_DATA_ROOT / "movielens-100k").is_dir(), reason="bundled movielens-100k not available"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),  # TFMA + numpy
]


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _examples(path):
    return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]


def _bytes(example, name):
    return [v.decode() for v in example.features.feature[name].bytes_list.value]


def _ints(example, name):
    return list(example.features.feature[name].int64_list.value)


def _floats(example, name):
    return list(example.features.feature[name].float_list.value)


def _score_inputs(example, width=None, extra=()):
    """The ranker's feedback inputs of one example's history (+ `extra` unknown tokens with feedback),
    right-padded with `""` / 0 to `width`."""
    history = _bytes(example, HISTORY) + [t for t in extra]
    width = width or len(history)
    pad = width - len(history)
    return {"history": history + [""] * pad,
            "history_ratings": _floats(example, HISTORY_RATINGS) + [5.0] * len(extra) + [0.0] * pad,
            "history_labels": _floats(example, HISTORY_LABELS) + [1.0] * len(extra) + [0.0] * pad,
            "history_timestamps": _ints(example, HISTORY_TIMESTAMPS) + [1] * len(extra) + [0] * pad,
            "timestamp": _ints(example, TARGET_TIMESTAMP)[0], "user": _bytes(example, USER_ID)[0]}


def _stack(rows):
    dtypes = {"history_timestamps": tf.int64, "timestamp": tf.int64}
    return {k: tf.constant([r[k] for r in rows], dtypes.get(k)) for k in rows[0]}


@pytest.fixture(scope="module")
def ctr_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ctr-pipelines"))
    code, out, err = _cli("pipeline", "run", "--config", CONFIG, f"pipeline.root={root}", *SMALL)
    assert code == 0, err[-3000:]
    reports = sorted(glob.glob(os.path.join(root, "*", "reports", "*.json")))
    config = load_pipeline_config(CONFIG, [f"pipeline.root={root}", *SMALL])
    return {"out": out, "report": json.loads(open(reports[-1]).read()), "config": config}


def test_r2led_pipeline_pushes_a_ranker_that_scores_raw_tokens(ctr_run):
    report, config = ctr_run["report"], ctr_run["config"]
    states = {c["component"]: c["state"] for c in report["components"]}
    assert set(states.values()) == {"complete"}, states
    assert {"ItemSemantics", "SemanticIds", "Trainer", "Evaluator", "Pusher"} <= set(states)
    assert report["blessed"] is True
    assert {"auc", "logloss", "example_count"} <= set(report["metrics"]), report["metrics"]
    assert report["metrics"]["auc"] >= config.pipeline.min_value
    pushed = report["pushed_path"]
    assert os.path.dirname(pushed) == config.serving_dir
    assert f"pushed model: {pushed}" in ctr_run["out"].splitlines()[-1]

    served = tf.saved_model.load(pushed)
    test = _examples(os.path.join(config.input_dir, "test", EXAMPLES_FILE))
    history = _bytes(test[0], HISTORY)
    candidates = [_bytes(ex, TARGET)[0] for ex in test[:3]]
    full = _score_inputs(test[0])
    recent = {k: (v[-2:] + [type(v[0])()] * (len(history) - 2) if isinstance(v, list) else v) for k, v in full.items()}
    answer = served.signatures["score"](
        candidates=tf.constant([candidates + ["no-such-item", ""], candidates[:1] + ["", "", "", ""]]),
        **_stack([full, recent]))
    probabilities, valid = answer["probabilities"].numpy(), answer["valid"].numpy()
    assert probabilities.shape == valid.shape == (2, 5)
    assert valid.tolist() == [[True, True, True, True, False], [True, False, False, False, False]]
    assert np.all((probabilities[valid] > 0) & (probabilities[valid] < 1))
    # Unknown history tokens are dropped: the same answer as without them.
    with_unknown = served.signatures["serving_default"](
        candidates=tf.constant([candidates]), **_stack([_score_inputs(test[0], extra=["no-such-item"])]))
    np.testing.assert_allclose(with_unknown["probabilities"].numpy()[0], probabilities[0, :3], rtol=1e-5)
    # The score_examples answer of an example = score on its features (the Evaluator's view = the client's).
    by_example = served.signatures["score_examples"](serialized=tf.constant([test[0].SerializeToString()]))
    target = served.signatures["score"](candidates=tf.constant([_bytes(test[0], TARGET)]), **_stack([full]))
    np.testing.assert_allclose(by_example["probabilities"].numpy(), target["probabilities"].numpy()[:, 0], rtol=1e-5)


def test_evaluator_auc_matches_the_pushed_models_probabilities(ctr_run):
    """TFMA's AUC/LogLoss on the test split = tfrec's on the pushed model's `score_examples` answers."""
    report, config = ctr_run["report"], ctr_run["config"]
    served = tf.saved_model.load(report["pushed_path"])
    records = [r.numpy() for r in tf.data.TFRecordDataset(os.path.join(config.input_dir, "test", EXAMPLES_FILE))]
    labels = np.array([_ints(tf.train.Example.FromString(r), LABEL)[0] for r in records], np.float64)
    predictions = np.concatenate([
        served.signatures["score_examples"](serialized=tf.constant(records[i:i + 512]))["probabilities"].numpy()
        for i in range(0, len(records), 512)
    ])
    assert report["metrics"]["example_count"] == len(records)
    assert report["metrics"]["auc"] == pytest.approx(auc(labels, predictions), abs=2e-3)
    logloss = -np.mean(labels * np.log(predictions) + (1 - labels) * np.log(1 - predictions))
    assert report["metrics"]["logloss"] == pytest.approx(logloss, abs=1e-3)

    # The Trainer fitted R2LED on the SemanticIds codes of the ItemSemantics store, over the Transform vocabulary.
    artifacts = {c["component"]: c["artifacts"] for c in report["components"]}
    training = json.loads(open(os.path.join(artifacts["Trainer"]["model_run"][0], "training.json")).read())
    assert training["semantic_ids"] == artifacts["SemanticIds"]["semantic_ids"][0]
    assert training["semantic_store"] == artifacts["ItemSemantics"]["semantic_store"][0]
    assert training["model"]["class"] == "R2LED" and training["semantics"]["codebook_sizes"] == [16, 16, 16]
    assert "auc" in training["splits"]["valid"] and "test" not in training["splits"]


def test_ctr_examples_follow_the_time_split_with_raw_tokens():
    # u1: a b | c (valid) | d e (test); u2: b a | f (valid, new item) | a (test)
    rows = [("u1", "a", 1, 1), ("u1", "b", 2, 0), ("u2", "b", 1, 1), ("u2", "a", 2, 1), ("u1", "c", 5, 1),
            ("u2", "f", 6, 0), ("u1", "d", 8, 1), ("u1", "e", 9, 0), ("u2", "a", 9, 1)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "label"])
    data = build_lifelong_data(frame, valid_fraction=0.2, test_fraction=0.3)  # cut-offs t=5 and t=8
    examples = {split: [tf.train.Example.FromString(e) for e in records]
                for split, records in ctr_examples(data, max_history=2).items()}
    rows = {split: [(_bytes(e, USER_ID)[0], _bytes(e, HISTORY), _bytes(e, TARGET)[0], _ints(e, LABEL)[0],
                     _ints(e, HISTORY_LENGTH)[0], _bytes(e, HISTORY_BUCKET)[0]) for e in records]
            for split, records in examples.items()}
    assert rows == {
        "train": [("u1", ["a"], "b", 0, 1, "1-15"), ("u2", ["b"], "a", 1, 1, "1-15")],
        "eval": [("u1", ["a", "b"], "c", 1, 2, "1-15"), ("u2", ["b", "a"], "f", 0, 2, "1-15")],
        # the most recent max_history=2 raw tokens, including "f", which is OOV for the model
        "test": [("u1", ["b", "c"], "d", 1, 3, "1-15"), ("u1", ["c", "d"], "e", 0, 4, "1-15"),
                 ("u2", ["a", "f"], "a", 1, 3, "1-15")],
    }
    # each history item's feedback (its click, no rating here: 0) and time; the target's time
    feedback = [(_floats(e, HISTORY_LABELS), _floats(e, HISTORY_RATINGS), _ints(e, HISTORY_TIMESTAMPS),
                 _ints(e, TARGET_TIMESTAMP)[0]) for e in examples["test"]]
    assert feedback == [([0.0, 1.0], [0.0, 0.0], [2, 5], 8), ([1.0, 1.0], [0.0, 0.0], [5, 8], 9),
                        ([1.0, 0.0], [0.0, 0.0], [2, 6], 9)]


def test_ctr_dag_wires_semantics_into_the_trainer_only_when_the_model_reads_them():
    from tfx_pipeline.pipeline import create_pipeline

    def components(*overrides):
        config = load_pipeline_config(CONFIG, ["pipeline.root=/tmp/unused", *overrides])
        return {c.id: c for c in create_pipeline(config).components}

    r2led = components()
    assert r2led["Trainer"].inputs["semantic_ids"].producer_component_id == "SemanticIds"
    assert r2led["Trainer"].inputs["semantic_store"].producer_component_id == "ItemSemantics"
    sids = json.loads(r2led["SemanticIds"].exec_properties["config"])
    assert sids["codebook_size"] == [16, 16, 16] and sids["deduplicate"] is False and sids["num_levels"] == 3
    # The component reads back exactly the config's sids: section (the store is its input, not a path).
    section = load_pipeline_config(CONFIG, ["pipeline.root=/tmp/unused"]).experiment.sids
    assert build_config(SidsConfig, sids, "sids.") == dataclasses.replace(section, store_path=None)
    din = components("model.name=din", "pipeline.item_semantics=false", "pipeline.semantic_ids=false")
    assert not {"ItemSemantics", "SemanticIds"} & set(din)
    assert "semantic_store" not in din["Trainer"].inputs and "semantic_ids" not in din["Trainer"].inputs


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["pipeline.semantic_ids=false"], "model.name: r2led needs pipeline.semantic_ids: true"),
        (["pipeline.item_semantics=false", "pipeline.semantic_ids=false"],
         "model.name: r2led needs pipeline.item_semantics: true"),
        (["model.name=sim-soft", "pipeline.item_semantics=false", "pipeline.semantic_ids=false"],
         "model.name: sim-soft needs pipeline.item_semantics: true"),
        (["pipeline.gate_metric=ndcg@10"], "must be one of ['auc'] for task: ctr"),
        (["task=ranking"], "config key task must be one of sequential, ctr"),
        (["model.no_such_key=1"], "unknown config key(s) model.no_such_key"),
    ],
)
def test_ctr_config_errors_are_one_clear_line_before_anything_runs(overrides, message, tmp_path):
    code, _, err = _cli("pipeline", "run", "--config", CONFIG, f"pipeline.root={tmp_path}", *overrides)
    assert code == 2 and err.startswith("tfrec pipeline: error:") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)  # nothing was written or run


def test_curated_ctr_schema_accepts_the_examples_and_flags_a_bad_label(tmp_path):
    """The schema ExampleValidator checks (tfx_pipeline/schema/ctr_schema.pbtxt) fits `ctr_examples` exactly."""
    import tensorflow_data_validation as tfdv

    from tfx_pipeline.config import CTR_SCHEMA

    frame = pd.DataFrame([(u, f"i{(3 * u + t) % 7}", t, (u + t) % 2) for u in range(4) for t in range(1, 9)],
                         columns=["user_id", "item_id", "timestamp", "label"])
    records = ctr_examples(build_lifelong_data(frame, valid_fraction=0.25, test_fraction=0.25), max_history=3)["train"]
    schema = tfdv.load_schema_text(str(CTR_SCHEMA))

    def anomalies(serialized):
        path = str(tmp_path / "examples.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for record in serialized:
                writer.write(record)
        stats = tfdv.generate_statistics_from_tfrecord(path)
        return dict(tfdv.validate_statistics(stats, schema).anomaly_info)

    assert anomalies(records) == {}
    bad = tf.train.Example.FromString(records[0])
    bad.features.feature[LABEL].int64_list.value[:] = [2]  # not a click label
    found = anomalies([bad.SerializeToString(), *records[1:]])
    assert set(found) == {LABEL}, found


def test_corrupted_ctr_data_stops_the_run_before_training(ctr_run, tmp_path):
    """Wrong label type (train), a new column (eval), empty targets (test): anomalies, nothing trained or pushed."""
    src, corrupted, root = ctr_run["config"].input_dir, tmp_path / "corrupted", str(tmp_path / "pipelines")
    for split in ("train", "eval", "test"):
        examples = _examples(os.path.join(src, split, EXAMPLES_FILE))
        for i, example in enumerate(examples):
            feature = example.features.feature
            if split == "train":  # labels as floats
                label = feature[LABEL].int64_list.value[0]
                feature[LABEL].CopyFrom(tf.train.Feature(float_list=tf.train.FloatList(value=[label])))
            elif split == "eval" and i % 10 == 0:
                feature["rating"].CopyFrom(tf.train.Feature(float_list=tf.train.FloatList(value=[4.0])))
            elif split == "test" and i % 10 == 0:
                feature[TARGET].CopyFrom(tf.train.Feature(bytes_list=tf.train.BytesList()))
        os.makedirs(corrupted / split)
        with tf.io.TFRecordWriter(str(corrupted / split / EXAMPLES_FILE)) as writer:
            for example in examples:
                writer.write(example.SerializeToString())
    code, out, err = _cli("pipeline", "run", "--config", CONFIG, f"pipeline.root={root}",
                          f"pipeline.input_dir={corrupted}", *SMALL)
    assert code == 2
    assert err.startswith("tfrec pipeline: error: AnomalyGate failed") and "found anomalies" in err
    for problem in (f"'{LABEL}'", "'rating'", f"'{TARGET}'", "split 'train'", "split 'eval'", "split 'test'"):
        assert problem in err, (problem, err)
    report = json.loads(open(sorted(glob.glob(os.path.join(root, "*", "reports", "*.json")))[-1]).read())
    states = {c["component"]: c["state"] for c in report["components"]}
    assert states["AnomalyGate"] == "failed"
    assert states["Transform"] == states["Trainer"] == states["Pusher"] == "not run"
    assert report["pushed_path"] is None
    assert "nothing pushed: the run stopped at AnomalyGate" in out
