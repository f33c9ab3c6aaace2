"""The ExampleGen input: leave-one-out (history, target) pairs as TFRecord `tf.Example`s.

The pipeline does not read raw interaction logs itself: `write_example_gen_input`
runs tfrec's preprocessing (`tfrec.training.prepare_split`: reader, k-core,
chronological sequences, leave-one-out with `data.min_length`) and writes one
folder per split, which `ImportExampleGen` reads as three splits:

| split   | one example per               | `history`                   | `target` |
| ------- | ----------------------------- | --------------------------- | -------- |
| `train` | user with >= 2 training items | training items but the last | the last training item |
| `eval`  | evaluated user                | `s[:-2]`                    | `s[-2]` (validation, Trainer's early stopping) |
| `test`  | evaluated user                | `s[:-1]`                    | `s[-1]` (Evaluator's gate) |

Features (the curated schema `tfx_pipeline/schema/schema.pbtxt` pins them):
`user_id` (bytes, one value), `history` (bytes list: item tokens, oldest
first, at least one), `target` (bytes, one value), `target_timestamp` (int64,
one value: when the target happened). Items are raw tokens: Transform builds
the vocabulary, so ids never leave the pipeline. The Trainer rebuilds each
training sequence as `history + [target]` and trains on all its positions.

Files: `<out>/<split>/examples.tfrecord` (uncompressed, deterministic bytes)
and `<out>/metadata.json` (counts, source fingerprint, config). A file whose
bytes would not change is not rewritten: ImportExampleGen fingerprints its
input by size and modification time, so an unchanged input keeps the cache.

**CTR task** (`task: ctr`, a `tfrec.ctr.CTRConfig`): one example per
lifelong CTR sample of `tfrec.data.lifelong` (`tfrec.ctr.load_ctr_data`:
rating >= threshold = click, global time split, `data.max_train_samples` user
subsample), split `train` / `valid` -> `eval` / `test`. The time split already
keeps every history strictly before its target, so no split leaks into another.
Features (curated schema `tfx_pipeline/schema/ctr_schema.pbtxt`): `user_id`,
`history` (the most recent `model.max_history` raw item tokens, oldest first,
including items that are new in that split) with the feedback of each of them
(`history_ratings` float, 0 = no rating; `history_labels` float 0/1;
`history_timestamps` int64: what the ranker's `score` takes), `target`, `label` (int64 0/1),
`target_timestamp`, `history_length` (int64, the whole lifelong history before
the `max_history` cut) and `history_bucket` (bytes, `history_length` bucketed
by `HISTORY_BUCKETS`: what the Evaluator slices on).

Example (the bundled MovieLens-100K):
>>> import tempfile
>>> from tfrec.config import load_config
>>> summary = write_example_gen_input(load_config(None, ["data.dataset=movielens-100k"]), tempfile.mkdtemp())
>>> summary["examples"]
{'train': 943, 'eval': 943, 'test': 943}
"""

import json
import os

import numpy as np

from tfrec.data.vocab import NUM_RESERVED

USER_ID, HISTORY, TARGET, TARGET_TIMESTAMP = "user_id", "history", "target", "target_timestamp"
LABEL, HISTORY_LENGTH, HISTORY_BUCKET = "label", "history_length", "history_bucket"
# CTR: the feedback of each history item, aligned with `history` (what the ranker's `score` takes)
HISTORY_RATINGS, HISTORY_LABELS, HISTORY_TIMESTAMPS = "history_ratings", "history_labels", "history_timestamps"
CTR_FEEDBACK = (HISTORY_RATINGS, HISTORY_LABELS, HISTORY_TIMESTAMPS)
HISTORY_BUCKETS = (16, 64, 256, 1024)  # ours: lower edges of the history-length slices after the first
TRAIN, EVAL, TEST = "train", "eval", "test"
SPLITS = (TRAIN, EVAL, TEST)
EXAMPLES_FILE = "examples.tfrecord"
METADATA_FILE = "metadata.json"


