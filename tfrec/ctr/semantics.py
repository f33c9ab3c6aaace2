"""Item semantics of the CTR models: the semantic store, its pooled vectors and the SIDs fitted on them."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from tfrec.ctr.config import ctr_sids_defaults
from tfrec.data.preprocess import ITEM_VOCAB_FILE

STORE_COMMAND = "tfrec ctr encode --config CONFIG"


@dataclasses.dataclass
class ItemSemantics:
    """What the CTR models read from item semantics, rows = item ids.

    Attributes:
        pooled: `(V, d)` float32 pooled text vectors of the store view (zeros = none).
        store_path: the store version folder; store_fingerprint: its fingerprint.
        item_sids: `(V, L)` int32 semantic IDs, -1 = none (padding, OOV, no text),
            or None when not fitted.
        codebook_sizes: list of int per SID level (None without SIDs).
        sids: the `SemanticIds`; quantizer: the fitted `ResidualQuantizer` (or None).
    """

    pooled: np.ndarray
    store_path: Path
    store_fingerprint: str
    item_sids: Optional[np.ndarray] = None
    codebook_sizes: Optional[list] = None
    sids: object = None
    quantizer: object = None

    def describe(self) -> dict:
        out = {"store": str(self.store_path), "store_fingerprint": self.store_fingerprint}
        if self.sids is not None:
            meta = self.sids.metadata
            out.update(sids_fingerprint=meta["fingerprint"], mode=meta["mode"], codebook_sizes=self.codebook_sizes,
                       deduplicated=meta["deduplicated"], diagnostics=meta["diagnostics"],
                       fit_seconds=meta["fit_seconds"])
        return out


def load_store_for(store_path, item_vocab):
    """The semantic store under `store_path` whose rows follow `item_vocab`.

    `store_path` is a store folder or a versions root; in a root, `LATEST` is tried
    first, then the newest version built for this vocabulary (one root can hold the
    stores of several vocabularies). Raises `FileNotFoundError` when there is no
    store and `VocabularyMismatchError` when none matches, both naming the command
    that builds it."""
    from tfrec.semantics.store import (
        METADATA_FILE, SemanticStore, VocabularyMismatchError, list_versions, vocabulary_fingerprint)

    root = Path(store_path)
    if not root.exists():
        raise FileNotFoundError(f"semantic store not found: {root}; build it for this data with `{STORE_COMMAND}`")
    try:
        return SemanticStore.load(root, item_vocab=item_vocab)
    except VocabularyMismatchError as err:
        wanted = vocabulary_fingerprint(item_vocab)
        for version in reversed(list_versions(root)):
            try:
                meta = json.loads((version / METADATA_FILE).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("item_vocab", {}).get("fingerprint") == wanted:
                return SemanticStore.load(version, item_vocab=item_vocab)
        raise VocabularyMismatchError(f"{err}. No version under {root} follows this item vocabulary "
                                      f"(size {item_vocab.size}); build one with `{STORE_COMMAND}`") from None


def prepare_item_semantics(data, store_path, section=None,
                           fit: bool = True) -> ItemSemantics:
    """SIDs and pooled vectors for the item vocabulary of lifelong `data`.

    Args:
        data: `LifelongData`; its `item_vocab` must be the store's vocabulary.
        store_path: semantic store folder or versions root (see `load_store_for`).
        section: the `sids:` section, a `tfrec.semantics.sids.SidsConfig` (view,
            mode, levels, codebook sizes, seed); None = `ctr_sids_defaults()`.
        fit: fit the SIDs (False: pooled vectors only, e.g. for SIM-soft).
    """
    from tfrec.semantics.sids import fit_sids

    section = section or ctr_sids_defaults()
    store = load_store_for(store_path, data.item_vocab)
    if not fit:
        return item_semantics_of(store, section.view)
    view = store.view(section.view)
    sids, quantizer = fit_sids(np.asarray(view.pooled, np.float32), store.fingerprint, section,
                               mask=np.asarray(view.mask, bool), item_vocab=data.item_vocab,
                               source={"store": str(store.path), "view": section.view})
    return item_semantics_of(store, section.view, sids, quantizer)


def item_semantics_of(store, view: str, sids=None, quantizer=None) -> ItemSemantics:
    """`ItemSemantics` of a loaded `SemanticStore` (pooled `view`) and optional fitted
    `tfrec.semantics.sids.SemanticIds` of that store (e.g. loaded with `load_sids`)."""
    pooled = np.asarray(store.view(view).pooled, np.float32)
    if sids is None:
        return ItemSemantics(pooled, store.path, store.fingerprint)
    if sids.codes.shape[0] != pooled.shape[0]:
        raise ValueError(f"semantic IDs have {sids.codes.shape[0]} rows but the store has {pooled.shape[0]}")
    sizes = list(sids.metadata["codebook_sizes"])
    if sids.metadata["deduplicated"]:
        sizes.append(int(sids.metadata["dedup_level_size"]))
    return ItemSemantics(pooled, store.path, store.fingerprint, sids.codes, sizes, sids, quantizer)


def encode_lifelong_store(data, out_dir, dataset: str = "movielens-1m-subset", data_root=None, items_path=None,
                          **encode_kwargs):
    """Encode "title + genres" of exactly `data.item_vocab` into the store root `out_dir`.

    The vocabulary is written as a prepared-data folder holding `item_vocab.txt`
    (all `tfrec.semantics.encode.encode_items` reads from one) and encoded from the
    dataset's item table, or from `items_path` (your own data); an identical
    existing version is reused."""
    from tfrec.semantics.encode import encode_items

    source = {"items_path": items_path} if items_path else {"dataset": dataset, "data_root": data_root}
    with tempfile.TemporaryDirectory(prefix="tfrec-ctr-vocab-") as folder:
        data.item_vocab.save(Path(folder) / ITEM_VOCAB_FILE)
        return encode_items(folder, out_dir=out_dir, **source, **encode_kwargs)
