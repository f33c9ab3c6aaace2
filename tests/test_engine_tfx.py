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
    from tfrec.data.lifelong import lifelong_dataset
    from tfrec.data.vocab import Vocabulary
    from tfx_pipeline.data import LABEL, USER_ID
    from tfx_pipeline.trainer import lifelong_data_from_examples, read_ctr_examples, streaming_ctr_dataset

    rng = np.random.default_rng(0)
    with tf.io.TFRecordWriter(str(tmp_path / "ctr.tfrecord")) as writer:
        for i in range(120):
            history = rng.integers(1, VOCAB, size=int(rng.integers(0, 12)))  # id 1 = OOV: dropped
            feature = {HISTORY_IDS: tf.train.Feature(int64_list=tf.train.Int64List(value=history.tolist())),
                       TARGET_ID: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(rng.integers(2, VOCAB))])),
                       LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(rng.integers(0, 2))])),
                       USER_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"u{i % 7}".encode()]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    files = [str(tmp_path / "ctr.tfrecord")]
    vocab = Vocabulary([f"i{k}" for k in range(VOCAB - 2)])
    data = lifelong_data_from_examples({"train": read_ctr_examples(files)}, vocab)

    def flat(ds):
        out = []
        for x, y in ds:
            out += [tuple(h) + (t, l) for h, t, l in zip(x["history_ids"].numpy().tolist(),
                                                          x["target_id"].numpy().tolist(), y.numpy().tolist())]
        return sorted(out)

    assert flat(streaming_ctr_dataset(files, 16, 8, seed=1)) == flat(lifelong_dataset(data, "train", 16, 8))
