"""Bidirectional cross-attention between coarse item views and fine text tokens (DMESR).

`CrossAttentionFuser` integrates an item's aligned coarse semantics (a few view
vectors, e.g. the embedded MLLM descriptions, in model dim) with the
fine-grained token states of its original text, in both directions:

- **views -> tokens**: each view queries the item's tokens,
  `h_v = LN_a(x_v + MHA(q=x_v, k=s, v=s))`; the fused *view* vector is the mean
  of `h_v` over the item's present views;
- **tokens -> views**: each token queries the item's views; the fused *text*
  vector is `LN_b(mean_t(R s_t) + mean_t MHA(q=s_t, k=x, v=x))` over the
  item's real tokens (`R`: a learned token projection).

Both outputs are `(batch, model_dim)`; an item without views gets a zero view
vector, an item without tokens a zero text vector. Masked views and padded
tokens receive exactly zero attention weight; a query with no key at all
attends nothing (zero output) instead of spreading over padding.

Cost (ours, not the paper's): `DMESRItemEncoder.all_items()` runs this over the
whole catalog at every training step, so token states are never projected to
the model dimension per token. The key/value projections of the tokens are
folded into the queries (`q W_k^T` is computed once per view and compared with
the raw token states; the attention-weighted token states are projected once
per view), which is the same function as textbook multi-head attention at
`O(heads * views * tokens * token_dim)` per item instead of
`O(tokens * token_dim * model_dim)`. For the same reason the tokens -> views
direction applies its residual + LayerNorm after averaging over tokens (per
token, then averaged, would need every token in model dim). The token states
are read by exactly two batched matmuls (all logits of both directions at
once; all attention-weighted sums plus the token mean at once), and the heads
are applied by one dense matmul with a block-diagonal kernel. Key biases are
omitted: they add a constant per query, which softmax ignores. A test checks
the result against the textbook per-token computation.

From the paper (our reading): bidirectional cross-attention, residual + norm,
two fused representations. Ours: the folded computation, LayerNorm after token
pooling in the tokens -> views direction, mean pooling of views and tokens.
"""

import math

import keras
import tensorflow as tf
from keras import ops

from tfrec.layers.target_attention import masked_softmax


def _block_diagonal(kernels):
    """`(heads, n_in, n_out)` per-head matrices -> one `(heads * n_in, heads * n_out)` matrix, so
    every head is applied by a single dense matmul on head-major rows."""
    heads = ops.shape(kernels)[0]
    eye = ops.eye(heads, dtype=kernels.dtype)
    blocks = ops.einsum("hg,hij->higj", eye, kernels)
    return ops.reshape(blocks, (heads * ops.shape(kernels)[1], heads * ops.shape(kernels)[2]))


def masked_mean(x, mask, axis):
    """Mean of `x` over `axis` where `mask` (broadcast on trailing axes); 0 if empty."""
    weight = ops.cast(mask, x.dtype)
    while len(weight.shape) < len(x.shape):
        weight = ops.expand_dims(weight, -1)
    count = ops.maximum(ops.sum(weight, axis=axis), 1.0)
    return ops.sum(x * weight, axis=axis) / count


