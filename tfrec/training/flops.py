"""Model FLOPs of a next-item training epoch (an analytic count, for throughput figures).

`epoch_flops` counts the multiply-adds (2 FLOPs each) an epoch's training steps
need, forward and backward (backward = 2 x forward), over the positions that
carry data: padding added by batching is not counted, so `flops / seconds` is
the useful throughput (as "model FLOPs utilisation" figures count it), not the
hardware's. Counted: the item-catalogue softmax at every target, the Transformer
blocks' projections, attention and feed-forward network at every input item (or
the GRU's gates and the output projection); element-wise work (norms, dropout,
activations, the embedding lookup) is left out: it is a few percent at these sizes.
A composite item encoder's own work (DMESR's catalogue pass) is not counted either:
the figure is the ID model's, so an encoder's overhead shows as lower throughput.

Shapes per epoch:

- `positions` scheme (causal): every window of `max_length + 1` items gives
  `n - 1` inputs and `n - 1` targets, each input attending to the inputs before it;
- `prefixes` scheme: one row per target, its `min(t, max_length)` inputs
  attending to each other (a causal pass over the whole prefix);
- cloze (BERT4Rec): every window of `max_length` items, all inputs attending to
  all, targets = `mask_prob` of the items (the expected count).

Example:
>>> import numpy as np
>>> from tfrec.config import ModelConfig
>>> config = ModelConfig(backbone="sasrec", embedding_dim=64, max_length=50, num_layers=2)
>>> sequences = [np.arange(2, 12)] * 100  # 100 users with 10 items each
>>> flops = epoch_flops(config, sequences, vocab_size=12_000, scheme="positions")
>>> round(flops["softmax"] / 1e9, 2), round(flops["backbone"] / 1e9, 3)
(4.15, 0.538)
"""

import numpy as np

from tfrec.data.pipelines import causal_training_arrays

TRAIN_FACTOR = 3  # forward + backward (gradients of inputs and weights)


def _transformer_token_flops(dim, ffn_dim, num_layers, attended):
    """Forward FLOPs of one token through `num_layers` blocks attending to `attended` tokens."""
    projections = 4 * 2 * dim * dim  # query, key, value, output
    attention = 2 * 2 * attended * dim  # scores and the weighted sum
    ffn = 2 * 2 * dim * ffn_dim
    return num_layers * (projections + attention + ffn)


def _gru_token_flops(dim, hidden, num_layers):
    flops, in_dim = 0, dim
    for _ in range(num_layers):
        flops += 3 * 2 * (in_dim + hidden) * hidden  # update, reset and candidate gates
        in_dim = hidden
    return flops + 2 * hidden * dim  # projection back to the item-vector size


def epoch_flops(model_config, train_sequences, vocab_size, scheme="positions", output_dim=None):
    """`{"softmax", "backbone", "total"}` training FLOPs of one epoch (see the module doc).

    Args:
        model_config: `tfrec.config.ModelConfig`.
        train_sequences: list of 1-D item-id arrays (the training part of every user).
        vocab_size: int, rows of the item table (the softmax covers all but the 2 reserved).
        scheme: `"positions"` or `"prefixes"` (causal backbones; ignored for BERT4Rec).
        output_dim: item-vector size (default `model_config.embedding_dim`).
    """
    mc = model_config
    dim = int(output_dim or mc.embedding_dim)
    lengths = np.array([len(s) for s in train_sequences], np.int64)
    if mc.backbone == "bert4rec":
        windows = np.minimum(lengths[lengths >= 1], mc.max_length)
        tokens = windows.astype(np.float64)  # every item is an input
        attended = windows.astype(np.float64)  # bidirectional: each attends to its whole window
        targets = float(mc.mask_prob * windows.sum())
    elif scheme == "prefixes":
        prefixes = np.concatenate([np.minimum(np.arange(1, n), mc.max_length) for n in lengths if n >= 2] or [[]])
        tokens = prefixes.astype(np.float64)  # each prefix is a row of that many inputs
        attended = (prefixes + 1) / 2.0  # causal: on average half the row
        targets = float(len(prefixes))
    else:
        inputs, _ = causal_training_arrays(train_sequences, mc.max_length)
        n = (inputs > 0).sum(axis=1).astype(np.float64)
        tokens, attended, targets = n, (n + 1) / 2.0, float(n.sum())
    if mc.backbone == "gru4rec":
        backbone = tokens.sum() * _gru_token_flops(dim, mc.gru_hidden_dim, mc.num_layers)
    else:
        ffn = mc.ffn_dim or 4 * dim
        per_row = [_transformer_token_flops(dim, ffn, mc.num_layers, a) for a in attended]
        backbone = float(np.dot(tokens, per_row)) if len(tokens) else 0.0
    softmax = targets * 2 * dim * (vocab_size - 2)
    return {"softmax": TRAIN_FACTOR * softmax, "backbone": TRAIN_FACTOR * backbone,
            "total": TRAIN_FACTOR * (softmax + backbone)}
