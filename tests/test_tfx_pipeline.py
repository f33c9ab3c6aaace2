"""The TFX pipeline on MovieLens-100K: push, cache, gate on data anomalies and on model quality.

One pipeline run (module fixture, through `tfrec pipeline run`) is shared: the
tests that follow rerun it unchanged (cache), with a one-step model (must not
be pushed) and on a corrupted copy of its input (must stop before training).
One more run trains DMESR on the ItemSemantics store (`configs/pipeline_dmesr_ml100k.yaml`).
"""

import contextlib
import glob
import io
import json
import os
import time

import numpy as np
import pytest
import tensorflow as tf

from tfrec_cli import main
from tfrec.config import DataConfig, ExperimentConfig
from tfrec.data.readers import DEFAULT_DATA_ROOT
from tfrec.data.vocab import NUM_RESERVED
from tfrec.metrics import ranking_metrics_from_ranks, target_ranks
from tfx_pipeline.config import load_pipeline_config
from tfx_pipeline.data import EXAMPLES_FILE, HISTORY, SPLITS, TARGET, write_example_gen_input

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "pipeline_sasrec_ml100k.yaml")
DMESR_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "pipeline_dmesr_ml100k.yaml")
SMALL = [
    "model.embedding_dim=16", "model.max_length=20", "train.epochs=2", "train.batch_size=128",
    "pipeline.min_value=0.008",  # random ranking gives ~0.003 here
]
DMESR_SMALL = [  # tiny DMESR: 16-token titles, 16-d reduced views/tokens, 30 steps
    "model.embedding_dim=16", "model.max_length=20", "train.batch_size=128", "pipeline.train_steps=30",
    "dmesr.max_tokens=16", "dmesr.view_pca_dim=16", "dmesr.token_pca_dim=16", "pipeline.min_value=0.008",
]
CACHED = ("ImportExampleGen", "StatisticsGen", "SchemaGen", "CuratedSchemaGen", "ExampleValidator",
          "AnomalyGate", "Transform", "Trainer")

pytestmark = [
    pytest.mark.skipif(not (DEFAULT_DATA_ROOT / "movielens-100k").is_dir(), reason="bundled movielens-100k not available"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # google-cloud notices about Python 3.11
]


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _run(root, *overrides, config=CONFIG, small=SMALL):
    """`tfrec pipeline run` -> (exit code, stdout, stderr, report dict of this run)."""
    before = set(glob.glob(os.path.join(root, "*", "reports", "*.json")))
    code, out, err = _cli("pipeline", "run", "--config", config, f"pipeline.root={root}", *small, *overrides)
    new = sorted(set(glob.glob(os.path.join(root, "*", "reports", "*.json"))) - before)
    report = json.loads(open(new[-1]).read()) if new else None
    return code, out, err, report


def _states(report):
    return {c["component"]: c["state"] for c in report["components"]}


def _versions(serving_dir):
    return sorted(p for p in os.listdir(serving_dir) if p.isdigit())


def _examples(path):
    return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]


def _tokens(example, name):
    return [v.decode() for v in example.features.feature[name].bytes_list.value]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipelines"))
    start = time.perf_counter()
    code, out, err, report = _run(root)
    assert code == 0, err[-3000:]
    config = load_pipeline_config(CONFIG, [f"pipeline.root={root}", *SMALL])
    return {"root": root, "out": out, "report": report, "config": config, "seconds": time.perf_counter() - start}


def test_first_run_pushes_a_savedmodel_that_answers_raw_tokens(first_run):
    report, config = first_run["report"], first_run["config"]
    assert set(_states(report).values()) == {"complete"}, _states(report)
    assert report["blessed"] is True
    pushed = report["pushed_path"]
    assert os.path.dirname(pushed) == config.serving_dir and os.path.basename(pushed).isdigit()
    # The printed report names every component, its artifacts, and ends with the pushed path.
    out = first_run["out"]
    assert all(c["component"] in out for c in report["components"])
    assert f"pushed model: {pushed}" in out.splitlines()[-1]
    assert report["metrics"]["ndcg@10"] >= 0.008
    _assert_answers_raw_tokens(pushed, config)