@keras.saving.register_keras_serializable(package="tfrec")
class CrossAttentionFuser(keras.layers.Layer):
    """Views attend to text tokens and tokens attend to views; residual + LayerNorm.

    Args:
        num_heads: int. Attention heads in each direction. Defaults to 2.
        key_dim: int or None. Size of each head; None = model_dim // num_heads.
        dropout: float. Dropout on attention weights and on the attention
            outputs before the residual sum. Defaults to 0.0.
        layer_norm_epsilon: float. Defaults to 1e-6.

    Call args:
        inputs: dict with
            `"views"`: `(batch, num_views, model_dim)` coarse view vectors;
            `"view_mask"`: bool `(batch, num_views)`;
            `"tokens"`: `(batch, num_tokens, token_dim)` text token states;
            `"token_mask"`: bool `(batch, num_tokens)`.
        training: bool.
        return_attention: bool. Also return the attention weights.

    Returns:
        dict `{"views": (batch, model_dim), "text": (batch, model_dim)}`, plus
        `"view_attention"` `(batch, heads, num_views, num_tokens)` and
        `"token_attention"` `(batch, heads, num_tokens, num_views)` when
        `return_attention=True`.

    Example:
    >>> import numpy as np
    >>> fuser = CrossAttentionFuser(num_heads=2)
    >>> out = fuser({"views": np.ones((3, 2, 8), "float32"), "view_mask": np.ones((3, 2), bool),
    ...              "tokens": np.ones((3, 5, 6), "float32"), "token_mask": np.ones((3, 5), bool)})
    >>> out["views"].shape, out["text"].shape
    (TensorShape([3, 8]), TensorShape([3, 8]))
    """

    def __init__(self, num_heads=2, key_dim=None, dropout=0.0, layer_norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        if num_heads < 1:
            raise ValueError(f"num_heads must be positive, got {num_heads}.")
        if key_dim is not None and key_dim < 1:
            raise ValueError(f"key_dim must be positive or None, got {key_dim}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.num_heads = int(num_heads)
        self.key_dim = None if key_dim is None else int(key_dim)
        self.dropout = float(dropout)
        self.layer_norm_epsilon = float(layer_norm_epsilon)

    def build(self, input_shape):
        if not isinstance(input_shape, dict) or not {"views", "tokens"} <= set(input_shape):
            raise ValueError(
                "CrossAttentionFuser expects a dict with 'views', 'view_mask', 'tokens', 'token_mask'; "
                f"got {input_shape}."
            )
        views, tokens = input_shape["views"], input_shape["tokens"]
        if len(views) != 3 or len(tokens) != 3 or views[-1] is None or tokens[-1] is None:
            raise ValueError(
                "CrossAttentionFuser: views must be (batch, num_views, model_dim) and tokens "
                f"(batch, num_tokens, token_dim) with known last dims, got {views} and {tokens}."
            )
        self.model_dim, self.token_dim = int(views[-1]), int(tokens[-1])
        if self.key_dim is None and self.model_dim % self.num_heads:
            raise ValueError(
                f"model_dim {self.model_dim} must be divisible by num_heads={self.num_heads} "
                "(or set key_dim)."
            )
        h, k = self.num_heads, self.key_dim or self.model_dim // self.num_heads
        dm, dt = self.model_dim, self.token_dim

        def kernel(name, shape, fan_in):
            return self.add_weight(
                shape=shape, name=name,
                initializer=keras.initializers.TruncatedNormal(stddev=1.0 / math.sqrt(fan_in)),
            )

        def bias(name, shape):
            return self.add_weight(shape=shape, initializer="zeros", name=name)

        # views -> tokens
        self.view_query_kernel = kernel("view_query_kernel", (dm, h, k), dm)
        self.view_query_bias = bias("view_query_bias", (h, k))
        self.token_key_kernel = kernel("token_key_kernel", (dt, h, k), dt)
        self.token_value_kernel = kernel("token_value_kernel", (dt, h, k), dt)
        self.token_value_bias = bias("token_value_bias", (h, k))
        self.view_output_kernel = kernel("view_output_kernel", (h, k, dm), h * k)
        self.view_output_bias = bias("view_output_bias", (dm,))
        # tokens -> views
        self.token_query_kernel = kernel("token_query_kernel", (dt, h, k), dt)
        self.token_query_bias = bias("token_query_bias", (h, k))
        self.view_key_kernel = kernel("view_key_kernel", (dm, h, k), dm)
        self.view_value_kernel = kernel("view_value_kernel", (dm, h, k), dm)
        self.view_value_bias = bias("view_value_bias", (h, k))
        self.text_output_kernel = kernel("text_output_kernel", (h, k, dm), h * k)
        self.text_output_bias = bias("text_output_bias", (dm,))
        self.token_projection_kernel = kernel("token_projection_kernel", (dt, dm), dt)
        self.token_projection_bias = bias("token_projection_bias", (dm,))

        self.view_norm = keras.layers.LayerNormalization(epsilon=self.layer_norm_epsilon, name="view_norm")
        self.view_norm.build((None, None, dm))
        self.text_norm = keras.layers.LayerNormalization(epsilon=self.layer_norm_epsilon, name="text_norm")
        self.text_norm.build((None, dm))
        self.attention_dropout = keras.layers.Dropout(self.dropout)
        self.output_dropout = keras.layers.Dropout(self.dropout)
        self._heads, self._key_dim = h, k
        self._scale = 1.0 / math.sqrt(k)
        self.built = True

    def call(self, inputs, training=False, return_attention=False):
        x = inputs["views"]  # (b, v, dm)
        s = ops.cast(inputs["tokens"], x.dtype)  # (b, t, e)
        view_mask = ops.cast(inputs["view_mask"], "bool")  # (b, v)
        token_mask = ops.cast(inputs["token_mask"], "bool")  # (b, t)
        batch, num_views = ops.shape(x)[0], ops.shape(x)[1]
        h, k, dm, e = self._heads, self._key_dim, self.model_dim, self.token_dim
        rows = num_views * h  # one row per (view, head)
        has_views = ops.cast(ops.any(view_mask, axis=1), x.dtype)[:, None]  # (b, 1)
        has_tokens = ops.cast(ops.any(token_mask, axis=1), x.dtype)[:, None]  # (b, 1)
        flat_views = ops.reshape(x, (-1, dm))  # (b * v, dm)

        # Vectors in token space whose dot product with a token gives an attention logit:
        # views -> tokens: (x Wq + bq) Wk^T;  tokens -> views: Wq (x Wk) (+ bq . x Wk).
        view_queries = ops.matmul(flat_views, ops.reshape(self.view_query_kernel, (dm, h * k)))
        view_queries = view_queries + ops.reshape(self.view_query_bias, (h * k,))  # (b*v, h*k)
        view_probes = ops.matmul(view_queries, _block_diagonal(ops.transpose(self.token_key_kernel, (1, 2, 0))))
        view_keys = ops.matmul(flat_views, ops.reshape(self.view_key_kernel, (dm, h * k)))  # (b*v, h*k)
        key_probes = ops.matmul(view_keys, _block_diagonal(ops.transpose(self.token_query_kernel, (1, 2, 0))))
        key_bias = ops.sum(ops.reshape(view_keys, (batch, num_views, h, k)) * self.token_query_bias, axis=-1)
        probes = ops.concatenate(
            [ops.reshape(view_probes, (batch, rows, e)), ops.reshape(key_probes, (batch, rows, e))], axis=1
        )  # (b, 2 * v * h, e)
        # The only two passes over the token states: all logits at once, then all weighted sums.
        scores = tf.matmul(probes, s, transpose_b=True) * self._scale  # (b, 2 * v * h, t)
        view_scores = ops.reshape(scores[:, :rows], (batch, num_views, h, -1))  # (b, v, h, t)
        token_scores = ops.reshape(scores[:, rows:], (batch, num_views, h, -1))
        token_scores = token_scores + key_bias[..., None] * self._scale

        view_attention = masked_softmax(view_scores, token_mask[:, None, None, :])  # (b, v, h, t)
        token_attention = masked_softmax(  # over the views: (b, h, t, v)
            ops.transpose(token_scores, (0, 2, 3, 1)), view_mask[:, None, None, :]
        )
        token_weight = ops.cast(token_mask, x.dtype)
        token_weight = token_weight / ops.maximum(ops.sum(token_weight, axis=1, keepdims=True), 1.0)  # (b, t)
        weights = ops.concatenate(
            [ops.reshape(self.attention_dropout(view_attention, training=training), (batch, rows, -1)),
             token_weight[:, None, :]], axis=1,
        )  # (b, v * h + 1, t): attention rows + the token mean
        summed = ops.matmul(weights, s)  # (b, v * h + 1, e)
        mean_token = summed[:, -1]  # (b, e)

        # --- views -> tokens: output = (a s) Wv Wo, residual + LayerNorm per view.
        attended = ops.reshape(summed[:, :rows], (-1, h * e))  # (b*v, h*e)
        values = ops.matmul(attended, _block_diagonal(ops.transpose(self.token_value_kernel, (1, 0, 2))))
        values = ops.reshape(values, (batch, num_views, h * k))
        values = values + ops.reshape(self.token_value_bias, (h * k,)) * has_tokens[:, :, None]
        view_update = ops.matmul(values, ops.reshape(self.view_output_kernel, (h * k, dm)))
        view_update = view_update + self.view_output_bias * has_tokens[:, :, None]  # (b, v, dm)
        fused_views = self.view_norm(x + self.output_dropout(view_update, training=training))
        fused_views = masked_mean(fused_views, view_mask, axis=1)  # (b, dm)

        # --- tokens -> views: mean over real tokens of a (x Wv Wo); residual + LayerNorm after pooling.
        mean_attention = ops.sum(
            self.attention_dropout(token_attention, training=training) * token_weight[:, None, :, None], axis=2
        )  # (b, h, v)
        view_values = ops.matmul(flat_views, ops.reshape(self.view_value_kernel, (dm, h * k)))
        view_values = view_values + ops.reshape(self.view_value_bias, (h * k,))  # (b*v, h*k)
        messages = ops.matmul(view_values, _block_diagonal(self.text_output_kernel))  # (b*v, h*dm)
        messages = ops.reshape(messages, (batch, rows, dm))  # (b, v * h, dm)
        mixing = ops.reshape(ops.transpose(mean_attention, (0, 2, 1)), (batch, 1, rows))
        text_update = ops.matmul(mixing, messages)[:, 0]  # (b, dm)
        text_update = text_update + self.text_output_bias * has_views * has_tokens
        text_base = ops.matmul(mean_token, self.token_projection_kernel) + self.token_projection_bias
        fused_text = self.text_norm(text_base + self.output_dropout(text_update, training=training))
        fused_text = fused_text * has_tokens

        outputs = {"views": fused_views, "text": fused_text}
        if return_attention:
            outputs["view_attention"] = ops.transpose(view_attention, (0, 2, 1, 3))  # (b, h, v, t)
            outputs["token_attention"] = token_attention  # (b, h, t, v)
        return outputs

    def compute_output_shape(self, input_shape):
        batch, dm = input_shape["views"][0], input_shape["views"][-1]
        return {"views": (batch, dm), "text": (batch, dm)}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "dropout": self.dropout,
                "layer_norm_epsilon": self.layer_norm_epsilon,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="tfrec")
class CoAttentionFuser(keras.layers.Layer):
    """Cheap bidirectional cross-attention between a few views and a few tokens per item.

    The catalogue-scale fuser of `DMESRItemEncoder` (`dmesr.encoder="fast"`),
    run over every item at every training step. One low-rank affinity per head
    between every view and every token of an item is read in both directions
    (co-attention: Lu et al. 2016 share one affinity between the two
    directions), the values are the views and the tokens themselves, and one
    projection `R` maps token space to model space, so the fuser costs two
    small affinity matmuls, one batched `(views x tokens)` matmul and one
    `(batch, e) x (e, model_dim)` matmul:

    - affinity `a[h, v, t] = <x_v Wq_h, s_t Wk_h> / sqrt(key_dim)`;
    - **views -> tokens**: `alpha = softmax_t a`; the attended token
      `s_att = sum_t w_t s_t` with `w_t` = `alpha` averaged over heads and
      present views; fused *view* vector `mean_v x_v + s_att R`
      (residual on the views);
    - **tokens -> views**: `beta = softmax_v a`; the attended view
      `x_att = sum_v c_v x_v` with `c_v` = `beta` averaged over heads and real
      tokens; fused *text* vector `mean_t(s_t) R + x_att + b` (residual on the
      tokens).

    The output is the sum of the two fused vectors,
    `sum_v (1/n_v + c_v) x_v + (sum_t (1/n_t + w_t) s_t) R + b` (both halves
    with `return_parts=True`). Masked views and padded tokens get exactly zero
    weight; an item without tokens gets `mean_v x_v`, an item without views
    `mean_t(s_t) R + b`, an item with neither zero.

    Against `CrossAttentionFuser` (the full encoder's; ours, for cost): the
    heads share the value/output maps, the values are the views and the tokens
    themselves (one token projection `R` for the residual and the attended
    token), no LayerNorm (the encoder normalises the semantic part once).

    Args:
        num_heads: int. Affinity heads. Defaults to 1.
        key_dim: int. Rank of each head's affinity. Defaults to 16.

    Call args:
        inputs: dict with `"views"` `(batch, num_views, model_dim)`,
            `"view_mask"` bool `(batch, num_views)`, `"tokens"`
            `(batch, num_tokens, token_dim)`, `"token_mask"` bool
            `(batch, num_tokens)`.
        return_parts: bool. Return `{"views", "text"}` (the two fused vectors)
            instead of their sum.

    Returns:
        `(batch, model_dim)`, or the dict of both parts.

    Example:
    >>> import numpy as np
    >>> fuser = CoAttentionFuser(num_heads=2, key_dim=4)
    >>> inputs = {"views": np.ones((3, 2, 8), "float32"), "view_mask": np.ones((3, 2), bool),
    ...           "tokens": np.ones((3, 5, 6), "float32"), "token_mask": np.ones((3, 5), bool)}
    >>> fuser(inputs).shape
    TensorShape([3, 8])
    >>> sorted(fuser(inputs, return_parts=True))
    ['text', 'views']
    """

    def __init__(self, num_heads=1, key_dim=16, **kwargs):
        super().__init__(**kwargs)
        if num_heads < 1:
            raise ValueError(f"num_heads must be positive, got {num_heads}.")
        if key_dim < 1:
            raise ValueError(f"key_dim must be positive, got {key_dim}.")
        self.num_heads, self.key_dim = int(num_heads), int(key_dim)

    def build(self, input_shape):
        if not isinstance(input_shape, dict) or not {"views", "tokens"} <= set(input_shape):
            raise ValueError("CoAttentionFuser expects a dict with 'views', 'view_mask', 'tokens', 'token_mask'; "
                             f"got {input_shape}.")
        views, tokens = input_shape["views"], input_shape["tokens"]
        if len(views) != 3 or len(tokens) != 3 or views[-1] is None or tokens[-1] is None:
            raise ValueError("CoAttentionFuser: views must be (batch, num_views, model_dim) and tokens "
                             f"(batch, num_tokens, token_dim) with known last dims, got {views} and {tokens}.")
        dm, e, h, r = int(views[-1]), int(tokens[-1]), self.num_heads, self.key_dim
        self.model_dim, self.token_dim = dm, e

        def kernel(name, shape, fan_in):
            return self.add_weight(shape=shape, name=name,
                                   initializer=keras.initializers.TruncatedNormal(stddev=1.0 / math.sqrt(fan_in)))

        self.query_kernel = kernel("query_kernel", (dm, h * r), dm)  # views -> affinity space
        self.key_kernel = kernel("key_kernel", (e, h * r), e)  # tokens -> affinity space
        self.token_projection_kernel = kernel("token_projection_kernel", (e, dm), e)  # R
        self.token_projection_bias = self.add_weight(shape=(dm,), initializer="zeros", name="token_projection_bias")
        self.built = True

    def call(self, inputs, return_parts=False):
        x = inputs["views"]  # (b, v, dm)
        s = ops.cast(inputs["tokens"], x.dtype)  # (b, t, e)
        view_mask = ops.cast(inputs["view_mask"], x.dtype)  # (b, v)
        token_mask = ops.cast(inputs["token_mask"], x.dtype)  # (b, t)
        num_views, num_tokens = ops.shape(x)[1], ops.shape(s)[1]
        h, r, dm, e = self.num_heads, self.key_dim, self.model_dim, self.token_dim
        queries = ops.reshape(ops.matmul(ops.reshape(x, (-1, dm)), self.query_kernel), (-1, num_views, h, r))
        keys = ops.reshape(ops.matmul(ops.reshape(s, (-1, e)), self.key_kernel), (-1, num_tokens, h, r))
        if h > 1:  # (b, h, ., r): heads as a batch axis
            queries, keys = ops.transpose(queries, (0, 2, 1, 3)), ops.transpose(keys, (0, 2, 1, 3))
        else:
            queries, keys = queries[:, None, :, 0], keys[:, None, :, 0]
        affinity = tf.matmul(queries, keys, transpose_b=True) * (1.0 / math.sqrt(r))  # (b, h, v, t)
        pair = view_mask[:, None, :, None] * token_mask[:, None, None, :]  # (b, 1, v, t)
        affinity = ops.where(pair > 0, affinity, -1e9)
        # Both directions read the one affinity; masked entries weigh exactly zero.
        alpha = ops.softmax(affinity, axis=3) * pair  # views -> tokens, over t
        # tokens -> views, over v (a single view gets weight 1: no softmax over one entry)
        beta = ops.ones_like(affinity) * pair if x.shape[1] == 1 else ops.softmax(affinity, axis=2) * pair
        views_count = ops.maximum(ops.sum(view_mask, axis=1, keepdims=True), 1.0)  # (b, 1)
        tokens_count = ops.maximum(ops.sum(token_mask, axis=1, keepdims=True), 1.0)
        token_attention = ops.sum(alpha, axis=(1, 2)) / (h * views_count)  # w: (b, t)
        view_attention = ops.sum(beta, axis=(1, 3)) / (h * tokens_count)  # c: (b, v)
        has_tokens = ops.cast(ops.sum(token_mask, axis=1, keepdims=True) > 0, x.dtype)  # (b, 1)
        if return_parts:
            attended = ops.sum(token_attention[..., None] * s, axis=1)  # (b, e)
            token_mean = ops.sum((token_mask / tokens_count)[..., None] * s, axis=1)
            views = ops.sum((view_mask / views_count)[..., None] * x, axis=1) + ops.matmul(
                attended, self.token_projection_kernel)
            text = (ops.matmul(token_mean, self.token_projection_kernel) + self.token_projection_bias * has_tokens
                    + ops.sum(view_attention[..., None] * x, axis=1))
            return {"views": views, "text": text}
        # The sum of both, one pass over the views and one over the tokens (then one projection).
        view_weight = view_mask / views_count + view_attention  # (b, v)
        token_weight = token_mask / tokens_count + token_attention  # (b, t)
        tokens = tf.matmul(token_weight[:, None, :], s)[:, 0]  # (b, e)
        views = tf.matmul(view_weight[:, None, :], x)[:, 0]  # (b, dm)
        return views + ops.matmul(tokens, self.token_projection_kernel) + self.token_projection_bias * has_tokens

    def compute_output_shape(self, input_shape):
        return (input_shape["views"][0], input_shape["views"][-1])

    def get_config(self):
        config = super().get_config()
        config.update({"num_heads": self.num_heads, "key_dim": self.key_dim})
        return config
