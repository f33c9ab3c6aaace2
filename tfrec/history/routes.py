"""Stateful R2LED routes (issue 22 item 4): per-user buckets of recent behaviours per SID prefix.

R2LED's retrieval (``tfrec.layers.multi_route_retrieval``) gives every route a
SID prefix length ``l``; a behaviour *matches* a target at route ``l`` when their
first ``l`` codes are equal (a negative code never matches). A stateless request
scans the whole history for matches. With :class:`SIDRoutes` a history store
keeps, at append time and in the same transaction as the history itself, one
bucket per ``(user, level, prefix)`` holding that user's ``bucket_size`` most
recent behaviours whose SID starts with ``prefix`` (``level`` codes). A request
then reads, for each target, its ``len(levels)`` buckets plus the user's
``recent`` most recent behaviours (the collaborative view's fill), instead of the
whole history: cost bounded by ``targets * levels * bucket_size + recent`` events
whatever the history length.

What is exact (the condition the tests check): the gathered behaviours, in
chronological order, contain every behaviour the stateless retrieval over the
whole history would select for each target, whenever

1. no bucket a target reads overflowed (the user has at most ``bucket_size``
   behaviours sharing the target's prefix at each route level), so every
   semantic match is gathered; and
2. every route of every target has at least ``top_k`` matches (the "boost" mix
   then never fills with non-matches), or the whole history lies within the
   ``recent`` window.

The collaborative similarity is computed by the model over the gathered set, so
under 1 and 2 the scores are the stateless ones (ties go to the more recent
behaviour in both, as the chronological order is kept). Beyond them, the
stateful route is ours: the ``bucket_size`` most recent matches per prefix (the
paper's per-prefix retrieval ranks all matches by similarity; SIM/TWIN-style
online serving bounds the per-key lists the same way), and the non-match fill
comes from the most recent ``recent`` behaviours and the other gathered buckets.

An item without a SID in the map (or with a negative code at level ``l``) enters
no bucket of level ``>= l``; it stays in the plain history (reachable through the
``recent`` window only).

Example:
>>> routes = SIDRoutes({"a": (1, 2, 3), "b": (1, 4, -1)}, bucket_size=8)
>>> routes.keys("a"), routes.keys("b"), routes.keys("unknown")
(['1:1', '2:1.2', '3:1.2.3'], ['1:1', '2:1.4'], [])
>>> routes.levels
[1, 2, 3]
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

DEFAULT_BUCKET_SIZE = 64  # >= R2LED's default top_k of 32
DEFAULT_RECENT = 64  # most recent behaviours gathered beside the buckets (collaborative fill)
MAX_BUCKET_SIZE = 4096
MAX_LEVELS = 16
MAX_ITEMS = 10_000_000


class SIDRoutes:
    """Item token -> SID codes of a served model, and the bucket keys they give (see the module doc).

    Args:
        item_sids: mapping item token -> sequence of ``L`` int codes (coarse to fine; negative = none).
        levels: route prefix lengths (default ``1..L``, R2LED's default routes).
        bucket_size: ``int``, behaviours kept per bucket (default 64).
        recent: ``int``, most recent behaviours a request gathers beside the buckets (default 64).
        model: optional ``str``, the served model (its name in the server's model config) whose ``score``
            requests by user id use the buckets; other models keep reading the plain history.
    """

    def __init__(self, item_sids: Mapping[str, Sequence[int]], levels: Optional[Sequence[int]] = None,
                 bucket_size: int = DEFAULT_BUCKET_SIZE, recent: int = DEFAULT_RECENT, model: Optional[str] = None):
        if not isinstance(item_sids, Mapping) or not item_sids:
            raise ValueError("item_sids must be a non-empty mapping item token -> SID codes")
        if len(item_sids) > MAX_ITEMS:
            raise ValueError(f"item_sids has {len(item_sids)} items, more than the limit of {MAX_ITEMS}")
        widths = {len(codes) for codes in item_sids.values()}
        if len(widths) != 1:
            raise ValueError(f"every item needs the same number of SID levels, got {sorted(widths)}")
        num_levels = widths.pop()
        if not 1 <= num_levels <= MAX_LEVELS:
            raise ValueError(f"SIDs must have 1..{MAX_LEVELS} levels, got {num_levels}")
        sids: Dict[str, Tuple[int, ...]] = {}
        for item, codes in item_sids.items():
            if not isinstance(item, str) or not item:
                raise ValueError(f"item tokens must be non-empty strings, got {item!r}")
            try:
                sids[item] = tuple(int(c) for c in codes)
            except (TypeError, ValueError):
                raise ValueError(f"SID codes of item {item[:64]!r} must be integers, got {codes!r}") from None
        levels = list(range(1, num_levels + 1)) if levels is None else sorted({int(x) for x in levels})
        if not levels or levels[0] < 1 or levels[-1] > num_levels:
            raise ValueError(f"levels must be prefix lengths in 1..{num_levels}, got {levels}")
        if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or not 1 <= bucket_size <= MAX_BUCKET_SIZE:
            raise ValueError(f"bucket_size must be an int in [1, {MAX_BUCKET_SIZE}], got {bucket_size!r}")
        if isinstance(recent, bool) or not isinstance(recent, int) or not 1 <= recent <= MAX_BUCKET_SIZE:
            raise ValueError(f"recent must be an int in [1, {MAX_BUCKET_SIZE}], got {recent!r}")
        if model is not None and (not isinstance(model, str) or not model):
            raise ValueError(f"model must be a non-empty string or None, got {model!r}")
        self.sids, self.levels, self.bucket_size, self.num_levels = sids, levels, bucket_size, num_levels
        self.recent, self.model = recent, model
        digest = hashlib.sha256(f"{levels}|{bucket_size}|{recent}|{model}|".encode())
        for item in sorted(sids):
            digest.update(f"{item}\t{sids[item]}\n".encode())
        self.fingerprint = digest.hexdigest()[:32]

    def meta(self) -> dict:
        """What a store keeps beside the SID map (JSON-able); ``SIDRoutes(sids, **meta)`` restores it."""
        return {"levels": self.levels, "bucket_size": self.bucket_size, "recent": self.recent, "model": self.model}

    def keys(self, item: str) -> List[str]:
        """Bucket keys ``"<level>:<c1>.<c2>..."`` of ``item``, one per route level its SID reaches."""
        codes = self.sids.get(item)
        if codes is None:
            return []
        keys = []
        for level in self.levels:
            prefix = codes[:level]
            if min(prefix) < 0:  # a missing code ends the prefix: no finer bucket either
                break
            keys.append(f"{level}:" + ".".join(str(c) for c in prefix))
        return keys

    def target_keys(self, targets: Sequence[str]) -> List[str]:
        """The distinct bucket keys a request for ``targets`` reads, in first-seen order."""
        seen = {}
        for item in targets:
            for key in self.keys(item):
                seen.setdefault(key, None)
        return list(seen)


def load_sid_routes(path: str, levels=None, bucket_size: int = DEFAULT_BUCKET_SIZE, recent: int = DEFAULT_RECENT,
                    model: Optional[str] = None) -> SIDRoutes:
    """:class:`SIDRoutes` of a TSV file ``item<TAB>c1 c2 ... cL`` (one item a line; what
    :func:`write_sid_file` writes). ``ValueError`` naming the line otherwise.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "sids.tsv")
    >>> write_sid_file(path, {"a": (1, 2), "b": (3, -1)})
    >>> load_sid_routes(path).keys("b")
    ['1:3']
    """
    sids = {}
    try:
        handle = open(path, encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot read SID file {path}: {err.strerror}") from None
    with handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise ValueError(f"{path} line {number}: expected item<TAB>space-separated codes")
            try:
                sids[parts[0]] = tuple(int(c) for c in parts[1].split())
            except ValueError:
                raise ValueError(f"{path} line {number}: SID codes must be integers") from None
    try:
        return SIDRoutes(sids, levels, bucket_size, recent, model)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def write_sid_file(path: str, item_sids: Mapping[str, Sequence[int]]) -> None:
    """Write ``item<TAB>codes`` lines (see :func:`load_sid_routes`), atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        for item, codes in item_sids.items():
            handle.write(f"{item}\t{' '.join(str(int(c)) for c in codes)}\n")
    os.replace(tmp, path)


def model_sid_map(item_sids, item_vocab: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """``{token: codes}`` of a model's ``item_sids (V, L)`` table whose rows are the reserved ids
    (padding, OOV: ``tfrec.data.vocab.NUM_RESERVED``) then ``item_vocab`` in order (``tfrec`` item ids).

    >>> import numpy as np
    >>> model_sid_map(np.array([[-1, -1], [-1, -1], [3, 4]]), ["a"])
    {'a': (3, 4)}
    """
    import numpy as np

    from tfrec.data.vocab import NUM_RESERVED as num_reserved

    table = np.asarray(item_sids)
    if table.ndim != 2 or table.shape[0] != len(item_vocab) + num_reserved:
        raise ValueError(f"item_sids has shape {table.shape}, expected ({len(item_vocab) + num_reserved}, L)")
    return {token: tuple(int(c) for c in table[i + num_reserved]) for i, token in enumerate(item_vocab)}