def _assert_answers_raw_tokens(pushed, config):
    """The pushed SavedModel answers every signature with raw item tokens of the training catalog."""
    served = tf.saved_model.load(pushed)
    test = _examples(os.path.join(config.input_dir, "test", EXAMPLES_FILE))
    history = _tokens(test[0], HISTORY)[-5:]
    catalog = {t for ex in _examples(os.path.join(config.input_dir, "train", EXAMPLES_FILE))
               for t in _tokens(ex, HISTORY) + _tokens(ex, TARGET)}
    answer = served.signatures["serving_default"](
        history=tf.constant([history, history[-2:] + ["", "", ""]]), exclude_history=tf.constant([True, False])
    )
    items = answer["item_ids"].numpy().astype(str)
    scores = answer["scores"].numpy()
    assert items.shape == scores.shape == (2, config.pipeline.top_k)
    assert set(items.ravel()) <= catalog  # raw item tokens out, never ids or padding
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first
    assert not set(items[0]) & set(history)  # exclude_history=True drops the history items
    # Unknown tokens are dropped: the answer equals the answer without them.
    with_unknown = served.signatures["recommend"](
        history=tf.constant([history + ["no-such-item"]]), exclude_history=tf.constant([True])
    )
    np.testing.assert_array_equal(with_unknown["item_ids"].numpy()[0].astype(str), items[0])
    # The tf.Example signature answers the same; the user embedding has the model's width.
    request = tf.train.Example(features=tf.train.Features(feature={
        HISTORY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode() for t in history])),
        "exclude_history": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
    })).SerializeToString()
    from_examples = served.signatures["recommend_examples"](serialized=tf.constant([request]))
    np.testing.assert_array_equal(from_examples["item_ids"].numpy()[0].astype(str), items[0])
    embedding = served.signatures["user_embedding"](history=tf.constant([history]))["embedding"]
    assert embedding.shape == (1, config.experiment.model.embedding_dim)
    with pytest.raises(tf.errors.InvalidArgumentError, match="no known item token"):
        served.signatures["recommend"](history=tf.constant([["no-such-item", ""]]), exclude_history=tf.constant([False]))


def test_evaluator_metric_equals_tfrec_evaluation_of_the_trained_model(first_run):
    import keras
    import tensorflow_transform as tft

    from tfx_pipeline.preprocessing import ITEM_VOCAB
    from tfx_pipeline.trainer import MODEL_FILE, read_pairs

    report, config = first_run["report"], first_run["config"]
    artifacts = {c["component"]: c["artifacts"] for c in report["components"]}
    transform_graph = artifacts["Transform"]["transform_graph"][0]
    vocab = tft.TFTransformOutput(transform_graph).vocabulary_by_name(ITEM_VOCAB)
    vocab = [t.decode() for t in vocab]
    ids = {token: i + NUM_RESERVED for i, token in enumerate(vocab)}  # tfrec layout: 0 pad, 1 OOV, items from 2

    # Transformed training examples use exactly that layout: no padding or OOV id inside.
    histories, targets = read_pairs([os.path.join(artifacts["Transform"]["transformed_examples"][0], "Split-train", "*")])
    train = _examples(os.path.join(config.input_dir, "train", EXAMPLES_FILE))
    assert [h.tolist() for h in histories[:50]] == [[ids[t] for t in _tokens(ex, HISTORY)] for ex in train[:50]]
    assert min(np.concatenate(histories).min(), targets.min()) >= NUM_RESERVED

    # tfrec's numpy ranking of the trained Keras model on the test split gives the Evaluator's numbers.
    model = keras.saving.load_model(os.path.join(artifacts["Trainer"]["model_run"][0], MODEL_FILE))
    test = _examples(os.path.join(config.input_dir, "test", EXAMPLES_FILE))
    history_ids = [[ids[t] for t in _tokens(ex, HISTORY) if t in ids] for ex in test]
    target_ids = np.array([ids.get(_tokens(ex, TARGET)[0], 1) for ex in test])
    window = np.zeros((len(test), config.experiment.model.max_length), np.int32)
    for row, h in enumerate(history_ids):
        tail = h[-window.shape[1]:]
        window[row, : len(tail)] = tail
    scores = np.asarray(model.score_items(window))
    known = target_ids >= NUM_RESERVED
    ranks = np.full(len(test), len(vocab), np.int64)  # an unknown target is never recommended
    ranks[known] = target_ranks(scores[known], target_ids[known], exclude=[0, 1])
    expected = ranking_metrics_from_ranks(ranks, ks=config.experiment.eval.ks)
    for name in ("ndcg@10", "hr@10", "mrr@10"):
        assert report["metrics"][name] == pytest.approx(expected[name], abs=1e-5), name


