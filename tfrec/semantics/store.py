"""Versioned on-disk store of item semantics, aligned with an item `Vocabulary`.

Row `i` of every array is the item with id `i` in the item vocabulary: row 0
(padding) and row 1 (OOV) are zeros with mask False. Content:

- named **views** (`VIEW_NAMES`): `title` = the item's own text (pooled + token
  states: the fine-grained text of DMESR); `mllm_image`, `mllm_text`, `mllm_both` =
  the three MLLM enrichment outputs (pooled only); `generated` = the generated
  text view (a language model's short description written from the item's
  richer metadata, e.g. `items_generated.tsv` of the Amazon datasets; pooled
  only; language-model output, not an MLLM description of images). Each view has
  `pooled (V, d) float32`, `mask (V,) bool` (item has this view) and optionally
  `tokens (V, T, d) float16` + `token_mask (V, T) bool`. Rows with mask False are zeros.
- optional structured **attributes** `(V, A) int32`: attribute ids from the saved
  `attribute_vocab` (0 = padding, 1 = OOV, real attributes from 2), left-aligned
  and padded with 0.

One store directory::

    metadata.json            format version, fingerprints, encoder, views, shapes
    item_vocab.txt           the item vocabulary the rows follow (`Vocabulary.save`)
    views/<view>/pooled.npy  mask.npy  [tokens.npy  token_mask.npy]
    attributes.npy  attribute_vocab.txt                      (when present)

Versions: `save_version(root, store)` writes `root/v1`, `root/v2`, ... and points
the text file `root/LATEST` at the newest; `SemanticStore.load(root)` follows
`LATEST`, `SemanticStore.load(root / "v1")` opens a given version. Old versions are
never deleted. Big arrays are memory-mapped on load (`mmap=True`).

`fingerprint` identifies what the content was computed from (item vocabulary,
input texts/attributes, encoder and its settings), so equal fingerprints mean an
encoding job can reuse the store instead of recomputing it.

Example:

>>> vocab = Vocabulary(["a", "b"])
>>> pooled = np.zeros((4, 3), np.float32); pooled[2] = [1, 0, 0]
>>> view = SemanticView("title", pooled, np.array([False, False, True, False]))
>>> store = SemanticStore(vocab, [view], input_fingerprint="demo")
>>> path = save_version("/tmp/demo_store", store)
>>> SemanticStore.load("/tmp/demo_store", item_vocab=vocab).view("title").mask.tolist()
[False, False, True, False]
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from tfrec.data.vocab import NUM_RESERVED, Vocabulary

FORMAT_NAME = "tfrec-semantic-store"
FORMAT_VERSION = 1
VIEW_NAMES = ("title", "generated", "mllm_image", "mllm_text", "mllm_both")
METADATA_FILE = "metadata.json"
ITEM_VOCAB_FILE = "item_vocab.txt"
ATTRIBUTE_VOCAB_FILE = "attribute_vocab.txt"
ATTRIBUTES_FILE = "attributes.npy"
LATEST_FILE = "LATEST"
_VERSION_RE = re.compile(r"^v(\d+)$")
_MMAP_ARRAYS = {"pooled", "tokens", "attributes"}  # masks are small: loaded into memory

PathLike = Union[str, "os.PathLike[str]"]


class SemanticStoreError(ValueError):
    """A store is corrupt, inconsistent or cannot be written."""


class VocabularyMismatchError(SemanticStoreError):
    """The store was built for another item vocabulary."""


class UnknownViewError(KeyError):
    """A view name the store does not have."""

    def __str__(self):  # KeyError would print the message with quotes
        return str(self.args[0])


def vocabulary_fingerprint(vocab: Vocabulary) -> str:
    """sha256 hex of the vocabulary file contents (token order = ids)."""
    return hashlib.sha256(b"tfrec-vocab-v1\n" + vocab.to_text().encode("utf-8")).hexdigest()


def store_fingerprint(vocab_fingerprint: str, input_fingerprint: str, encoder: Mapping) -> str:
    """The reuse key: sha256 of (format version, vocabulary, inputs, encoder identity)."""
    payload = json.dumps({"format_version": FORMAT_VERSION, "item_vocab": vocab_fingerprint,
                          "inputs": input_fingerprint, "encoder": dict(encoder)}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclasses.dataclass(eq=False)
class SemanticView:
    """One named view of every item, rows aligned with the item vocabulary.

    Args:
        name: str, one of `VIEW_NAMES`.
        pooled: `(V, d) float32` sentence vectors (zeros where `mask` is False).
        mask: `(V,) bool`, True if the item has this view.
        tokens: optional `(V, T, d) float16` token states.
        token_mask: `(V, T) bool`, required with `tokens`.
        text_fields: provenance, e.g. `["title"]` or `["mllm:text"]`.
    """

    name: str
    pooled: np.ndarray
    mask: np.ndarray
    tokens: Optional[np.ndarray] = None
    token_mask: Optional[np.ndarray] = None
    text_fields: Sequence[str] = ()

    @property
    def dim(self) -> int:
        return int(self.pooled.shape[1])

    @property
    def has_tokens(self) -> bool:
        return self.tokens is not None

    def arrays(self) -> dict:
        """`{array name: array}` of the present arrays."""
        out = {"pooled": self.pooled, "mask": self.mask}
        if self.tokens is not None:
            out.update(tokens=self.tokens, token_mask=self.token_mask)
        return out

    def validate(self, num_rows: int) -> None:
        """Shapes, dtypes and the reserved rows; `SemanticStoreError` naming the problem."""
        if self.name not in VIEW_NAMES:
            raise SemanticStoreError(f"unknown view name {self.name!r}; expected one of {VIEW_NAMES}")
        if (self.tokens is None) != (self.token_mask is None):
            raise SemanticStoreError(f"view {self.name!r}: tokens and token_mask must be given together")
        dim = self.pooled.shape[-1] if self.pooled.ndim else None
        steps = self.token_mask.shape[-1] if self.token_mask is not None and self.token_mask.ndim else None
        expected = {"pooled": ((num_rows, dim), np.float32), "mask": ((num_rows,), np.bool_),
                    "tokens": ((num_rows, steps, dim), np.float16),
                    "token_mask": ((num_rows, steps), np.bool_)}
        for key, array in self.arrays().items():
            shape, dtype = expected[key]
            if array.dtype != dtype or tuple(array.shape) != shape:
                raise SemanticStoreError(
                    f"view {self.name!r}: {key} must be {np.dtype(dtype).name} of shape "
                    f"({', '.join(map(str, shape))}) for {num_rows} vocabulary rows, "
                    f"got {array.dtype.name} {tuple(array.shape)}")
        if np.asarray(self.mask[:NUM_RESERVED]).any():
            raise SemanticStoreError(f"view {self.name!r}: rows 0 (padding) and 1 (OOV) must have mask False")


class SemanticStore:
    """Item semantics (views + attributes) aligned with an item vocabulary.

    Args:
        item_vocab: the `Vocabulary` whose ids index the rows (`V = item_vocab.size`).
        views: `SemanticView`s (distinct names from `VIEW_NAMES`).
        attributes: optional `(V, A) int32` attribute ids (0 = padding).
        attribute_vocab: `Vocabulary` of the attribute tokens (required with `attributes`).
        encoder: identity of the text encoder (`TextEncoder.identity()`), recorded.
        input_fingerprint: hash of the texts / attributes the content was computed from.
        extra: more JSON-able metadata (e.g. source files), recorded as is.
        created: ISO time; default now (UTC).

    Attributes:
        views: list of view names. fingerprint: the reuse key (`store_fingerprint`).
        metadata: the `metadata.json` dict. path: folder it was loaded from / saved to.
    """

    def __init__(self, item_vocab: Vocabulary, views: Sequence[SemanticView], *,
                 attributes: Optional[np.ndarray] = None, attribute_vocab: Optional[Vocabulary] = None,
                 encoder: Optional[Mapping] = None, input_fingerprint: str = "",
                 extra: Optional[Mapping] = None, created: Optional[str] = None):
        self.item_vocab = item_vocab
        self._views = {}
        for view in views:
            if view.name in self._views:
                raise SemanticStoreError(f"view {view.name!r} given twice")
            view.validate(item_vocab.size)
            self._views[view.name] = view
        if (attributes is None) != (attribute_vocab is None):
            raise SemanticStoreError("attributes and attribute_vocab must be given together")
        if attributes is not None:
            if attributes.dtype != np.int32 or attributes.ndim != 2 or len(attributes) != item_vocab.size:
                raise SemanticStoreError(f"attributes must be int32 of shape ({item_vocab.size}, A), "
                                         f"got {attributes.dtype} {tuple(attributes.shape)}")
            if attributes.size and (attributes.min() < 0 or attributes.max() >= attribute_vocab.size):
                raise SemanticStoreError(f"attribute ids outside [0, {attribute_vocab.size})")
        self.attributes, self.attribute_vocab = attributes, attribute_vocab
        self.encoder = dict(encoder or {})
        self.input_fingerprint = input_fingerprint
        self.extra = dict(extra or {})
        self.created = created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.vocab_fingerprint = vocabulary_fingerprint(item_vocab)
        self.fingerprint = store_fingerprint(self.vocab_fingerprint, input_fingerprint, self.encoder)
        self.path: Optional[Path] = None

    # ------------------------------------------------------------------- access

    @property
    def views(self) -> list:
        return list(self._views)

    def view(self, name: str) -> SemanticView:
        """The view `name`; `UnknownViewError` (a `KeyError`) lists the available ones."""
        if name not in self._views:
            raise UnknownViewError(f"semantic store{'' if self.path is None else ' ' + str(self.path)} "
                                   f"has no view {name!r}; available: {self.views}")
        return self._views[name]

    def __contains__(self, name) -> bool:
        return name in self._views

    def check_vocabulary(self, item_vocab: Vocabulary) -> None:
        """`VocabularyMismatchError` unless `item_vocab` is the one the rows follow."""
        if vocabulary_fingerprint(item_vocab) == self.vocab_fingerprint:
            return
        where = "" if self.path is None else f" at {self.path}"
        if item_vocab.size != self.item_vocab.size:
            detail = f"{self.item_vocab.size} rows vs a vocabulary of size {item_vocab.size}"
        else:
            k = next(i for i, (a, b) in enumerate(zip(self.item_vocab.tokens, item_vocab.tokens)) if a != b)
            detail = (f"id {k + NUM_RESERVED} is {self.item_vocab.tokens[k]!r} in the store but "
                      f"{item_vocab.tokens[k]!r} in the given vocabulary")
        raise VocabularyMismatchError(f"semantic store{where} was built for another item vocabulary "
                                      f"({detail}); re-run `tfrec encode` for this prepared data")

    def _array_items(self) -> dict:
        """`{relative .npy path: array}` of everything stored as arrays."""
        out = {f"views/{name}/{key}.npy": array
               for name, view in self._views.items() for key, array in view.arrays().items()}
        if self.attributes is not None:
            out[ATTRIBUTES_FILE] = self.attributes
        return out

    @property
    def metadata(self) -> dict:
        views = {}
        for name, view in self._views.items():
            views[name] = {"text_fields": list(view.text_fields), "dim": view.dim,
                           "items": int(np.count_nonzero(view.mask)), "has_tokens": view.has_tokens,
                           "max_tokens": int(view.token_mask.shape[1]) if view.has_tokens else None}
        attributes = None
        if self.attributes is not None:
            attributes = {"max_per_item": int(self.attributes.shape[1]),
                          "num_attributes": len(self.attribute_vocab.tokens),
                          "items": int(np.count_nonzero((self.attributes > 0).any(axis=1)))}
        return {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
            "created": self.created, "encoder": self.encoder,
            "max_tokens": self.encoder.get("max_tokens"),
            "item_vocab": {"size": self.item_vocab.size, "fingerprint": self.vocab_fingerprint},
            "input_fingerprint": self.input_fingerprint, "view_names": self.views, "views": views,
            "attributes": attributes,
            "arrays": {rel: {"shape": list(a.shape), "dtype": a.dtype.name}
                       for rel, a in self._array_items().items()},
            "extra": self.extra,
        }

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self._array_items().values()))

    def __repr__(self) -> str:
        return (f"SemanticStore(items={self.item_vocab.size}, views={self.views}, "
                f"attributes={self.attributes is not None}, fingerprint={self.fingerprint[:12]})")

    # -------------------------------------------------------------- save / load

    def save(self, path: PathLike, overwrite: bool = False) -> Path:
        """Write the store into folder `path` (atomically: a temp folder is renamed).

        An existing non-empty `path` raises `SemanticStoreError` unless `overwrite`."""
        path = Path(path)
        occupied = (path.is_dir() and any(path.iterdir())) or path.is_file()
        if occupied and not overwrite:
            raise SemanticStoreError(f"{path} already exists; pass overwrite=True or use save_version")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            for rel, array in self._array_items().items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                np.save(tmp / rel, np.ascontiguousarray(array), allow_pickle=False)
            self.item_vocab.save(tmp / ITEM_VOCAB_FILE)
            if self.attribute_vocab is not None:
                self.attribute_vocab.save(tmp / ATTRIBUTE_VOCAB_FILE)
            (tmp / METADATA_FILE).write_text(json.dumps(self.metadata, indent=2) + "\n")
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.path = path
        return path

    @classmethod
    def load(cls, path: PathLike, mmap: bool = True,
             item_vocab: Optional[Vocabulary] = None) -> "SemanticStore":
        """Open a store folder, or the `LATEST` version under a versions root.

        Args:
            path: a store folder (has `metadata.json`) or a root written by `save_version`.
            mmap: memory-map `pooled`, `tokens` and `attributes` (read-only).
            item_vocab: if given, `VocabularyMismatchError` unless the store follows it.

        Raises:
            FileNotFoundError: nothing there. SemanticStoreError: corrupt or unsupported.
        """
        folder = resolve_store_path(path)
        meta = _read_metadata(folder)
        try:
            vocab = Vocabulary.load(folder / ITEM_VOCAB_FILE)
        except (FileNotFoundError, ValueError) as e:
            raise SemanticStoreError(f"corrupt semantic store {folder}: {e}") from None
        if vocabulary_fingerprint(vocab) != meta["item_vocab"]["fingerprint"]:
            raise SemanticStoreError(f"corrupt semantic store {folder}: {ITEM_VOCAB_FILE} does not "
                                     "match the fingerprint in metadata.json")
        arrays = {rel: _load_array(folder, rel, spec, mmap) for rel, spec in meta["arrays"].items()}
        views = []
        for name in meta["view_names"]:
            get = lambda key, n=name: arrays.get(f"views/{n}/{key}.npy")  # noqa: E731
            if get("pooled") is None or get("mask") is None:
                raise SemanticStoreError(f"corrupt semantic store {folder}: view {name!r} has no "
                                         "pooled/mask arrays")
            views.append(SemanticView(name, get("pooled"), get("mask"), get("tokens"),
                                      get("token_mask"), meta["views"].get(name, {}).get("text_fields", [])))
        attribute_vocab = None
        if ATTRIBUTES_FILE in arrays:
            try:
                attribute_vocab = Vocabulary.load(folder / ATTRIBUTE_VOCAB_FILE)
            except (FileNotFoundError, ValueError) as e:
                raise SemanticStoreError(f"corrupt semantic store {folder}: {e}") from None
        try:
            store = cls(vocab, views, attributes=arrays.get(ATTRIBUTES_FILE),
                        attribute_vocab=attribute_vocab, encoder=meta["encoder"],
                        input_fingerprint=meta["input_fingerprint"], extra=meta.get("extra"),
                        created=meta["created"])
        except SemanticStoreError as e:
            raise SemanticStoreError(f"corrupt semantic store {folder}: {e}") from None
        if store.fingerprint != meta["fingerprint"]:
            raise SemanticStoreError(f"corrupt semantic store {folder}: fingerprint in metadata.json "
                                     "does not match its contents")
        store.path = folder
        if item_vocab is not None:
            store.check_vocabulary(item_vocab)
        return store


def _read_metadata(folder: Path) -> dict:
    path = folder / METADATA_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"not a semantic store: {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SemanticStoreError(f"corrupt semantic store {folder}: {METADATA_FILE} is not valid "
                                 f"JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise SemanticStoreError(f"{path} is not a {FORMAT_NAME} metadata file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SemanticStoreError(f"{path}: unsupported format_version {meta.get('format_version')!r}; "
                                 f"this tfrec reads version {FORMAT_VERSION}")
    missing = [k for k in ("fingerprint", "created", "encoder", "item_vocab", "input_fingerprint",
                           "view_names", "views", "arrays") if k not in meta]
    if missing:
        raise SemanticStoreError(f"corrupt semantic store {folder}: metadata.json lacks {missing}")
    return meta


def _load_array(folder: Path, rel: str, spec: Mapping, mmap: bool) -> np.ndarray:
    path = folder / rel
    if not path.is_file():
        raise SemanticStoreError(f"corrupt semantic store {folder}: {rel} is missing")
    name = Path(rel).stem
    try:
        array = np.load(path, mmap_mode="r" if mmap and name in _MMAP_ARRAYS else None,
                        allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise SemanticStoreError(f"corrupt semantic store {folder}: cannot read {rel} ({e})") from None
    if list(array.shape) != list(spec["shape"]) or array.dtype.name != spec["dtype"]:
        raise SemanticStoreError(f"corrupt semantic store {folder}: {rel} is {array.dtype.name} "
                                 f"{list(array.shape)}, metadata.json says {spec['dtype']} {spec['shape']}")
    return array


# ------------------------------------------------------------------ versions

def list_versions(root: PathLike) -> list:
    """Version folders `root/v<N>` sorted by N (empty if `root` does not exist)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _VERSION_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_store_path(path: PathLike) -> Path:
    """`path` itself if it holds `metadata.json`, else the version named in `path/LATEST`."""
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        name = latest.read_text().strip()
        if not _VERSION_RE.match(name):
            raise SemanticStoreError(f"{latest} names {name!r}; expected a version folder like 'v3'")
        if not (path / name).is_dir():
            raise FileNotFoundError(f"{latest} points to {name}, but {path / name} does not exist")
        return path / name
    if not path.exists():
        raise FileNotFoundError(f"semantic store not found: {path}")
    raise FileNotFoundError(f"not a semantic store: {path} has neither {METADATA_FILE} nor {LATEST_FILE}")


def find_version(root: PathLike, fingerprint: str) -> Optional[Path]:
    """The newest readable version under `root` whose fingerprint equals `fingerprint`."""
    for path in reversed(list_versions(root)):
        try:
            meta = json.loads((path / METADATA_FILE).read_text())
        except (OSError, ValueError):
            continue  # an unreadable version is never reused
        if isinstance(meta, dict) and meta.get("fingerprint") == fingerprint:
            return path
    return None


def set_latest(root: PathLike, version: PathLike) -> None:
    """Point `root/LATEST` at `version` (a folder directly under `root`), atomically."""
    root, version = Path(root), Path(version)
    if version.parent.resolve() != root.resolve() or not _VERSION_RE.match(version.name):
        raise SemanticStoreError(f"{version} is not a version folder of {root}")
    tmp = root / f".{LATEST_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(version.name + "\n")
    os.replace(tmp, root / LATEST_FILE)


def save_version(root: PathLike, store: SemanticStore) -> Path:
    """Write `store` as the next version `root/v<N+1>` and point `LATEST` at it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    versions = list_versions(root)
    number = int(_VERSION_RE.match(versions[-1].name).group(1)) + 1 if versions else 1
    path = store.save(root / f"v{number}")
    set_latest(root, path)
    return path
