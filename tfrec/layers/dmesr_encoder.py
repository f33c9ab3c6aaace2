"""DMESR item encoder: ID embedding + aligned, fused item semantics, exact and cheap.

`DMESRItemEncoder` is a drop-in item encoder (same contract as
`IdItemEncoder`: `encoder(item_ids) -> (..., dim)`, `encoder.all_items() ->
(vocab_size, dim)`, `vocab_size`, `output_dim`), so SASRec, BERT4Rec and GRU4Rec
use it through `NextItemRecommender` without any change. Every option comes
from one `tfrec.config.DMESRConfig` (`config=`); the "paper / ours" table of
every option is in `tfrec.semantics.dmesr`.

Inputs are **frozen content features**, computed once offline into the
semantic store and reduced by `tfrec.semantics.dmesr.build_dmesr_item_encoder`
(`features=`, numpy arrays, row i = item id i):

- `coarse (V, C, d)`: pooled sentence vectors of the coarse views, e.g. the
  generated text view and the original title (MiniLM, PCA-reduced);
- `tokens (V, K, e)`: the fine-grained states of the original text (MiniLM
  token states of the title, reduced offline to K token clusters per item);
- `attributes (V, A)`: attribute ids (0 = none) -> a learned attribute view;
- `groups (V, C + 1)`: content groups (equal = identical content) per coarse
  view, used to drop false negatives from the alignment;
- `id_init (V, id_dim)`: optional initial ID table (content PCA).

Two implementations (`DMESRConfig.encoder`): `"fast"` (default) computes the
catalogue pass in a few matmuls (frozen inputs normalised once at build time,
`CoAttentionFuser`, sparse attribute pooling, the fused vectors summed); `"full"`
is the Phase A encoder (`CrossAttentionFuser`, per-step normalisation of
every view, a projection of `[fused views; fused text]`). Both keep the
structure below.

Trainable parts, per item: **adapters** (one per coarse view: the frozen
vector plus a near-zero-initialised linear correction when its width is the
model dim, else a linear map), each adapted view RMS-normalised; the
**alignment** (`ContrastiveAligner`, InfoNCE between the anchor view - by
default the generated text view - and every other coarse view, content
duplicates excluded as negatives), added with `add_loss`; the **fuser**
(`CrossAttentionFuser`, bidirectional cross-attention between the aligned
coarse views and the original-text token clusters -> a fused view vector and a
fused text vector; the title's own pooled vector is aligned but not fused with
its own tokens unless `fuse_token_view_pooled`); the **combination** with the
ID embedding: the semantic vectors are projected to one semantic part,
RMS-normalised and scaled by a learned gain that starts at the ID
initialiser's std, so at initialisation both parts have the same scale
(`combine`: `"add"` `e + s`, `"gate"` `e + g * s`, `"concat"` `W[e; s]`,
`"dual_view"` `[e ; s]` with halves of `dim / 2`).

Degradation: with no token states (e.g. Amazon Sports/Toys, which have only
the generated text view) the fuser is off and the coarse views are averaged;
with one coarse view only, alignment is off. `active_parts()` says which parts
run. An item with no semantics at all gets its ID embedding exactly.

**Exact gradients, one computation**: in a training call the semantic path of
the *whole catalogue* is computed once (it is small: adapters and a fuser over
a few token clusters per item), the batch's rows are gathered from it, and the
same table is returned by the `all_items()` call of the same step (the
softmax). So every catalogue row's trainable parameters get their exact
gradient at every step - no stale cache. Outside training, `call()` encodes
only the distinct ids it is given and `all_items()` the whole catalogue;
`materialize()` gives the serving table (equal to the training path without
dropout); `encode_features()` encodes items given by their frozen feature rows
(new items, ID part zero). Cost: see `tfrec.semantics.dmesr` (measured).
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfrec.config import DMESRConfig
from tfrec.data.vocab import NUM_RESERVED
from tfrec.layers.contrastive import ContrastiveAligner
from tfrec.layers.cross_attention_fusion import CoAttentionFuser, CrossAttentionFuser, masked_mean
from tfrec.layers.item_encoder import IdItemEncoder

COMBINES = ("add", "concat", "gate", "dual_view")
ENCODERS = ("fast", "full")
FAST_KEY_DIM = 16  # the fast fuser's affinity rank per head when dmesr.fusion_key_dim is None
ATTRIBUTE_VIEW = "attributes"
ID_INIT_STD = 0.02  # the ID table's TruncatedNormal(0.02) initialiser (as IdItemEncoder)
_FEATURES = ("coarse", "coarse_mask", "tokens", "token_mask", "attributes", "groups", "id_init")
_ROW_FEATURES = ("coarse", "coarse_mask", "tokens", "token_mask", "token_mean", "attributes")
# Fitted offline reductions kept with the encoder: name -> dtype. view_mean (C, D), view_components
# (C, D, d): PCA of each coarse view; token_mean (D_tok,), token_components (D_tok, e): PCA of the token
# clusters; attribute_ids (n,): the raw attribute ids in the order of the compact ids 1..n.
REDUCTIONS = {"view_mean": "float32", "view_components": "float32", "token_mean": "float32",
              "token_components": "float32", "attribute_ids": "int32"}


def _rms_normalize_np(x, mask, epsilon=1e-6):
    """numpy `rms_normalize` over the last axis, rows outside `mask` zeroed."""
    x = np.asarray(x, np.float32)
    return (x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + epsilon)) * np.asarray(mask, bool)[..., None]


def rms_normalize(x, epsilon=1e-6):
    """`x / sqrt(mean(x^2) + eps)` over the last axis (a zero row stays zero).

    Example:
    >>> import numpy as np
    >>> [round(float(v), 3) for v in rms_normalize(np.array([[3.0, -3.0]], "float32"))[0]]
    [1.0, -1.0]
    """
    x = ops.convert_to_tensor(x)
    return x * ops.rsqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + epsilon)


def _as_config(config):
    if config is None:
        return DMESRConfig()
    if isinstance(config, DMESRConfig):
        return config
    fields = {f.name for f in dataclasses.fields(DMESRConfig)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"unknown DMESR option(s) {unknown}; known: {sorted(fields)}")
    return DMESRConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


@keras.saving.register_keras_serializable(package="tfrec")
class DMESRItemEncoder(keras.layers.Layer):
    """Item vectors from an ID embedding plus aligned and fused frozen content features.

    Feature arrays are stored as non-trainable weights (so `keras.saving` keeps
    them); `get_config` records their shapes (`shapes`) and the options.

    Args:
        vocab_size: int. Number of ids (incl. padding 0 and OOV 1).
        embedding_dim: int. Output dimension (the backbone's model dim).
        config: `DMESRConfig` (or its dict). The layer reads the model options
            (alignment, fusion, combination, dropout, adapter init); the
            offline ones (views, PCA, clusters) were applied by the builder.
        features: dict of numpy arrays (see the module docstring), or None
            when restoring (`shapes` then gives the shapes).
        view_names: names of the coarse views, in order.
        shapes: dict of feature shapes; inferred from `features`.
        embeddings_initializer, embeddings_regularizer: for the ID table
            (used when `features` has no `id_init`).

    Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> features = {"coarse": rng.normal(size=(10, 2, 8)), "tokens": rng.normal(size=(10, 3, 6)),
    ...             "attributes": rng.integers(0, 4, (10, 2))}
    >>> enc = DMESRItemEncoder(10, 8, features=features, view_names=("title", "generated"))
    >>> enc(np.array([[2, 3, 0]])).shape
    TensorShape([1, 3, 8])
    >>> enc.all_items().shape
    TensorShape([10, 8])
    >>> sorted(enc.active_parts())
    ['alignment', 'attributes', 'fusion', 'generated', 'id', 'text_tokens', 'title']
    """

    def __init__(self, vocab_size, embedding_dim, config=None, features=None, view_names=(), shapes=None,
                 embeddings_initializer=None, embeddings_regularizer=None, reductions=None, reduction_shapes=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.config = cfg = _as_config(config)
        if cfg.encoder not in ENCODERS:
            raise ValueError(f"dmesr.encoder must be one of {ENCODERS}, got {cfg.encoder!r}.")
        if cfg.encoder == "fast" and cfg.fusion_dropout:
            raise ValueError("dmesr.fusion_dropout applies to encoder='full' only (the fast fuser has none).")
        if cfg.combine not in COMBINES:
            raise ValueError(f"dmesr.combine must be one of {COMBINES}, got {cfg.combine!r}.")
        if cfg.combine == "dual_view" and embedding_dim % 2:
            raise ValueError(f"combine='dual_view' needs an even embedding_dim, got {embedding_dim}.")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"dmesr.dropout must be in [0, 1), got {cfg.dropout}.")
        if cfg.alignment_weight < 0:
            raise ValueError(f"dmesr.alignment_weight must be >= 0, got {cfg.alignment_weight}.")
        self.vocab_size, self.embedding_dim = int(vocab_size), int(embedding_dim)
        V, dim = self.vocab_size, self.embedding_dim
        features = {k: v for k, v in dict(features or {}).items() if v is not None}
        unknown = sorted(set(features) - set(_FEATURES))
        if unknown:
            raise ValueError(f"unknown DMESR feature(s) {unknown}; known: {list(_FEATURES)}")
        tables = self._check_features(features, V)
        if shapes is None:
            shapes = {k: list(v.shape[1:]) for k, v in tables.items() if k in ("coarse", "tokens", "attributes")}
            if "attributes" in tables:
                shapes["num_attributes"] = max(int(tables["attributes"].max(initial=0)), 1)
        self.shapes = {k: (int(v) if k == "num_attributes" else [int(x) for x in v]) for k, v in shapes.items()}
        self.view_names = tuple(str(n) for n in view_names)
        num_coarse = self.shapes["coarse"][0] if "coarse" in self.shapes else 0
        if len(self.view_names) != num_coarse:
            raise ValueError(f"view_names {list(self.view_names)} must name each of the {num_coarse} coarse views.")
        if "tokens" in tables and not cfg.use_tokens:
            raise ValueError("token features were given but dmesr.use_tokens is false.")
        self.has_tokens = "tokens" in self.shapes
        self.has_attributes = "attributes" in self.shapes
        self.num_coarse = num_coarse
        self.total_views = num_coarse + int(self.has_attributes)
        self.has_id_init = "id_init" in tables

        if "groups" not in tables and ("coarse" in tables or "attributes" in tables):
            mask = tables.get("coarse_mask")
            mask = None if mask is None else np.asarray(mask, bool)
            tables["groups"] = content_groups(tables.get("coarse"), mask, tables.get("attributes"))
        self.fast = cfg.encoder == "fast"
        self._initial_tables = self._row_features(tables)
        # The offline reductions fitted at build time (PCA of the views and tokens, the attribute id
        # map), kept as frozen weights so new items can be reduced the same way after loading
        # (`tfrec.semantics.dmesr.reduce_new_items`).
        reductions = {k: np.asarray(v) for k, v in dict(reductions or {}).items() if v is not None}
        unknown = sorted(set(reductions) - set(REDUCTIONS))
        if unknown:
            raise ValueError(f"unknown DMESR reduction(s) {unknown}; known: {list(REDUCTIONS)}")
        if reduction_shapes is None:
            reduction_shapes = {k: list(v.shape) for k, v in reductions.items()}
        self.reduction_shapes = {k: [int(x) for x in v] for k, v in reduction_shapes.items()}
        self._initial_reductions = {f"reduction_{k}": v.astype(REDUCTIONS[k]) for k, v in reductions.items()}

        # Which coarse views the fuser reads: not the token view's own pooled vector (redundant with its tokens).
        fused = [i for i, n in enumerate(self.view_names) if cfg.fuse_token_view_pooled or not self.has_tokens
                 or n != cfg.token_view]
        if self.has_attributes:
            fused.append(num_coarse)
        self.fused_view_indices = fused
        self.align_pairs = self._pairs()
        self.id_dim = dim // 2 if cfg.combine == "dual_view" else dim
        self._id_initializer = keras.initializers.get(
            embeddings_initializer or keras.initializers.TruncatedNormal(stddev=ID_INIT_STD))
        id_init = tables.get("id_init")
        if id_init is not None and id_init.shape != (V, self.id_dim):
            raise ValueError(f"id_init must have shape {(V, self.id_dim)}, got {id_init.shape}.")
        self.id_encoder = IdItemEncoder(
            V, self.id_dim, name="id_encoder", embeddings_regularizer=embeddings_regularizer,
            embeddings_initializer=self._array_initializer("id_init") if id_init is not None else self._id_initializer,
        )
        self.attribute_embedding = None
        if self.has_attributes:
            # fast: pooled as sum / sqrt(count) with unit-std rows, so the view has RMS ~1 without a
            # per-row normalisation; full: mean of small rows, then RMS-normalised.
            self.attribute_embedding = keras.layers.Embedding(
                self.shapes["num_attributes"] + 1, dim, name="attribute_embedding",
                embeddings_initializer=keras.initializers.TruncatedNormal(stddev=1.0 if self.fast else ID_INIT_STD))
        self.aligner = None
        if cfg.align and self.align_pairs:
            self.aligner = ContrastiveAligner(
                self.total_views, projection_dim=cfg.projection_dim, head_layers=cfg.head_layers,
                temperature=cfg.temperature, learnable_temperature=cfg.learnable_temperature,
                pairs=self.align_pairs, name="aligner")
        self.fuser = self.token_projection = None
        if self.has_tokens and cfg.fuse and fused and self.fast:
            self.fuser = CoAttentionFuser(cfg.fusion_heads or 1, key_dim=cfg.fusion_key_dim or FAST_KEY_DIM,
                                          name="fuser")
        elif self.has_tokens and cfg.fuse and fused:
            self.fuser = CrossAttentionFuser(cfg.fusion_heads or 2, key_dim=cfg.fusion_key_dim,
                                             dropout=cfg.fusion_dropout, name="fuser")
        elif self.has_tokens:
            self.token_projection = keras.layers.Dense(dim, name="token_projection")
        self.num_semantic_vectors = int(bool(self.total_views)) + int(self.has_tokens)
        self.semantic_width = dim - self.id_dim if cfg.combine == "dual_view" else dim
        self.semantic_projection = self.gate = self.concat_projection = None
        # full: [fused views; fused text] -> a projection; fast: their sum (already in model dim),
        # projected only when the semantic part is narrower (dual_view).
        if self.num_semantic_vectors and (not self.fast or self.semantic_width != dim):
            self.semantic_projection = keras.layers.Dense(self.semantic_width, use_bias=False,
                                                          name="semantic_projection")
        if cfg.combine == "gate" and self.num_semantic_vectors:
            self.gate = keras.layers.Dense(dim, activation="sigmoid", name="gate",
                                           kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02))
        if cfg.combine == "concat":
            self.concat_projection = keras.layers.Dense(dim, name="concat_projection")
        self.semantic_dropout = keras.layers.Dropout(cfg.dropout)
        object.__setattr__(self, "_step_table", None)

    # --- set-up helpers --------------------------------------------------
    @staticmethod
    def _check_features(features, V):
        expected = {"coarse": 3, "coarse_mask": 2, "tokens": 3, "token_mask": 2, "attributes": 2, "groups": 2,
                    "id_init": 2}
        tables = {}
        for name, array in features.items():
            array = np.asarray(array)
            if array.ndim != expected[name] or array.shape[0] != V:
                raise ValueError(f"DMESR feature {name!r} must have {expected[name]} axes and {V} rows "
                                 f"(one per id), got shape {array.shape}.")
            tables[name] = array
        for name, of in (("coarse_mask", "coarse"), ("token_mask", "tokens")):
            if name in tables and (of not in tables or tables[name].shape != tables[of].shape[:2]):
                raise ValueError(f"DMESR feature {name!r} needs {of!r} of matching shape.")
        if "attributes" in tables and tables["attributes"].min(initial=0) < 0:
            raise ValueError("DMESR attribute ids must be >= 0 (0 = none).")
        for name in ("coarse", "tokens", "id_init"):
            if name in tables:
                tables[name] = tables[name].astype("float32")
        if "attributes" in tables:
            tables["attributes"] = tables["attributes"].astype("int32")
        return tables

    def _pairs(self):
        """Aligned view pairs: explicit `align_pairs`, else anchor vs every other view, else all pairs."""
        cfg = self.config
        names = list(self.view_names) + ([ATTRIBUTE_VIEW] if self.has_attributes else [])
        if len(names) < 2:
            return []
        if cfg.align_pairs:
            out = []
            for pair in cfg.align_pairs:
                parts = str(pair).split(":")
                if len(parts) != 2 or any(p not in names for p in parts) or parts[0] == parts[1]:
                    raise ValueError(f"dmesr.align_pairs entry {pair!r} must look like 'view:view' with two "
                                     f"different views from {names}.")
                out.append((names.index(parts[0]), names.index(parts[1])))
            return out
        if cfg.align_anchor in names:
            a = names.index(cfg.align_anchor)
            return [(a, b) for b in range(len(names)) if b != a]
        return [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))]

    def active_parts(self):
        """Names of the parts that run: `id`, each coarse view, `attributes`, `text_tokens`,
        `alignment`, `fusion`."""
        parts = ["id"] + list(self.view_names)
        parts += [ATTRIBUTE_VIEW] if self.has_attributes else []
        parts += ["text_tokens"] if self.has_tokens else []
        parts += ["alignment"] if self.aligner is not None else []
        parts += ["fusion"] if self.fuser is not None else []
        return parts

    @property
    def output_dim(self):
        return self.embedding_dim

    # --- weights -------------------------------------------------------
    def build(self, input_shape=None):
        V, dim, cfg = self.vocab_size, self.embedding_dim, self.config

        def frozen(name, shape, dtype="float32"):
            return self.add_weight(shape=shape, dtype=dtype, trainable=False, name=name,
                                   initializer=self._array_initializer(name))

        self.id_encoder.build()
        if self.num_coarse:
            C, d = self.shapes["coarse"]
            self.coarse_table = frozen("coarse", (V, C, d))
            self.coarse_mask_table = frozen("coarse_mask", (V, C))
            residual = d == dim
            std = cfg.adapter_init_scale if residual else d ** -0.5
            self.adapter_kernel = self.add_weight(
                shape=(C, d, dim), name="adapter_kernel", initializer=keras.initializers.TruncatedNormal(stddev=std))
            self.adapter_bias = None
            if not self.fast:  # fast: no bias, so an absent view (a zero row) stays zero without a mask
                self.adapter_bias = self.add_weight(shape=(C, dim), initializer="zeros", name="adapter_bias")
            self._residual_adapter = residual
            self._fused_coarse = [i for i in self.fused_view_indices if i < C]
            self.fused_coarse_table = None
            if self.fast and self._fused_coarse and self._fused_coarse != list(range(C)):
                # the catalogue pass reads only the fused coarse views: their own frozen copy, no per-step slice
                self.fused_coarse_table = frozen("fused_coarse", (V, len(self._fused_coarse), d))
        if self.has_tokens:
            K, e = self.shapes["tokens"]
            self.token_table = frozen("tokens", (V, K, e))
            self.token_mask_table = frozen("token_mask", (V, K))
            if self.fast:
                self.token_mean_table = frozen("token_mean", (V, e))  # masked mean of the token clusters
        if self.has_attributes:
            self.attribute_table = frozen("attributes", (V, self.shapes["attributes"][0]), "int32")
            self.attribute_embedding.build((None,))
        if self.total_views:
            self.group_table = frozen("groups", (V, self.total_views), "int32")
        self.reductions = {k: frozen(f"reduction_{k}", tuple(shape), REDUCTIONS[k])
                           for k, shape in self.reduction_shapes.items()}
        views_shape = (None, self.total_views, dim)
        if self.aligner is not None:
            self.aligner.build(views_shape)
        if self.fuser is not None:
            n = len(self.fused_view_indices)  # (the fast fuser ignores view_mask/token_mask shapes)
            self.fuser.build({"views": (None, n, dim), "view_mask": (None, n),
                              "tokens": (None,) + tuple(self.shapes["tokens"]), "token_mask": (None, self.shapes["tokens"][0])})
        if self.token_projection is not None:
            self.token_projection.build((None, self.shapes["tokens"][1]))
        if self.semantic_projection is not None:
            self.semantic_projection.build((None, dim * (1 if self.fast else self.num_semantic_vectors)))
        if self.num_semantic_vectors:
            self.semantic_gain = self.add_weight(shape=(self.semantic_width,), name="semantic_gain",
                                                 initializer=keras.initializers.Constant(ID_INIT_STD))
        if self.gate is not None:
            self.gate.build((None, 2 * dim))
        if self.concat_projection is not None:
            self.concat_projection.build((None, self.id_dim + dim))
        self._initial_tables, self._initial_reductions = {}, {}
        self.built = True

    def _array_initializer(self, name):
        """Initializer giving the feature array passed to the constructor (zeros if none, e.g. before
        loading saved weights). Values enter at variable creation, so a build traced inside `fit`
        keeps them."""
        values = self._initial_tables.get(name, self._initial_reductions.get(name))
        if name == "fused_coarse" and "coarse" in self._initial_tables:
            values = self._initial_tables["coarse"][:, self._fused_coarse]
        if values is None:
            return "zeros"
        values = np.array(values, copy=True)
        if name != "id_init" and not name.startswith("reduction_"):
            values[:NUM_RESERVED] = 0  # padding and OOV carry no semantics

        def initializer(shape, dtype=None):
            if tuple(shape) != values.shape:
                raise ValueError(f"{name}: expected shape {values.shape}, got {tuple(shape)}.")
            return ops.convert_to_tensor(values.astype(keras.backend.standardize_dtype(dtype)))

        return initializer

    def _row_features(self, tables):
        """The per-item frozen features the forward pass reads, from reduced feature rows (numpy):
        masks (default: rows not all zero), and for the fast encoder the frozen preprocessing done
        once here instead of every step: coarse vectors RMS-normalised, the token mean."""
        tables = dict(tables)
        if "coarse" in tables:
            mask = tables.pop("coarse_mask", None)
            mask = np.any(tables["coarse"] != 0, axis=-1) if mask is None else np.asarray(mask, bool)
            tables["coarse_mask"] = mask
            if self.fast:
                tables["coarse"] = _rms_normalize_np(tables["coarse"], mask)
        if "tokens" in tables:
            mask = tables.pop("token_mask", None)
            mask = np.any(tables["tokens"] != 0, axis=-1) if mask is None else np.asarray(mask, bool)
            tables["token_mask"] = mask
            if self.fast:
                tables["tokens"] = _rms_normalize_np(tables["tokens"], mask)
                weight = mask / np.maximum(mask.sum(axis=1, keepdims=True), 1)
                tables["token_mean"] = np.einsum("nk,nke->ne", weight, tables["tokens"]).astype(np.float32)
        return tables

    # --- forward -------------------------------------------------------
    @staticmethod
    def _rows(table, ids):
        return ops.convert_to_tensor(table) if ids is None else ops.take(table, ids, axis=0)

    def _table_rows(self, ids=None):
        """The frozen feature rows of 1-D `ids` (None = all) as a dict of tensors."""
        rows = {}
        if self.num_coarse:
            rows["coarse"] = self._rows(self.coarse_table, ids)  # (n, C, d)
            if ids is None and self.fused_coarse_table is not None:
                rows["fused_coarse"] = ops.convert_to_tensor(self.fused_coarse_table)  # (V, C_fused, d)
            rows["coarse_mask"] = self._rows(self.coarse_mask_table, ids) > 0
        if self.has_tokens:
            rows["tokens"] = self._rows(self.token_table, ids)  # (n, K, e)
            rows["token_mask"] = self._rows(self.token_mask_table, ids) > 0
            if self.fast:
                rows["token_mean"] = self._rows(self.token_mean_table, ids)  # (n, e)
        if self.has_attributes:
            rows["attributes"] = self._rows(self.attribute_table, ids)  # (n, A)
        return rows

    def _attribute_view(self, attribute_ids):
        """The attribute view `(n, dim)` and its mask `(n,)` from attribute ids `(n, A)`."""
        present = attribute_ids > 0
        if not self.fast:
            pooled = masked_mean(self.attribute_embedding(attribute_ids), present, axis=1)  # (n, dim)
            return rms_normalize(pooled), ops.any(present, axis=1)
        # fast: one sparse (n, attribute vocab) x (vocab, dim) matmul, rows weighted 1 / sqrt(count).
        count = ops.sum(ops.cast(present, "float32"), axis=1)
        index = tf.where(present)  # (nnz, 2): (row, slot)
        pooling = tf.SparseTensor(
            tf.stack([index[:, 0], tf.cast(tf.gather_nd(attribute_ids, index), tf.int64)], axis=1),
            tf.gather(ops.rsqrt(ops.maximum(count, 1.0)), index[:, 0]),
            tf.stack([tf.shape(attribute_ids, out_type=tf.int64)[0],
                      tf.cast(self.shapes["num_attributes"] + 1, tf.int64)]))
        pooled = tf.sparse.sparse_dense_matmul(pooling, self.attribute_embedding.embeddings)  # (n, dim)
        return pooled, count > 0

    def _views(self, rows, indices=None):
        """Adapted coarse views then the attribute view, `(n, len(indices), dim)` (None = all
        `total_views`), zero where absent, and their bool mask."""
        indices = list(range(self.total_views)) if indices is None else list(indices)
        coarse = [i for i in indices if i < self.num_coarse]
        views, masks = [], []
        if coarse and self.fast:
            # x (I + A): the residual folded into the (small) kernel, one matmul per view; no bias and
            # no mask (absent views are zero rows); inputs RMS-normalised once at build time.
            kernel = self.adapter_kernel
            if self._residual_adapter:
                kernel = kernel + ops.eye(self.embedding_dim, dtype=kernel.dtype)
            x = rows["coarse"]
            if coarse != list(range(self.num_coarse)):
                kernel = ops.take(kernel, coarse, axis=0)
                x = rows["fused_coarse"] if coarse == self._fused_coarse and "fused_coarse" in rows else ops.take(
                    x, coarse, axis=1)
            views.append(ops.matmul(x[:, 0], kernel[0])[:, None] if len(coarse) == 1
                         else ops.einsum("ncd,cde->nce", x, kernel))
            masks.append(ops.take(rows["coarse_mask"], coarse, axis=1))
        elif coarse:
            x, kernel, bias = rows["coarse"], self.adapter_kernel, self.adapter_bias
            mask = rows["coarse_mask"]
            if coarse != list(range(self.num_coarse)):
                x, kernel, bias = (ops.take(t, coarse, axis=a) for t, a in ((x, 1), (kernel, 0), (bias, 0)))
                mask = ops.take(mask, coarse, axis=1)
            adapted = ops.einsum("ncd,cde->nce", x, kernel) + bias
            if self._residual_adapter:
                adapted = adapted + x  # the frozen vector plus a correction that starts near zero
            views.append(rms_normalize(adapted))  # every adapted view RMS-normalised per step
            masks.append(mask)
        if self.num_coarse in indices and self.has_attributes:
            pooled, present = self._attribute_view(rows["attributes"])
            views.append(pooled[:, None, :])
            masks.append(present[:, None])
        mask = masks[0] if len(masks) == 1 else ops.concatenate(masks, axis=1)
        vectors = views[0] if len(views) == 1 else ops.concatenate(views, axis=1)
        if self.fast:
            return vectors, mask  # zero where absent by construction
        return vectors * ops.cast(mask, vectors.dtype)[..., None], mask

    def view_vectors(self, ids=None):
        """Adapted coarse view vectors `(n, total_views, dim)` of 1-D `ids` (None = all ids),
        coarse views first and the attribute view last (RMS-normalised: per step in the full
        encoder; the fast encoder normalised the frozen inputs once, its adapters start near the
        identity), their bool mask `(n, total_views)` and content groups `(n, total_views)`;
        `(None, None, None)` without views. These are the vectors that are aligned and then fused."""
        if not self.built:
            self.build()
        if not self.total_views:
            return None, None, None
        ids = None if ids is None else ops.cast(ids, "int32")
        vectors, mask = self._views(self._table_rows(ids))
        return vectors, mask, self._rows(self.group_table, ids)

    def _semantic(self, ids, training=False):
        """The semantic part `(n, width)` of 1-D `ids` (None = all); see `_semantic_of`."""
        return self._semantic_of(self._table_rows(ids), training)

    def _semantic_of(self, rows, training=False):
        """The semantic part `(n, width)` (normalised, scaled; zero for items without semantics) of
        items given by their frozen feature rows (`_table_rows`), or None without semantics."""
        if not self.num_semantic_vectors:
            return None
        views = view_mask = tokens = token_mask = has_any = None
        if self.has_tokens:
            tokens, token_mask = rows["tokens"], rows["token_mask"]
            has_any = ops.any(token_mask, axis=1)
        if self.total_views:
            # the fused views only (with the fuser) or all views (mean pooling)
            indices = self.fused_view_indices if self.fuser is not None else None
            views, view_mask = self._views(rows, indices)
            has_views = ops.any(view_mask, axis=1)
            has_any = has_views if has_any is None else ops.logical_or(has_any, has_views)
        if self.fuser is not None:
            fuser_inputs = {"views": views, "view_mask": view_mask, "tokens": tokens, "token_mask": token_mask}
            if self.fast:  # the sum of the fused view and text vectors, (n, dim)
                semantic = [self.fuser(fuser_inputs)]
            else:
                fused = self.fuser(fuser_inputs, training=training)
                semantic = [fused["views"], fused["text"]]
        else:
            semantic = []
            if views is not None:
                semantic.append(masked_mean(views, view_mask, axis=1))
            if self.has_tokens:
                has_tokens = ops.cast(ops.any(token_mask, axis=1, keepdims=True), "float32")
                mean = rows["token_mean"] if self.fast else masked_mean(tokens, token_mask, axis=1)
                text = self.token_projection(mean)
                semantic.append((text if self.fast else rms_normalize(text)) * has_tokens)
        if self.fast:
            semantic = semantic[0] if len(semantic) == 1 else semantic[0] + semantic[1]  # (n, dim)
        else:
            semantic = ops.concatenate(semantic, axis=-1)
        semantic = self.semantic_dropout(semantic, training=training)
        if self.semantic_projection is not None:
            semantic = self.semantic_projection(semantic)
        part = rms_normalize(semantic) * self.semantic_gain
        if self.fast:
            return part  # exactly zero already where an item has no semantics (masked inputs, masked biases)
        return part * ops.cast(has_any, part.dtype)[:, None]

    def _combine(self, id_vectors, semantic):
        if semantic is None:
            return id_vectors
        combine = self.config.combine
        if combine == "add":
            return id_vectors + semantic
        if combine == "concat":
            return self.concat_projection(ops.concatenate([id_vectors, semantic], axis=-1))
        if combine == "dual_view":
            return ops.concatenate([id_vectors, semantic], axis=-1)
        gate = self.gate(ops.concatenate([id_vectors, semantic], axis=-1))
        return id_vectors + gate * semantic

    def parts(self, ids=None):
        """`(id part, semantic part)` of 1-D `ids` (None = all) at inference (no dropout); the
        semantic part is None if the encoder has no semantics."""
        ids = None if ids is None else ops.cast(ids, "int32")
        id_vectors = self.id_encoder.all_items() if ids is None else self.id_encoder(ids)
        return id_vectors, self._semantic(ids)

    def _encode(self, ids, training=False):
        """Item vectors `(n, dim)` for 1-D `ids` (None = the whole catalogue)."""
        semantic = self._semantic(ids, training)
        id_vectors = self.id_encoder.all_items() if ids is None else self.id_encoder(ids)
        return self._combine(id_vectors, semantic)

    def call(self, item_ids, training=False):
        item_ids = ops.cast(item_ids, "int32")
        unique_ids, index = tf.unique(tf.reshape(item_ids, [-1]))  # each distinct id once
        if training:
            # The whole catalogue once per step: exact gradients for every row; all_items() reuses it.
            table = self._encode(None, training=True)  # (V, dim)
            object.__setattr__(self, "_step_table", (self._graph_key(), table))
            vectors = ops.take(table, unique_ids, axis=0)
            if self.aligner is not None and self.config.alignment_weight > 0:
                # A sample of the catalogue (a regulariser): the batch's distinct items, each once
                # (duplicates would be false negatives of each other), at most align_max_items of
                # them (the logits are (n, n) per view pair). Their views are recomputed from their
                # frozen rows (the same function as the table's, so the same parameters).
                aligned = unique_ids[: self.config.align_max_items] if self.config.align_max_items else unique_ids
                self.add_loss(self.config.alignment_weight * self.alignment_loss(aligned))
        else:
            vectors = self._encode(unique_ids)  # (u, dim)
        out = ops.take(vectors, index, axis=0)
        return tf.reshape(out, tf.concat([tf.shape(item_ids), [self.embedding_dim]], axis=0))  # (..., dim)

    def all_items(self):
        """All item vectors in id order, `(vocab_size, dim)` (differentiable). Right after a
        training call in the same step (graph), the very table that call computed."""
        if not self.built:
            self.build()
        step = self._step_table
        object.__setattr__(self, "_step_table", None)
        if step is not None and step[0] is self._graph_key():
            return step[1]
        return self._encode(None)

    @staticmethod
    def _graph_key():
        """The graph being traced (None when eager): a call's tensors are only used in its own graph."""
        return None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()

    def alignment_loss(self, item_ids):
        """The (unweighted) alignment loss of the distinct ids in `item_ids`."""
        if self.aligner is None:
            raise ValueError("this encoder has no alignment (align=False or fewer than two views).")
        if not self.built:
            self.build()
        unique_ids, _ = tf.unique(tf.reshape(ops.cast(item_ids, "int32"), [-1]))
        views, view_mask, groups = self.view_vectors(unique_ids)
        return self.aligner(views, view_mask, groups if self.config.exclude_duplicates else None)

    def materialize(self, batch_size=4096):
        """The final `(vocab_size, dim)` float32 numpy table (for serving as a plain embedding)."""
        if not self.built:
            self.build()
        chunks = [ops.convert_to_numpy(self._encode(ops.arange(start, min(start + batch_size, self.vocab_size))))
                  for start in range(0, self.vocab_size, batch_size)]
        return np.concatenate(chunks, axis=0).astype("float32")

    def encode_features(self, features):
        """Item vectors `(n, dim)` of items given by their frozen feature rows, e.g. new items
        added without retraining: the ID part is zero (no trained ID row), the semantic part the
        one these rows get in the table (`materialize()` minus the ID part, for `combine="add"`).

        Args:
            features: dict of numpy arrays with `n` rows, in the layer's reduced spaces (as the
                builder gives them; `tfrec.semantics.dmesr.reduce_new_items` reduces raw store
                rows): `"coarse"` `(n, C, d)` and optional `"coarse_mask"` when the encoder has
                coarse views, `"tokens"` `(n, K, e)` and optional `"token_mask"` when it has
                tokens, `"attributes"` `(n, A)` compact attribute ids (0 = none) when it has
                attributes.

        Returns:
            float32 numpy `(n, dim)`.

        Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> features = {"coarse": rng.normal(size=(10, 1, 8)), "attributes": rng.integers(0, 4, (10, 2))}
        >>> enc = DMESRItemEncoder(10, 8, features=features, view_names=("generated",))
        >>> enc.encode_features({"coarse": rng.normal(size=(3, 1, 8)), "attributes": np.array([[1, 2], [0, 0], [3, 0]])}).shape
        (3, 8)
        """
        if not self.built:
            self.build()
        features = {k: v for k, v in dict(features).items() if v is not None}
        allowed = {"coarse", "coarse_mask", "tokens", "token_mask", "attributes"}
        unknown = sorted(set(features) - allowed)
        if unknown:
            raise ValueError(f"encode_features: unknown feature(s) {unknown}; known: {sorted(allowed)}")
        needed = (["coarse"] if self.num_coarse else []) + (["tokens"] if self.has_tokens else []) + (
            ["attributes"] if self.has_attributes else [])
        missing = [k for k in needed if k not in features]
        extra = [k for k in ("coarse", "tokens", "attributes") if k in features and k not in needed]
        if missing or extra:
            raise ValueError(f"encode_features needs exactly the features {needed} of this encoder; "
                             f"missing {missing}, not used by it {extra}.")
        n = len(np.asarray(features[needed[0]])) if needed else 0
        tables = self._check_features(features, n)
        for name in ("coarse", "tokens", "attributes"):
            if name in tables and list(tables[name].shape[1:]) != self.shapes[name]:
                raise ValueError(f"encode_features: {name!r} rows must have shape {self.shapes[name]} (the "
                                 f"encoder's reduced space), got {list(tables[name].shape[1:])}.")
        if "attributes" in tables and tables["attributes"].max(initial=0) > self.shapes["num_attributes"]:
            raise ValueError(f"encode_features: attribute ids must be compact ids in [0, "
                             f"{self.shapes['num_attributes']}], got {tables['attributes'].max()}.")
        rows = {k: ops.convert_to_tensor(v) for k, v in self._row_features(tables).items()}
        for name in ("coarse_mask", "token_mask"):
            if name in rows:
                rows[name] = ops.cast(rows[name], "bool")
        semantic = self._semantic_of(rows)
        id_part = ops.zeros((n, self.id_dim))
        return ops.convert_to_numpy(self._combine(id_part, semantic)).astype("float32")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.embedding_dim,)

    def get_config(self):
        config = super().get_config()
        config.update({
            "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim,
            "config": json_ready(dataclasses.asdict(self.config)),
            "view_names": list(self.view_names),
            "shapes": self.shapes,
            "reduction_shapes": self.reduction_shapes,
            "embeddings_initializer": keras.initializers.serialize(self._id_initializer),
            "embeddings_regularizer": keras.regularizers.serialize(self.id_encoder.embeddings_regularizer),
        })
        return config


