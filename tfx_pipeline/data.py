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

Example:
>>> summary = write_example_gen_input(load_config(None, ["data.dataset=movielens-100k"]), "/tmp/in")  # doctest: +SKIP
>>> summary["examples"]  # doctest: +SKIP
{'train': 943, 'eval': 943, 'test': 943}
"""

import json
import os

import numpy as np

from tfrec.data.vocab import NUM_RESERVED

USER_ID, HISTORY, TARGET, TARGET_TIMESTAMP = "user_id", "history", "target", "target_timestamp"
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
        experiment_config: a `tfrec.config.ExperimentConfig` (its `data` section is used).
        out_dir: local folder; created if needed.

    Returns:
        dict: `examples` (count per split), `changed` (splits rewritten), `fingerprint`
        (of the source interactions), `input_dir`.
    """
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
    metadata = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    _write_if_changed(os.path.join(out_dir, METADATA_FILE), metadata.encode())
    return {**summary, "changed": changed, "input_dir": out_dir}