def make_pair_example(user_id, history, target, target_timestamp):
    """Serialized `tf.train.Example` of one (history, target) pair (tokens as str)."""
    import tensorflow as tf

    def strings(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(v).encode("utf-8") for v in values]))

    features = {
        USER_ID: strings([user_id]),
        HISTORY: strings(history),
        TARGET: strings([target]),
        TARGET_TIMESTAMP: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(target_timestamp)])),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


def history_bucket(length, edges=HISTORY_BUCKETS):
    """The slice name of a lifelong history length: `"1-15"`, `"16-63"`, ..., `"1024+"`.

    >>> [history_bucket(n) for n in (1, 16, 300, 5000)]
    ['1-15', '16-63', '256-1023', '1024+']
    """
    lower = 1
    for edge in edges:
        if length < edge:
            return f"{lower}-{edge - 1}"
        lower = edge
    return f"{lower}+"


def _bytes_feature(values):
    import tensorflow as tf

    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _int_feature(values):
    import tensorflow as tf

    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def make_ctr_example(user_id, history, target, label, target_timestamp, history_length, history_ratings=None,
                     history_labels=None, history_timestamps=None):
    """Serialized `tf.train.Example` of one CTR sample (`history`: bytes tokens, oldest first; the
    feedback lists, one value per history token: rating (0 = none), click 0/1, Unix seconds)."""
    import tensorflow as tf

    feedback = {HISTORY_RATINGS: history_ratings, HISTORY_LABELS: history_labels,
                HISTORY_TIMESTAMPS: history_timestamps}
    for name, values in feedback.items():
        if values is None or len(values) != len(history):
            raise ValueError(f"{name} needs one value per history item ({len(history)}), got "
                             f"{None if values is None else len(values)}")
    features = {
        USER_ID: _bytes_feature([str(user_id).encode("utf-8")]),
        HISTORY: _bytes_feature(list(history)),
        HISTORY_RATINGS: tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in history_ratings])),
        HISTORY_LABELS: tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in history_labels])),
        HISTORY_TIMESTAMPS: _int_feature([int(v) for v in history_timestamps]),
        TARGET: _bytes_feature([target]),
        LABEL: _int_feature([int(label)]),
        TARGET_TIMESTAMP: _int_feature([int(target_timestamp)]),
        HISTORY_LENGTH: _int_feature([int(history_length)]),
        HISTORY_BUCKET: _bytes_feature([history_bucket(history_length).encode()]),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


CTR_SPLITS = {TRAIN: "train", EVAL: "valid", TEST: "test"}  # pipeline split -> tfrec.data.lifelong split


def ctr_examples(data, max_history):
    """`{split name: [serialized Example]}` of lifelong CTR samples (`tfrec.data.lifelong.LifelongData`)."""
    if data.event_tokens is None:
        raise ValueError("the lifelong data carries no raw event tokens (LifelongData.event_tokens)")
    tokens = np.array([str(t).encode("utf-8") for t in data.event_tokens], dtype=object)
    ratings = np.nan_to_num(data.event_ratings, nan=0.0)  # 0 = no rating, as lifelong_dataset
    out = {}
    for name, lifelong_split in CTR_SPLITS.items():
        samples = data.splits[lifelong_split]
        rows = zip(samples.user.tolist(), samples.history_start.tolist(), samples.history_end.tolist(),
                   samples.event.tolist(), samples.label.tolist(), samples.timestamp.tolist())
        out[name] = []
        for user, start, end, event, label, timestamp in rows:
            kept = slice(max(start, end - max_history), end)
            out[name].append(make_ctr_example(
                data.users[user], tokens[kept], tokens[event], label, timestamp, end - start,
                ratings[kept], data.event_labels[kept], data.event_timestamps[kept]))
    if not out[TRAIN] or not out[EVAL] or not out[TEST]:
        raise ValueError(f"the lifelong data leaves {', '.join(f'{len(v)} {k}' for k, v in out.items())} "
                         f"examples; the pipeline needs samples in every split")
    return out


