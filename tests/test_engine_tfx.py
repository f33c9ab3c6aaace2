"""The TFX Trainer streams its transformed TFRecords through tf.data.

- `streaming_training_dataset` gives exactly the training windows of
  `causal_training_arrays` (every (item, next item) pair once), and cloze batches;
- the pipeline is lazy: its serialized graph (which would embed any in-memory
  data as constants) has the same size for 200 and 20 000 examples, and the
  item counts come from one streaming pass equal to `np.bincount`.
"""

import numpy as np
import tensorflow as tf

from tfrec.data.pipelines import causal_training_arrays
from tfx_pipeline.preprocessing import HISTORY_IDS, TARGET_ID
from tfx_pipeline.trainer import stream_statistics, streaming_training_dataset

VOCAB = 50


def write_examples(path, n, seed=0, gzip=False):
    rng = np.random.default_rng(seed)
    sequences = []
    options = tf.io.TFRecordOptions(compression_type="GZIP" if gzip else "")
    with tf.io.TFRecordWriter(str(path), options) as writer:
        for _ in range(n):
            seq = rng.integers(2, VOCAB, size=int(rng.integers(2, 30)))
            sequences.append(seq)
            feature = {HISTORY_IDS: tf.train.Feature(int64_list=tf.train.Int64List(value=seq[:-1].tolist())),
                       TARGET_ID: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(seq[-1])]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return sequences


def rows(dataset, length):
    out = []
    for x, y in dataset:
        x, y = x["item_ids"].numpy(), y.numpy()
        pad = length - x.shape[1]
        x, y = np.pad(x, [[0, 0], [0, pad]]), np.pad(y, [[0, 0], [0, pad]])
        out += [tuple(a) + tuple(b) for a, b in zip(x.tolist(), y.tolist())]
    return sorted(out)


def test_streamed_windows_equal_the_in_memory_windows(tmp_path):
    sequences = write_examples(tmp_path / "train.tfrecord.gz", 300, gzip=True)
    length = 8  # shorter than many sequences: several windows per sequence
    streamed = rows(streaming_training_dataset([str(tmp_path / "*.gz")], length, 32, seed=1), length)
    inputs, targets = causal_training_arrays(sequences, length)
    expected = sorted(tuple(a) + tuple(b) for a, b in zip(inputs.tolist(), targets.tolist()))
    assert streamed == expected


def test_streamed_cloze_batches_mask_some_items(tmp_path):
    write_examples(tmp_path / "train.tfrecord", 100)
    ds = streaming_training_dataset([str(tmp_path / "train.tfrecord")], 10, 16, objective="cloze", mask_token_id=VOCAB,
                                    seed=3)
    for x, y in ds.take(3):
        ids, targets = x["item_ids"].numpy(), y.numpy()
        masked = ids == VOCAB
        assert masked.any(axis=1).all()  # every row has a target
        assert (targets[masked] >= 2).all() and (targets[~masked] == 0).all()


def test_stream_is_lazy_and_statistics_are_streamed(tmp_path):
    sizes = {}
    for name, n in (("a", 200), ("b", 20_000)):
        folder = tmp_path / name  # equal path lengths: the graph names the files
        folder.mkdir()
        sequences = write_examples(folder / "train.tfrecord", n, seed=n)
        ds = streaming_training_dataset([str(folder / "*")], 20, 64, seed=0)
        sizes[n] = len(ds._as_serialized_graph().numpy())
        count, counts = stream_statistics([str(folder / "*")], VOCAB)
        assert count == n
        np.testing.assert_array_equal(counts, np.bincount(np.concatenate(sequences), minlength=VOCAB))
    # 100x the examples, the same pipeline: nothing of the data is held in the graph.
    assert sizes[200] == sizes[20_000] < 100_000, sizes


def test_streamed_ctr_batches_equal_the_in_memory_ones(tmp_path):
    """Every feature the models read (ids, feedback, time gaps, target, label) is the same
    whether the TFX Trainer streams its CTR examples or reads them into memory."""
    from tfrec.data.lifelong import lifelong_dataset
    from tfrec.data.vocab import Vocabulary
    from tfx_pipeline.data import (
        HISTORY_LABELS, HISTORY_RATINGS, HISTORY_TIMESTAMPS, LABEL, TARGET_TIMESTAMP, USER_ID)
    from tfx_pipeline.trainer import lifelong_data_from_examples, read_ctr_examples, streaming_ctr_dataset

    def feature(values, kind):
        if kind == "int":
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
        if kind == "float":
            return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))

    rng = np.random.default_rng(0)
    with tf.io.TFRecordWriter(str(tmp_path / "ctr.tfrecord")) as writer:
        for i in range(120):
            n = int(rng.integers(0, 12))
            history = rng.integers(1, VOCAB, size=n)  # id 1 = OOV: dropped with its feedback
            ratings = rng.integers(0, 6, size=n)
            stamps = np.sort(rng.integers(0, 10**6, size=n))
            example = {HISTORY_IDS: feature(history, "int"), HISTORY_RATINGS: feature(ratings, "float"),
                       HISTORY_LABELS: feature(ratings >= 4, "float"), HISTORY_TIMESTAMPS: feature(stamps, "int"),
                       TARGET_ID: feature([rng.integers(2, VOCAB)], "int"), LABEL: feature([rng.integers(0, 2)], "int"),
                       TARGET_TIMESTAMP: feature([10**6 + int(rng.integers(0, 10**5))], "int"),
                       USER_ID: feature([f"u{i % 7}".encode()], "bytes")}
            writer.write(tf.train.Example(features=tf.train.Features(feature=example)).SerializeToString())
    files = [str(tmp_path / "ctr.tfrecord")]
    vocab = Vocabulary([f"i{k}" for k in range(VOCAB - 2)])
    data = lifelong_data_from_examples({"train": read_ctr_examples(files)}, vocab)
    keys = ("history_ids", "history_labels", "history_ratings", "history_gaps")

    def flat(ds):
        out = []
        for x, y in ds:
            rows = zip(*(x[k].numpy().tolist() for k in keys), x["target_id"].numpy().tolist(), y.numpy().tolist())
            for *histories, target, label in rows:
                length = sum(1 for v in histories[0] if v > 0)  # padding width may differ (trimmed batches)
                out.append(tuple(tuple(h[:length]) for h in histories) + (target, label))
        return sorted(out)

    streamed, in_memory = flat(streaming_ctr_dataset(files, 16, 8, seed=1)), flat(lifelong_dataset(data, "train", 16, 8))
    assert len(streamed) == 120 and streamed == in_memory
    assert any(gap > 0 for row in streamed for gap in row[3])  # the gaps are really compared
