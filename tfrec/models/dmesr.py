"""DMESR: configuration, semantic tables, and the item-encoder builder.

DMESR (multimodal semantic enhancement of sequential recommenders) plugs a
`DMESRItemEncoder` into the ordinary next-item task (`NextItemRecommender`
with a SASRec, BERT4Rec or GRU4Rec backbone); the task loss becomes
`recommendation loss + alignment_weight * alignment loss` through the encoder's
`add_loss`. This module holds:

- `DMESRConfig`: every option (YAML section `dmesr:`), with `DMESR_VARIANTS`
  for the benchmark's ablations;
- `DMESRTables`: the numpy tables the encoder reads (coarse views, token
  states, attribute ids), rows aligned with the item vocabulary;
- `load_dmesr_tables(store, config)`: the tables from a semantic store
  (`tfrec.semantics.store.SemanticStore`, imported lazily);
- `build_dmesr_item_encoder(config, tables, vocab_size, embedding_dim)`:
  offline reduction of the frozen tables (PCA, token truncation) and the encoder.

Default choices (paper = the DMESR description in our issue; ours = not stated
there, chosen here, each a config option):

| option | default | origin / why |
| --- | --- | --- |
| views | every view of the store | paper: the three MLLM views; on the bundled data only `title` exists |
| use_attributes | True | ours: attribute ids are the only second view on the bundled data |
| token_view | "title" | paper: the item's original text gives the fine-grained tokens |
| align, alignment_weight | True, 0.1 | paper: rec + lambda * InfoNCE; lambda value ours, not tuned |
| temperature | 0.1, fixed | ours (CLIP learns it, starting at 0.07: `learnable_temperature`); not tuned |
| align_pairs | all pairs | ours: the issue leaves open which view pairs are aligned |
| head_layers | 0 | paper: projection heads; ours: the per-view projections are those heads (as CLIP), so the vectors fused are the aligned ones |
| fuse, fusion_heads | True, 2 | paper: bidirectional cross-attention, residual + norm; heads ours |
| combine | "gate" | ours: items without semantics keep their ID vector exactly |
| trainable_semantics | False | ours: frozen tables are cheaper (no table gradients); fine-tuning is the option |
| view_pca_dim, token_pca_dim, max_tokens | 128, 64, 32 | ours: cost of `all_items()` at every step (below); 32 = all the store keeps (Beauty titles: median 17, p90 26 tokens) |
| catalog_refresh_steps | 50 | ours: cost (below); 0 = exact catalog pass at every step |

Cost: the full softmax asks for the whole catalog's item vectors every step.
Frozen tables are reduced once, offline, by PCA (centred on the rows/tokens
that exist; fit on at most 65,536 rows, seed 0; ~7 s for Beauty's 12,103 x 32
x 384 title tokens) and tokens are cut to `max_tokens`; the fuser folds its
projections so tokens are never projected to the model dimension (see
`CrossAttentionFuser`). Measured on the real Beauty store (title + 637
attributes, dim 64, SASRec, batch 32 x 49 positions, full softmax, 2 shared CPU
cores; medians, noisy): ID-only step ~165-200 ms; DMESR exact
(`catalog_refresh_steps=0`) ~550-640 ms, of which one `all_items()` forward +
backward is ~340-370 ms (forward ~120-150 ms; ID-only: ~1-2 ms); DMESR with
the default cache (N=50) ~270-285 ms; no-fusion / no-text-tokens / no-align
variants ~200-215 ms. The cache changes the gradient: items outside the batch
contribute their cached (stale by < N steps, no gradient) semantic vectors to
the softmax, beside their fresh ID embeddings.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from tfrec.config import DMESR_VARIANTS, DMESRConfig  # noqa: F401  (re-exported)
from tfrec.data.vocab import NUM_RESERVED
from tfrec.layers.dmesr_encoder import COMBINES, DMESRItemEncoder

ATTRIBUTE_VIEW = "attributes"
PCA_FIT_ROWS = 65536

@dataclasses.dataclass
class DMESRTables:
    """Semantic tables, row i = item id i (rows 0 and 1 are ignored).

    Attributes:
        view_embeddings: float `(num_views, V, d)` coarse view vectors, or None.
        view_mask: bool `(num_views, V)`, or None (= rows not all zero).
        view_names: names of the views, in order.
        token_states: float `(V, T, d_tok)` fine-grained text states, or None.
        token_mask: bool `(V, T)`, or None (= tokens not all zero).
        attribute_ids: int `(V, A)` attribute ids, 0 = none, or None.
    """

    view_embeddings: Optional[np.ndarray] = None
    view_mask: Optional[np.ndarray] = None
    view_names: tuple = ()
    token_states: Optional[np.ndarray] = None
    token_mask: Optional[np.ndarray] = None
    attribute_ids: Optional[np.ndarray] = None

    def check(self, vocab_size):
        """`ValueError` naming the table whose rows do not match `vocab_size` or each other."""
        rows = {
            "view_embeddings": None if self.view_embeddings is None else np.shape(self.view_embeddings)[1:2],
            "view_mask": None if self.view_mask is None else np.shape(self.view_mask)[1:2],
            "token_states": None if self.token_states is None else np.shape(self.token_states)[:1],
            "token_mask": None if self.token_mask is None else np.shape(self.token_mask)[:1],
            "attribute_ids": None if self.attribute_ids is None else np.shape(self.attribute_ids)[:1],
        }
        for name, got in rows.items():
            if got is not None and got != (vocab_size,):
                raise ValueError(
                    f"DMESR table {name} has {got[0] if got else 'no'} item rows, expected {vocab_size} "
                    "(one per id of the item vocabulary, incl. padding and OOV)."
                )
        if self.view_embeddings is not None and len(self.view_names) != len(self.view_embeddings):
            raise ValueError(
                f"view_names {list(self.view_names)} must name each of the {len(self.view_embeddings)} views."
            )


# --------------------------------------------------------------------------- loading
def load_dmesr_tables(store, config: DMESRConfig = None, item_vocab=None) -> DMESRTables:
    """The tables named by `config` from a semantic store.

    Args:
        store: a `tfrec.semantics.store.SemanticStore` or a path to one
            (None: `config.store_path`).
        config: `DMESRConfig` (views, token_view, use_tokens, use_attributes).
        item_vocab: optional `Vocabulary`; the store must follow it
            (`VocabularyMismatchError` otherwise).

    Returns:
        `DMESRTables` (full-size, unreduced; `build_dmesr_item_encoder` reduces).
    """
    config = config or DMESRConfig()
    store = config.store_path if store is None else store
    if store is None:
        raise ValueError("no semantic store given: pass one or set dmesr.store_path.")
    if isinstance(store, (str, os.PathLike)):
        from tfrec.semantics.store import SemanticStore  # lazy: semantics is an optional layer

        store = SemanticStore.load(store, item_vocab=item_vocab)
    elif item_vocab is not None:
        store.check_vocabulary(item_vocab)
    names = tuple(config.views) or tuple(store.views)
    views = [store.view(name) for name in names]  # unknown names: KeyError listing the available ones
    tables = DMESRTables(view_names=names)
    if views:
        tables.view_embeddings = np.stack([np.asarray(v.pooled, np.float32) for v in views])
        tables.view_mask = np.stack([np.asarray(v.mask, bool) for v in views])
    if config.use_tokens:
        text = store.view(config.token_view)
        if text.tokens is None:
            raise ValueError(
                f"view {config.token_view!r} of the semantic store has no token states; "
                "encode it with tokens or set dmesr.use_tokens=false."
            )
        tables.token_states = text.tokens  # (V, T, d) float16, memory-mapped
        tables.token_mask = np.asarray(text.token_mask, bool)
    if config.use_attributes:
        if store.attributes is None:
            raise ValueError("the semantic store has no attributes; set dmesr.use_attributes=false.")
        tables.attribute_ids = np.asarray(store.attributes)
    return tables


# --------------------------------------------------------------------------- reduction
def fit_pca(rows, dim, max_rows=PCA_FIT_ROWS, seed=0):
    """Mean and top-`dim` principal axes of `rows (n, d)`: `(mean (d,), components (d, dim))`.

    Fit on at most `max_rows` rows drawn with `seed` (deterministic).
    """
    rows = np.asarray(rows)
    if len(rows) > max_rows:
        rows = rows[np.sort(np.random.default_rng(seed).choice(len(rows), max_rows, replace=False))]
    rows = rows.astype(np.float64)
    mean = rows.mean(axis=0) if len(rows) else np.zeros(rows.shape[1])
    centered = rows - mean
    eigenvalues, eigenvectors = np.linalg.eigh(centered.T @ centered)
    order = np.argsort(eigenvalues)[::-1][:dim]
    components = eigenvectors[:, order]
    # A fixed sign per axis (largest |loading| positive) so refits give the same table.
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(components.shape[1])])
    return mean.astype(np.float32), (components * np.where(signs == 0, 1.0, signs)).astype(np.float32)


def reduce_rows(values, mask, dim):
    """PCA-reduce the last axis of `values (..., d)` to `dim`, fit on rows where `mask`.

    Rows outside `mask` become zeros. `dim=None` or `dim >= d` keeps `values`
    (as float32, masked rows zeroed).
    """
    values = np.asarray(values)
    mask = np.asarray(mask, bool)
    if dim is None or dim >= values.shape[-1]:
        out = values.astype(np.float32)
    else:
        mean, components = fit_pca(values[mask], dim)
        out = ((values.astype(np.float32) - mean) @ components).astype(np.float32)
    return out * mask[..., None]


def _compact_attribute_ids(attribute_ids):
    """Attribute ids renumbered 1..n in sorted order (0 stays "none")."""
    attribute_ids = np.asarray(attribute_ids)
    if attribute_ids.ndim != 2:
        raise ValueError(f"attribute_ids must have shape (vocab_size, attributes_per_item), got {attribute_ids.shape}.")
    if attribute_ids.size and attribute_ids.min() < 0:
        raise ValueError(f"attribute_ids must be >= 0 (0 = none), got {attribute_ids.min()}.")
    present = np.unique(attribute_ids[attribute_ids > 0])
    compact = np.searchsorted(present, attribute_ids) + 1
    return np.where(attribute_ids > 0, compact, 0).astype(np.int32), len(present)


def _pair_indices(pairs, names):
    """`["a:b", ...]` view-name pairs -> index pairs (None = all pairs)."""
    if not pairs:
        return None
    out = []
    for pair in pairs:
        parts = str(pair).split(":")
        if len(parts) != 2 or any(p not in names for p in parts):
            raise ValueError(
                f"dmesr.align_pairs entry {pair!r} must look like 'view:view' with views from {list(names)}."
            )
        out.append((names.index(parts[0]), names.index(parts[1])))
    return out


# --------------------------------------------------------------------------- builder
def build_dmesr_item_encoder(config: DMESRConfig, tables: DMESRTables, vocab_size, embedding_dim, name="item_encoder"):
    """A `DMESRItemEncoder` over `tables`, reduced as `config` says.

    Args:
        config: `DMESRConfig`.
        tables: `DMESRTables` aligned with the item vocabulary (`vocab_size` rows).
        vocab_size: int, `Vocabulary.size`.
        embedding_dim: int, the model dimension.

    Example:
    >>> tables = DMESRTables(view_embeddings=np.random.rand(1, 10, 12), view_names=("title",),
    ...                      attribute_ids=np.random.randint(0, 5, (10, 3)))
    >>> enc = build_dmesr_item_encoder(DMESRConfig(use_tokens=False), tables, 10, 8)
    >>> enc.all_items().shape
    TensorShape([10, 8])
    """
    if config.combine not in COMBINES:
        raise ValueError(f"dmesr.combine must be one of {COMBINES}, got {config.combine!r}.")
    if config.max_tokens < 1:
        raise ValueError(f"dmesr.max_tokens must be positive, got {config.max_tokens}.")
    tables.check(vocab_size)
    kwargs = {}
    names = []
    if tables.view_embeddings is not None:
        views = np.asarray(tables.view_embeddings)
        mask = np.ones(views.shape[:2], bool) if tables.view_mask is None else np.asarray(tables.view_mask, bool)
        mask = mask & np.any(views != 0, axis=-1)
        mask[:, :NUM_RESERVED] = False
        kwargs["view_embeddings"] = np.stack(
            [reduce_rows(views[v], mask[v], config.view_pca_dim) for v in range(len(views))]
        )
        kwargs["view_mask"] = mask
        names += list(tables.view_names)
    if config.use_tokens and tables.token_states is not None:
        tokens = np.asarray(tables.token_states[:, : config.max_tokens])
        mask = np.any(tokens != 0, axis=-1)
        if tables.token_mask is not None:
            mask &= np.asarray(tables.token_mask, bool)[:, : config.max_tokens]
        mask[:NUM_RESERVED] = False
        kwargs["token_states"] = reduce_rows(tokens, mask, config.token_pca_dim)
        kwargs["token_mask"] = mask
    elif config.use_tokens:
        raise ValueError("dmesr.use_tokens is true but the tables have no token states.")
    if config.use_attributes:
        if tables.attribute_ids is None:
            raise ValueError("dmesr.use_attributes is true but the tables have no attribute ids.")
        kwargs["attribute_ids"], kwargs["num_attributes"] = _compact_attribute_ids(tables.attribute_ids)
        names.append(ATTRIBUTE_VIEW)
    encoder = DMESRItemEncoder(
        vocab_size,
        embedding_dim,
        trainable_semantics=config.trainable_semantics,
        shared_view_projection=config.shared_view_projection,
        align=config.align,
        alignment_weight=config.alignment_weight,
        temperature=config.temperature,
        learnable_temperature=config.learnable_temperature,
        projection_dim=config.projection_dim,
        head_layers=config.head_layers,
        align_pairs=_pair_indices(config.align_pairs, names),
        fuse=config.fuse,
        use_tokens=config.use_tokens,
        fusion_heads=config.fusion_heads,
        fusion_key_dim=config.fusion_key_dim,
        fusion_dropout=config.fusion_dropout,
        combine=config.combine,
        dropout=config.dropout,
        catalog_refresh_steps=config.catalog_refresh_steps,
        name=name,
        **kwargs,
    )
    encoder.build()  # tables become weights now; the reduced numpy copies can be freed
    return encoder
