"""Contrastive alignment of several views of the same items (DMESR).

`ContrastiveAligner` maps every view through a projection head, L2-normalises,
and computes a symmetric InfoNCE loss per aligned view pair with in-batch
negatives: for a pair (a, b) and the items of the batch that have both views,
item i's view a must pick out its own view b among the batch's view-b vectors
(and vice versa). This is the CLIP loss, applied per view pair:

    logits[i, j] = <z_a[i], z_b[j]> / temperature
    loss_ab = mean_i CE(logits[i, :], i),  loss_ba = mean_j CE(logits[:, j], j)
    pair loss = (loss_ab + loss_ba) / 2

The layer returns the loss; the caller scales it (DMESR's lambda) and adds it to
the task loss. Items that appear twice in a batch would be false negatives of
each other: pass each item once (`DMESRItemEncoder` aligns the unique ids of
the batch).

From the paper (as our issue describes it): symmetric InfoNCE, in-batch
negatives, projection heads, configurable temperature. Ours (options): which
view pairs are aligned (`pairs`, default every pair), the heads (`head_layers`:
0 = none, the views are compared as given, e.g. when the caller's per-view
projections already are the heads, as in CLIP; 1 = linear; 2 = SimCLR MLP),
per-view vs shared heads, learnable temperature (off by default), equal
weight for every pair that has items in the batch, and content groups: items
whose view content is identical (e.g. the 48% of Amazon Beauty items that
share their exact attribute set with more than 10 others) are not used as
negatives of each other.
"""

import itertools
import math

import keras
from keras import ops

_NEG_INF = -1e9


def info_nce(a, b, temperature, mask=None, groups_a=None, groups_b=None):
    """Symmetric InfoNCE between row-aligned vectors, in-batch negatives.

    Args:
        a: `(batch, dim)`, b: `(batch, dim)`: row i of `a` and row i of `b`
            are the positive pair; other rows are negatives. Used as given
            (normalise beforehand for cosine similarity).
        temperature: float or scalar tensor.
        mask: optional bool `(batch,)`: rows taking part (False rows are
            neither anchors nor negatives).
        groups_a, groups_b: optional int `(batch,)` content groups of the rows
            in view a / view b (equal ids = identical content, e.g. the same
            attribute set). Row j is no negative of row i (i != j) when they
            share a group in either view: identical content cannot be told
            apart, so it would be a false negative.

    Returns:
        Scalar: `(CE(a -> b) + CE(b -> a)) / 2` averaged over the valid rows;
        0 when no row is valid.

    Example:
    >>> import numpy as np
    >>> a = np.eye(2, dtype="float32"); b = np.eye(2, dtype="float32")
    >>> round(float(info_nce(a, b, 1.0)), 4)  # log(1 + e^-1)
    0.3133
    >>> float(info_nce(a, b, 1.0, groups_a=np.array([5, 5])))  # the only negative is a duplicate
    0.0
    """
    a = ops.convert_to_tensor(a)
    b = ops.cast(b, a.dtype)
    n = ops.shape(a)[0]
    if mask is None:
        mask = ops.ones((n,), dtype="bool")
    mask = ops.cast(mask, "bool")
    logits = ops.matmul(a, ops.transpose(b)) / temperature  # (batch, batch)
    pair_ok = ops.logical_and(mask[:, None], mask[None, :])
    off_diagonal = ops.logical_not(ops.eye(n, dtype="bool"))
    for groups in (groups_a, groups_b):
        if groups is not None:
            same = ops.equal(groups[:, None], groups[None, :])
            pair_ok = ops.logical_and(pair_ok, ops.logical_not(ops.logical_and(same, off_diagonal)))
    logits = ops.where(pair_ok, logits, _NEG_INF)
    diagonal = ops.diagonal(logits)  # (batch,)
    a_to_b = ops.logsumexp(logits, axis=1) - diagonal
    b_to_a = ops.logsumexp(logits, axis=0) - diagonal
    weight = ops.cast(mask, a.dtype)
    count = ops.maximum(ops.sum(weight), 1.0)
    return 0.5 * ops.sum((a_to_b + b_to_a) * weight) / count


