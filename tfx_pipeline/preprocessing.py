"""Transform's `preprocessing_fn`: item tokens -> tfrec item ids with a `tft` vocabulary.

One vocabulary (`item_vocab`) covers every item token of the analysed split
(`train`: histories and targets, i.e. every training item; eval/test targets
never leak into it). `tft.vocabulary` orders tokens by frequency and writes one
token per line, which is exactly tfrec's `Vocabulary` file layout, so the ids
follow tfrec's convention (`tfrec.data.vocab`):

- `tft.apply_vocabulary(..., default_value=-1)` gives line numbers `0..V-1`
  and `-1` for unknown tokens;
- adding `NUM_RESERVED` (2) gives items `2..V+1`, unknown -> `1` (OOV), and
  `0` is never produced, so padding (0) can never collide with an item.

Outputs: `history_ids` (int64, variable length, same positions as `history`)
and `target_id` (int64 scalar). The serving graphs (`tfx_pipeline.serving`,
the CTR one) map raw tokens with this same vocabulary file
(`tfrec.serving.servables.ItemLookup`: line `i` = id `i + 2`, unknown = OOV),
so clients send raw tokens.

CTR examples (`task: ctr`, they have a `label`) get the same item ids, plus
`label` (int64 0/1), `user_id` (bytes, the GAUC group), `target_timestamp` and
the feedback lists aligned with the history (`history_ratings`,
`history_labels`, `history_timestamps`) passed through; the
CTR serving graph maps tokens with this same vocabulary file (see
`tfx_pipeline.trainer`).
"""

import tensorflow as tf
import tensorflow_transform as tft

from tfrec.data.vocab import NUM_RESERVED
from tfx_pipeline.data import CTR_FEEDBACK, HISTORY, LABEL, TARGET, TARGET_TIMESTAMP, USER_ID

ITEM_VOCAB = "item_vocab"
HISTORY_IDS, TARGET_ID = "history_ids", "target_id"


def _ids(tokens, vocab):
    return tft.apply_vocabulary(tokens, vocab, default_value=-1) + NUM_RESERVED


def _scalar(feature, default):
    """A one-value-per-example SparseTensor `(B, 1)` -> dense `(B,)`."""
    return tf.squeeze(tft.sparse_tensor_to_dense_with_shape(feature, [None, 1], default_value=default), 1)


def preprocessing_fn(inputs):
    """`{history: Sparse str (B, None), target: Sparse str (B, 1)}` -> `{history_ids, target_id}`
    (+ `label`, `user_id` for CTR examples)."""
    history = inputs[HISTORY]  # SparseTensor (batch, None) of item tokens
    target = _scalar(inputs[TARGET], "")
    vocab = tft.vocabulary(tf.concat([history.values, target], axis=0), vocab_filename=ITEM_VOCAB)
    outputs = {
        HISTORY_IDS: tf.SparseTensor(history.indices, _ids(history.values, vocab), history.dense_shape),
        TARGET_ID: _ids(target, vocab),  # (batch,)
    }
    if LABEL in inputs:  # a CTR example
        outputs[LABEL] = _scalar(inputs[LABEL], tf.constant(0, tf.int64))
        outputs[USER_ID] = _scalar(inputs[USER_ID], "")
        outputs[TARGET_TIMESTAMP] = _scalar(inputs[TARGET_TIMESTAMP], tf.constant(0, tf.int64))
        outputs.update({name: inputs[name] for name in CTR_FEEDBACK})  # aligned with history_ids
    return outputs
