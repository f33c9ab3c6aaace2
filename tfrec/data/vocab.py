"""Token vocabularies: string token -> contiguous integer id.

Id layout (shared by every embedding table in tfrec):

- ``PAD_ID = 0``: padding (left/right padding of sequences, never a real token);
- ``OOV_ID = 1``: out-of-vocabulary (unknown tokens at lookup time);
- real tokens get ids ``2, 3, ...`` in vocabulary order.

So an embedding table for a vocabulary has ``vocab.size == len(vocab.tokens) + 2`` rows.

Vocabulary files hold one real token per line, UTF-8, in id order: line ``k``
(0-based) is the token with id ``k + NUM_RESERVED`` (= ``k + 2``). This is the
layout read by ``tf.lookup.TextFileInitializer`` / TF Transform vocabulary files,
which number lines from 0; when using such a file with TF lookup ops, add the
offset yourself, e.g. ``tf.lookup.StaticHashTable(TextFileInitializer(..., value_index=
LINE_NUMBER), default_value=-1)`` then ``ids = table.lookup(x) + 2`` with ``-1 + 2 = OOV_ID``.

Example::

    >>> v = Vocabulary.from_counts({"b": 3, "a": 3, "c": 5})
    >>> v.tokens, v.size
    (['c', 'a', 'b'], 5)
    >>> v.lookup(["a", "zzz", "c"]).tolist()
    [3, 1, 2]
    >>> v.to_tokens([0, 1, 4])
    ['[PAD]', '[OOV]', 'b']
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence, Union

import numpy as np
import pandas as pd

PAD_ID = 0
OOV_ID = 1
NUM_RESERVED = 2
PAD_TOKEN = "[PAD]"
OOV_TOKEN = "[OOV]"

PathLike = Union[str, "os.PathLike[str]"]


def _open(path: PathLike, mode: str):
    """Open local paths with ``open``; URLs (``gs://``, ``hdfs://`` ...) with ``tf.io.gfile``."""
    path = os.fspath(path)
    if "://" in path:
        import tensorflow as tf  # lazy: keep `import tfrec.data.vocab` light

        if "r" in mode and not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        return tf.io.gfile.GFile(path, mode)
    # newline="" disables newline translation: lines are separated by exactly "\n".
    return open(path, mode, encoding="utf-8", newline="")


class Vocabulary:
    """Token -> integer id. 0 = padding, 1 = out-of-vocabulary, real tokens get 2.. in order.

    Args:
        tokens: the real tokens in id order (``tokens[k]`` gets id ``k + 2``). Must be
            non-empty ``str``s without duplicates (``ValueError`` otherwise).

    Attributes:
        tokens: ``list[str]``, the real tokens in id order.
        size: ``int``, ``len(tokens) + 2`` -- the embedding-table size. ``len(vocab)``
            returns the same number.
    """

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        for t in tokens:
            if not isinstance(t, str):
                raise TypeError(f"vocabulary tokens must be str, got {type(t).__name__}: {t!r}")
            if t == "":
                raise ValueError("vocabulary tokens must be non-empty strings")
        index = pd.Index(tokens, dtype=object)
        if not index.is_unique:
            dups = index[index.duplicated()].unique().tolist()[:5]
            raise ValueError(f"duplicate vocabulary tokens, e.g. {dups}")
        self.tokens: list[str] = tokens
        self._index = index

    @classmethod
    def from_counts(cls, counts: Mapping[str, int]) -> "Vocabulary":
        """Vocabulary ordered by count descending, then token ascending (code-point order).

        The order is a pure function of ``counts``, so the in-memory and Beam paths agree.

        >>> Vocabulary.from_counts({"x": 1, "b": 2, "a": 2}).tokens
        ['a', 'b', 'x']
        """
        items = list(counts.items())
        for tok, c in items:
            if int(c) < 0:
                raise ValueError(f"negative count {c} for token {tok!r}")
        items.sort(key=lambda kv: (-int(kv[1]), kv[0]))
        return cls([tok for tok, _ in items])

    @property
    def size(self) -> int:
        return len(self.tokens) + NUM_RESERVED

    def __len__(self) -> int:
        return self.size

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def __repr__(self) -> str:
        head = ", ".join(repr(t) for t in self.tokens[:3])
        more = ", ..." if len(self.tokens) > 3 else ""
        return f"Vocabulary(size={self.size}, tokens=[{head}{more}])"

    def lookup(self, tokens: Union[str, Iterable[str], np.ndarray]) -> np.ndarray:
        """Ids of ``tokens`` (any shape; a single ``str`` gives a 0-d array), int64.

        Unknown tokens map to ``OOV_ID`` (1). Vectorised via ``pandas.Index.get_indexer``.

        >>> Vocabulary(["a", "b"]).lookup([["b", "a"], ["?", "b"]]).tolist()
        [[3, 2], [1, 3]]
        """
        if isinstance(tokens, str):
            arr = np.empty((), dtype=object)
            arr[()] = tokens
        else:
            array_like = isinstance(tokens, (np.ndarray, pd.Series, pd.Index))
            arr = np.asarray(tokens if array_like else list(tokens), dtype=object)
        flat = arr.reshape(-1)
        pos = self._index.get_indexer(flat).astype(np.int64)
        ids = np.where(pos < 0, OOV_ID, pos + NUM_RESERVED).astype(np.int64)
        return ids.reshape(arr.shape)

    def to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Tokens of a 1-d sequence of ids: 0 -> "[PAD]", 1 -> "[OOV]".

        Raises ``ValueError`` for ids outside ``[0, size)``.
        """
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
        if ids.size and (not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.size)
        if bad.any():
            raise ValueError(
                f"ids out of range [0, {self.size}): {ids[bad][:5].tolist()}"
            )
        specials = {PAD_ID: PAD_TOKEN, OOV_ID: OOV_TOKEN}
        return [specials[i] if i < NUM_RESERVED else self.tokens[i - NUM_RESERVED] for i in ids.tolist()]

    def to_text(self) -> str:
        """File contents written by ``save``: one token per line, each followed by "\\n"."""
        for t in self.tokens:
            if "\n" in t or "\r" in t:
                raise ValueError(f"token {t!r} contains a newline; cannot store it in a vocabulary file")
        return "".join(t + "\n" for t in self.tokens)

    def save(self, path: PathLike) -> None:
        """Write the vocabulary file (UTF-8, line k = token with id k + 2).

        Tokens containing "\\n" or "\\r" raise ``ValueError`` (nothing is written).
        Local paths and ``tf.io.gfile`` URLs (``gs://...``) are supported.
        """
        text = self.to_text()
        with _open(path, "w") as f:
            f.write(text)

    @classmethod
    def from_text(cls, text: str, path: str = "<string>") -> "Vocabulary":
        """Parse ``to_text`` output (lines separated by "\\n" only)."""
        if text.endswith("\n"):
            text = text[:-1]
        lines = text.split("\n") if text else []
        for k, line in enumerate(lines):
            if line.endswith("\r"):  # tolerate CRLF files
                lines[k] = line = line[:-1]
            if line == "":
                raise ValueError(f"{path}: empty token at line {k + 1}")
        try:
            return cls(lines)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def load(cls, path: PathLike) -> "Vocabulary":
        """Read a file written by ``save``. Missing file -> ``FileNotFoundError`` naming it."""
        p = os.fspath(path)
        if "://" not in p and not os.path.isfile(p):
            raise FileNotFoundError(f"vocabulary file not found: {p}")
        with _open(p, "r") as f:
            text = f.read()
        return cls.from_text(text, path=p)