@keras.saving.register_keras_serializable(package="tfrec")
class ContrastiveAligner(keras.layers.Layer):
    """Symmetric InfoNCE over view pairs, with projection heads.

    Args:
        num_views: int. Number of views (second axis of the input).
        projection_dim: int or None. Output size of the heads; None = input dim.
        head_layers: int. 0 = no head (views compared as given), 1 = linear
            head, 2 = `Dense(relu) -> Dense` (SimCLR). Defaults to 1.
        shared_heads: bool. One head for all views instead of one per view.
            Defaults to False.
        temperature: float. Initial (or fixed) softmax temperature. Defaults
            to 0.1.
        learnable_temperature: bool. Learn log(1 / temperature) (as CLIP).
            Defaults to False.
        pairs: list of `(i, j)` view-index pairs to align, or None for every
            pair `i < j`. Defaults to None.

    Call args:
        views: `(batch, num_views, dim)`: the views of `batch` distinct items.
        view_mask: optional bool `(batch, num_views)`: which views exist.
        groups: optional int `(batch, num_views)`: content group of each view
            (see `info_nce`); items sharing content are not negatives.

    Returns:
        Scalar loss: the mean over pairs that have at least one item with
        both views (0 if none).

    Example:
    >>> import numpy as np
    >>> aligner = ContrastiveAligner(num_views=2, temperature=0.5)
    >>> loss = aligner(np.random.rand(4, 2, 8).astype("float32"))
    >>> loss.shape
    TensorShape([])
    """

    def __init__(
        self,
        num_views,
        projection_dim=None,
        head_layers=1,
        shared_heads=False,
        temperature=0.1,
        learnable_temperature=False,
        pairs=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_views < 2:
            raise ValueError(f"ContrastiveAligner needs at least 2 views to align, got num_views={num_views}.")
        if head_layers not in (0, 1, 2):
            raise ValueError(f"head_layers must be 0 (none), 1 (linear) or 2 (MLP), got {head_layers}.")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        if projection_dim is not None and projection_dim < 1:
            raise ValueError(f"projection_dim must be positive or None, got {projection_dim}.")
        if projection_dim is not None and head_layers == 0:
            raise ValueError("projection_dim needs a head (head_layers >= 1); with head_layers=0 leave it None.")
        self.num_views = int(num_views)
        self.projection_dim = None if projection_dim is None else int(projection_dim)
        self.head_layers = int(head_layers)
        self.shared_heads = bool(shared_heads)
        self.temperature = float(temperature)
        self.learnable_temperature = bool(learnable_temperature)
        if pairs is None:
            pairs = list(itertools.combinations(range(self.num_views), 2))
        pairs = [tuple(int(v) for v in p) for p in pairs]
        for p in pairs:
            if len(p) != 2 or p[0] == p[1] or not all(0 <= v < self.num_views for v in p):
                raise ValueError(
                    f"each aligned pair must name two different views in [0, {self.num_views}), got {p}."
                )
        if not pairs:
            raise ValueError("pairs must name at least one view pair (or be None for all pairs).")
        self.pairs = pairs

    def build(self, input_shape):
        views_shape = tuple(input_shape)
        if len(views_shape) != 3 or views_shape[1] != self.num_views or views_shape[-1] is None:
            raise ValueError(
                f"ContrastiveAligner expects views of shape (batch, {self.num_views}, dim), got {views_shape}."
            )
        dim = int(views_shape[-1])
        out_dim = self.projection_dim or dim
        init = keras.initializers.TruncatedNormal(stddev=1.0 / math.sqrt(dim))
        self.heads = []
        for v in range(0 if self.head_layers == 0 else 1 if self.shared_heads else self.num_views):
            layers = []
            if self.head_layers == 2:
                layers.append(keras.layers.Dense(dim, activation="relu", kernel_initializer=init,
                                                 name=f"head_{v}_hidden"))
            layers.append(keras.layers.Dense(out_dim, kernel_initializer=init, name=f"head_{v}_out"))
            shape = (None, dim)
            for layer in layers:
                layer.build(shape)
                shape = (None, layer.units)
            self.heads.append(layers)
        self.log_inverse_temperature = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(math.log(1.0 / self.temperature)),
            trainable=self.learnable_temperature,
            name="log_inverse_temperature",
        )
        self.built = True

    def project(self, views):
        """Normalised head outputs `(batch, num_views, projection_dim)`."""
        projected = []
        for v in range(self.num_views):
            h = views[:, v, :]
            for layer in self.heads[0 if self.shared_heads else v] if self.heads else ():
                h = layer(h)
            projected.append(h)
        z = ops.stack(projected, axis=1)
        return z / ops.maximum(ops.norm(z, axis=-1, keepdims=True), 1e-12)

    def call(self, views, view_mask=None, groups=None):
        batch = ops.shape(views)[0]
        if view_mask is None:
            view_mask = ops.ones((batch, self.num_views), dtype="bool")
        view_mask = ops.cast(view_mask, "bool")
        z = self.project(views)  # (batch, num_views, projection_dim)
        # Clipped as CLIP does, so a learnable temperature cannot run away.
        temperature = 1.0 / ops.minimum(ops.exp(self.log_inverse_temperature), 100.0)
        total, active = 0.0, 0.0
        for i, j in self.pairs:
            both = ops.logical_and(view_mask[:, i], view_mask[:, j])  # (batch,)
            pair_groups = (None, None) if groups is None else (groups[:, i], groups[:, j])
            loss = info_nce(z[:, i], z[:, j], temperature, both, *pair_groups)
            has_items = ops.cast(ops.any(both), z.dtype)
            total = total + loss * has_items
            active = active + has_items
        return total / ops.maximum(active, 1.0)

    def compute_output_shape(self, input_shape):
        return ()

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_views": self.num_views,
                "projection_dim": self.projection_dim,
                "head_layers": self.head_layers,
                "shared_heads": self.shared_heads,
                "temperature": self.temperature,
                "learnable_temperature": self.learnable_temperature,
                "pairs": [list(p) for p in self.pairs],
            }
        )
        return config