def json_ready(value):
    """Tuples -> lists, recursively (configs stored as JSON)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def content_groups(coarse=None, coarse_mask=None, attributes=None, decimals=4):
    """Content group per item and view, `(V, C [+ 1])` int32: equal ids = identical content.

    Coarse views: rows equal after rounding to `decimals` (identical texts give
    identical vectors up to float noise); the attribute view: the same set of
    attribute ids. Items without a view get group 0 (they take no part).

    Example:
    >>> import numpy as np
    >>> content_groups(attributes=np.array([[0, 0], [3, 4], [4, 3], [5, 0]]))[:, 0].tolist()
    [0, 2, 2, 1]
    """
    columns = []
    if coarse is not None:
        coarse = np.asarray(coarse)
        mask = np.any(coarse != 0, axis=-1) if coarse_mask is None else np.asarray(coarse_mask, bool)
        for c in range(coarse.shape[1]):
            rows = np.round(coarse[:, c].astype(np.float64), decimals)
            _, inverse = np.unique(rows, axis=0, return_inverse=True)
            columns.append(np.where(mask[:, c], inverse.reshape(-1) + 1, 0))
    if attributes is not None:
        attributes = np.sort(np.asarray(attributes), axis=1)
        _, inverse = np.unique(attributes, axis=0, return_inverse=True)
        columns.append(np.where(np.any(attributes > 0, axis=1), inverse.reshape(-1) + 1, 0))
    # Renumber each column densely from 1 (0 = none).
    out = []
    for column in columns:
        _, dense = np.unique(column, return_inverse=True)
        out.append(dense.reshape(-1) + (0 if (column == 0).any() else 1))
    return np.stack(out, axis=1).astype(np.int32)