def pair_examples(data, split):
    """`{split name: [serialized Example]}` from `PreparedData` and its `LeaveOneOutSplit`."""
    items = np.asarray(data.item_vocab.tokens, dtype=object)
    users = data.user_vocab.tokens

    def tokens(ids):
        return items[np.asarray(ids, np.int64) - NUM_RESERVED]

    out = {name: [] for name in SPLITS}
    for u, train in enumerate(split.train):
        if len(train) >= 2:  # one item alone carries no next-item target
            out[TRAIN].append(make_pair_example(users[u], tokens(train[:-1]), tokens(train[-1:])[0],
                                                data.timestamps[u][len(train) - 1]))
    for e, u in enumerate(split.eval_users.tolist()):
        times = data.timestamps[u]
        out[EVAL].append(make_pair_example(users[u], tokens(split.valid_history[e]),
                                           tokens([split.valid_targets[e]])[0], times[-2]))
        out[TEST].append(make_pair_example(users[u], tokens(split.test_history[e]),
                                           tokens([split.test_targets[e]])[0], times[-1]))
    if not out[TRAIN] or not out[TEST]:
        raise ValueError(
            f"the data leaves {len(out[TRAIN])} training and {len(out[TEST])} evaluation examples; "
            f"the pipeline needs users with >= data.min_length items"
        )
    return out


def _write_if_changed(path, payload):
    """Write `payload` (bytes) to `path` unless it already holds exactly that; True if written."""
    if os.path.isfile(path) and os.path.getsize(path) == len(payload):
        with open(path, "rb") as f:
            if f.read() == payload:
                return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)
    return True


def _tfrecord_bytes(records):
    """The bytes `tf.io.TFRecordWriter` writes for `records` (built in memory, for comparison)."""
    import tempfile

    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "records")
        with tf.io.TFRecordWriter(path) as writer:
            for record in records:
                writer.write(record)
        with open(path, "rb") as f:
            return f.read()


def write_example_gen_input(experiment_config, out_dir):
    """Prepare the configured data and write the three splits (see the module doc).

    Args:
        experiment_config: a `tfrec.config.ExperimentConfig` (its `data` section is used)
            or a `tfrec.ctr.CTRConfig` (`data`, and `model.max_history`).
        out_dir: local folder; created if needed.

    Returns:
        dict: `examples` (count per split), `changed` (splits rewritten), `fingerprint`
        (of the source interactions), `input_dir`.
    """
    from tfrec.ctr import CTRConfig

    if isinstance(experiment_config, CTRConfig):
        from tfrec.ctr import load_ctr_data

        data = load_ctr_data(experiment_config.data)
        examples = ctr_examples(data, experiment_config.model.max_history)
    else:
        from tfrec.training import prepare_split

        data, split = prepare_split(experiment_config)
        examples = pair_examples(data, split)
    out_dir = os.path.abspath(os.fspath(out_dir))
    changed = [
        name for name in SPLITS
        if _write_if_changed(os.path.join(out_dir, name, EXAMPLES_FILE), _tfrecord_bytes(examples[name]))
    ]
    summary = {
        "examples": {name: len(examples[name]) for name in SPLITS},
        "fingerprint": data.metadata["fingerprint"],
        "source": data.metadata["source"],
        "num_items": data.metadata["num_items"],
        "data_config": experiment_config.to_dict()["data"],
    }
    if isinstance(experiment_config, CTRConfig):
        summary.update(max_history=experiment_config.model.max_history,
                       click_rate={name: float(np.mean(data.splits[s].label)) for name, s in CTR_SPLITS.items()},
                       subsample=data.metadata.get("subsample"))
    metadata = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    _write_if_changed(os.path.join(out_dir, METADATA_FILE), metadata.encode())
    return {**summary, "changed": changed, "input_dir": out_dir}