def test_pipeline_savedmodel_answers_as_the_export_of_the_same_model(first_run, tmp_path):
    """One sequential serving graph: the Trainer's SavedModel and `tfrec export`'s agree on every signature."""
    import keras
    import tensorflow_transform as tft

    from export.saved_model import export_sequential
    from tfrec.data.vocab import Vocabulary
    from tfx_pipeline.preprocessing import ITEM_VOCAB
    from tfx_pipeline.trainer import MODEL_FILE

    report, config = first_run["report"], first_run["config"]
    artifacts = {c["component"]: c["artifacts"] for c in report["components"]}
    vocab_file = tft.TFTransformOutput(artifacts["Transform"]["transform_graph"][0]).vocabulary_file_by_name(ITEM_VOCAB)
    model = keras.saving.load_model(os.path.join(artifacts["Trainer"]["model_run"][0], MODEL_FILE))
    exported = tf.saved_model.load(str(export_sequential(model, Vocabulary.load(vocab_file), str(tmp_path),
                                                         k=config.pipeline.top_k)))
    pipeline = tf.saved_model.load(report["pushed_path"])
    test = _examples(os.path.join(config.input_dir, "test", EXAMPLES_FILE))[:8]
    width = max(len(_tokens(ex, HISTORY)) for ex in test) + 1
    history = tf.constant([(_tokens(ex, HISTORY) + ["no-such-item"] + [""] * width)[:width] for ex in test])
    exclude = tf.constant([i % 2 == 0 for i in range(len(test))])
    for signature, inputs in (("recommend", {"history": history, "exclude_history": exclude}),
                              ("user_embedding", {"history": history})):
        ours, theirs = pipeline.signatures[signature](**inputs), exported.signatures[signature](**inputs)
        assert set(ours) == set(theirs), signature
        for name in ours:
            if ours[name].dtype == tf.string:
                np.testing.assert_array_equal(ours[name].numpy(), theirs[name].numpy(), err_msg=signature)
            else:
                np.testing.assert_allclose(ours[name].numpy(), theirs[name].numpy(), rtol=1e-6, err_msg=signature)
    assert set(pipeline.signatures) == set(exported.signatures) | {"evaluate"}


def test_unchanged_rerun_reuses_cached_executions(first_run):
    root, serving_dir = first_run["root"], first_run["config"].serving_dir
    start = time.perf_counter()
    code, out, err, report = _run(root)
    seconds = time.perf_counter() - start
    assert code == 0, err[-3000:]
    states = _states(report)
    assert all(states[name] == "cached" for name in CACHED), states
    assert f"input {first_run['config'].input_dir}" in out and "(unchanged)" in out
    print(f"first run {first_run['seconds']:.0f}s, cached rerun {seconds:.0f}s; per component:",
          {c["component"]: c["seconds"] for c in report["components"]})
    assert seconds < 0.7 * first_run["seconds"]
    assert report["blessed"] is True  # the same model against itself as baseline
    assert _versions(serving_dir)


def test_worse_model_is_not_blessed_and_previous_version_stays(first_run):
    root, serving_dir = first_run["root"], first_run["config"].serving_dir
    versions = _versions(serving_dir)
    # One training step, and no value floor: only the change threshold vs the blessed model decides.
    code, out, err, report = _run(root, "pipeline.train_steps=1", "pipeline.min_value=0.0")
    assert code == 0, err[-3000:]
    states = _states(report)
    assert states["Trainer"] == states["Evaluator"] == states["Pusher"] == "complete"
    assert report["blessed"] is False and report["pushed_path"] is None
    reason = report["not_pushed_reason"]
    assert "ndcg@10" in reason and "change" in reason, reason
    assert report["metrics"]["ndcg@10"] < first_run["report"]["metrics"]["ndcg@10"]
    assert out.splitlines()[-1].startswith("nothing pushed: the model was not blessed")
    assert _versions(serving_dir) == versions
    served = tf.saved_model.load(os.path.join(serving_dir, versions[-1]))
    answer = served.signatures["recommend"](history=tf.constant([["50", "100"]]), exclude_history=tf.constant([False]))
    assert answer["item_ids"].shape == (1, first_run["config"].pipeline.top_k)


def _corrupt(src, dst):
    """Copy of the pipeline input with a wrong type, a new column and empty ids (one per split)."""
    for split in SPLITS:
        examples = _examples(os.path.join(src, split, EXAMPLES_FILE))
        for i, example in enumerate(examples):
            feature = example.features.feature
            if split == "train":  # a column with the wrong type: timestamps as floats
                seconds = feature["target_timestamp"].int64_list.value[0]
                feature["target_timestamp"].CopyFrom(tf.train.Feature(float_list=tf.train.FloatList(value=[seconds])))
            elif split == "eval" and i % 10 == 0:  # a new, unexpected column
                feature["rating"].CopyFrom(tf.train.Feature(float_list=tf.train.FloatList(value=[4.0])))
            elif split == "test" and i % 10 == 0:  # empty ids
                feature["user_id"].CopyFrom(tf.train.Feature(bytes_list=tf.train.BytesList()))
        os.makedirs(os.path.join(dst, split))
        with tf.io.TFRecordWriter(os.path.join(dst, split, EXAMPLES_FILE)) as writer:
            for example in examples:
                writer.write(example.SerializeToString())


def test_corrupted_data_stops_the_run_before_training(first_run, tmp_path):
    corrupted, root = str(tmp_path / "corrupted"), str(tmp_path / "pipelines")
    _corrupt(first_run["config"].input_dir, corrupted)
    code, out, err, report = _run(root, f"pipeline.input_dir={corrupted}")
    assert code == 2
    assert err.startswith("tfrec pipeline: error: AnomalyGate failed") and "found anomalies" in err
    for problem in ("'target_timestamp'", "'rating'", "'user_id'", "split 'train'", "split 'eval'", "split 'test'"):
        assert problem in err, (problem, err)
    states = _states(report)
    assert states["ExampleValidator"] == "complete" and states["AnomalyGate"] == "failed"
    assert states["Transform"] == states["Trainer"] == states["Pusher"] == "not run"
    assert report["pushed_path"] is None and not os.path.exists(os.path.join(root, "sasrec-ml100k", "serving"))
    assert "nothing pushed: the run stopped at AnomalyGate" in out


def test_example_gen_input_pairs_and_unchanged_rewrite(tmp_path):
    interactions = tmp_path / "inter.tsv"
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u1", "d", 4), ("u2", "b", 1), ("u2", "a", 2)]
    interactions.write_text("user_id\titem_id\ttimestamp\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows))
    experiment = ExperimentConfig(data=DataConfig(interactions_path=str(interactions)))
    summary = write_example_gen_input(experiment, tmp_path / "input")
    # u1 (4 items): train a->b, eval [a,b]->c, test [a,b,c]->d; u2 (2 items) trains only: [b]->a.
    assert summary["examples"] == {"train": 2, "eval": 1, "test": 1}
    pairs = {split: [(_tokens(ex, "user_id")[0], _tokens(ex, HISTORY), _tokens(ex, TARGET)[0],
                      ex.features.feature["target_timestamp"].int64_list.value[0])
                     for ex in _examples(str(tmp_path / "input" / split / EXAMPLES_FILE))] for split in SPLITS}
    assert pairs == {
        "train": [("u1", ["a"], "b", 2), ("u2", ["b"], "a", 2)],
        "eval": [("u1", ["a", "b"], "c", 3)],
        "test": [("u1", ["a", "b", "c"], "d", 4)],
    }
    stamps = {s: os.stat(tmp_path / "input" / s / EXAMPLES_FILE).st_mtime_ns for s in SPLITS}
    time.sleep(0.01)
    assert write_example_gen_input(experiment, tmp_path / "input")["changed"] == []
    assert stamps == {s: os.stat(tmp_path / "input" / s / EXAMPLES_FILE).st_mtime_ns for s in SPLITS}


def test_semantic_components_join_the_dag_only_when_configured():
    from tfx_pipeline.pipeline import create_pipeline

    def ids(*overrides):
        config = load_pipeline_config(CONFIG, ["pipeline.root=/tmp/unused", *overrides])
        return {c.id: c for c in create_pipeline(config).components}

    assert not {"ItemSemantics", "SemanticIds"} & set(ids())
    components = ids("pipeline.item_semantics=true", "pipeline.semantic_ids=true")
    semantics, sids = components["ItemSemantics"], components["SemanticIds"]
    assert type(semantics).__name__ == "ItemSemanticsGen"  # node id kept, class renamed (issue 23)
    assert semantics.inputs["transform_graph"].producer_component_id == "Transform"
    assert sids.inputs["semantic_store"].producer_component_id == "ItemSemantics"
    assert semantics.exec_properties["dataset"] == "movielens-100k"
    assert "semantic_store" not in components["Trainer"].inputs  # an ID model does not read the store
    dmesr = ids("pipeline.item_semantics=true", "model.item_encoder=dmesr")
    assert dmesr["Trainer"].inputs["semantic_store"].producer_component_id == "ItemSemantics"


def test_dmesr_pipeline_trains_on_the_item_semantics_store_and_pushes(tmp_path):
    import tensorflow_transform as tft

    from tfrec.data.vocab import Vocabulary
    from tfrec.semantics.store import SemanticStore
    from tfx_pipeline.preprocessing import ITEM_VOCAB
    from tfx_pipeline.trainer import REPORT_FILE

    root = str(tmp_path)
    code, out, err, report = _run(root, config=DMESR_CONFIG, small=DMESR_SMALL)
    assert code == 0, err[-3000:]
    states = _states(report)
    assert set(states.values()) == {"complete"} and "ItemSemantics" in states, states
    assert report["blessed"] is True and report["metrics"]["ndcg@10"] >= 0.008
    config = load_pipeline_config(DMESR_CONFIG, [f"pipeline.root={root}", *DMESR_SMALL])
    artifacts = {c["component"]: c["artifacts"] for c in report["components"]}

    # The Trainer trained DMESR on the store ItemSemantics wrote (not on dmesr.store_path of the file),
    # whose rows follow the Transform vocabulary token by token.
    store_uri = artifacts["ItemSemantics"]["semantic_store"][0]
    training = json.loads(open(os.path.join(artifacts["Trainer"]["model_run"][0], REPORT_FILE)).read())
    assert training["item_encoder"] == "dmesr" and training["semantic_store"] == store_uri
    store = SemanticStore.load(store_uri)
    transform_vocab = Vocabulary.load(
        tft.TFTransformOutput(artifacts["Transform"]["transform_graph"][0]).vocabulary_file_by_name(ITEM_VOCAB)
    )
    assert store.item_vocab == transform_vocab and training["vocab_size"] == transform_vocab.size
    assert store.view("title").mask[2:].mean() > 0.95  # ml-100k.item gives (nearly) every item a title

    # Served as its materialised item table: raw tokens in and out, no token states inside the SavedModel.
    pushed = report["pushed_path"]
    assert os.path.dirname(pushed) == config.serving_dir
    _assert_answers_raw_tokens(pushed, config)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(pushed) for f in files)
    assert size < 0.1 * store.view("title").tokens.nbytes


@pytest.mark.parametrize("config, components", [
    (CONFIG, {"ImportExampleGen", "AnomalyGate", "Transform", "Trainer", "Evaluator", "Pusher"}),
    (os.path.join(os.path.dirname(CONFIG), "pipeline_r2led_ml1m.yaml"),
     {"ImportExampleGen", "Transform", "ItemSemantics", "SemanticIds", "Trainer", "Evaluator", "Pusher"}),
])
def test_compile_for_kubeflow_vertex(tmp_path, config, components):
    """The same DAG compiles to a Kubeflow V2 / Vertex pipeline spec (kfp-pipeline-spec is pinned)."""
    spec = tmp_path / "spec.json"
    code, out, err = _cli("pipeline", "compile", "--config", config, "--output", str(spec),
                          "pipeline.root=gs://bucket/pipelines", "pipeline.input_dir=gs://bucket/input")
    assert code == 0, err
    compiled = json.loads(spec.read_text())
    tasks = compiled["pipelineSpec"]["root"]["dag"]["tasks"]
    assert components <= set(tasks)
    assert compiled["runtimeConfig"]["gcsOutputDirectory"].startswith("gs://bucket/pipelines")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["pipeline.gate_metric=ndcg@7"], "pipeline.gate_metric 'ndcg@7' must be"),
        (["pipeline.no_such_key=1"], "unknown config key(s) pipeline.no_such_key"),
        (["pipeline.semantic_ids=true"], "pipeline.semantic_ids needs pipeline.item_semantics"),
        (["model.item_encoder=dmesr"], "model.item_encoder: dmesr needs pipeline.item_semantics: true"),
        (["pipeline.input_dir=/nonexistent-input"], "has no train, eval, test folder(s)"),
        (["pipeline.schema=/nonexistent.pbtxt"], "schema file not found"),
    ],
)
def test_config_errors_are_one_clear_line(overrides, message, tmp_path):
    code, _, err = _cli("pipeline", "run", "--config", CONFIG, f"pipeline.root={tmp_path}", *overrides)
    assert code == 2 and err.startswith("tfrec pipeline: error:") and message in err, err
    assert len(err.strip().splitlines()) == 1
