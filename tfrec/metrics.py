"""Ranking and CTR metrics, vectorised in numpy (inputs are numpy arrays).

Ranking (next-item task, exactly one relevant item per row). ``rank`` is the
0-based position of the target among the candidates, computed PESSIMISTICALLY::

    rank = #(candidates scoring > target) + #(other candidates scoring == target)

A tie is always resolved against the target, so a constant (or collapsed) model
ranks every target last instead of scoring perfectly by luck of the sort order.

- ``hr@K``   = mean(rank < K)                               (hit rate / recall@K)
- ``ndcg@K`` = mean(1 / log2(rank + 2) if rank < K else 0)  (ideal DCG is 1)
- ``mrr@K``  = mean(1 / (rank + 1) if rank < K else 0)

Protocols: "full" ranks the target against the whole catalogue (minus excluded ids
such as padding 0 and OOV 1); "sampled100" ranks it against 100 negatives drawn by
:func:`sample_negatives`. Sampled numbers are much higher and not comparable, so the
two protocols must never be mixed in one table: callers label every result row with
``"protocol": "full"`` or ``"sampled100"``; :func:`format_metrics_table` refuses a mix.

CTR: ``auc`` is ROC AUC (Mann-Whitney U; tied predictions get their average rank,
i.e. a tied positive/negative pair counts 1/2); ``gauc`` is the per-group AUC
weighted by group size (impressions), skipping single-class groups; ``logloss`` is
the mean binary cross-entropy with predictions clipped to [eps, 1 - eps].

>>> import numpy as np
>>> scores = np.array([[0.0, 0.0, 0.3, 0.9, 0.3]])
>>> target_ranks(scores, np.array([2]), exclude=[0, 1])  # 0.9 beats it, 0.3 ties
array([2])
>>> full_ranking_metrics(scores, np.array([2]), ks=(1, 5), exclude=[0, 1])["hr@5"]
1.0
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["DEFAULT_KS", "target_ranks", "ranking_metrics_from_ranks", "full_ranking_metrics", "sample_negatives",
           "sampled_target_ranks", "sampled_ranking_metrics", "auc", "gauc", "logloss", "format_metrics_table"]

DEFAULT_KS = (5, 10, 20)
_CHUNK_ELEMENTS = 1 << 22  # score cells processed at once (bounds temporary memory)


def _head(idx, limit: int = 10) -> str:
    idx = [int(i) for i in np.asarray(idx).ravel()]
    return str(idx[:limit])[:-1] + (f", ... ({len(idx)} in total)]" if len(idx) > limit else "]")


def _check_scores(scores) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] == 0 or not np.issubdtype(scores.dtype, np.number):
        raise ValueError(f"scores must be a numeric (n, num_items) array, got {scores.dtype} {scores.shape}")
    return scores


def _check_ids(ids, shape, high: int, name: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.shape != shape or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"{name} must be an integer array of shape {shape}, got {ids.dtype} {ids.shape}")
    bad = np.flatnonzero(((ids < 0) | (ids >= high)).reshape(len(ids), -1).any(axis=1)) if ids.size else []
    if len(bad):
        raise ValueError(f"{name} out of range [0, {high}) in rows {_head(bad)}")
    return ids.astype(np.int64)


def _raise_on_nan(values: np.ndarray, offset: int = 0, ignore: np.ndarray | None = None) -> None:
    if values.size and np.issubdtype(values.dtype, np.floating):
        bad = np.flatnonzero((np.isnan(values) if ignore is None else np.isnan(values) & ~ignore).any(axis=1))
        if bad.size:
            raise ValueError(f"NaN scores in rows {_head(bad + offset)}")


def _exclude_mask(exclude, n: int, num_items: int) -> np.ndarray:
    """(n, num_items) or (1, num_items) boolean mask."""
    ex = np.asarray([] if exclude is None else exclude)
    if ex.dtype == bool:
        if ex.shape not in ((n, num_items), (num_items,)):
            raise ValueError(f"boolean exclude mask must have shape {(n, num_items)}, got {ex.shape}")
        return ex.reshape(-1, num_items)
    mask = np.zeros((1, num_items), dtype=bool)
    mask[0, _check_ids(ex.ravel(), (ex.size,), num_items, "exclude ids")] = True
    return mask


def target_ranks(scores, targets, exclude=None) -> np.ndarray:
    """0-based pessimistic rank of ``targets[i]`` within ``scores[i]``; int64 (n,).

    ``exclude`` is a boolean mask (n, num_items) -- or (num_items,) shared by all
    rows -- or a list of column ids excluded for everyone (e.g. ``[0, 1]``).
    Excluded items never outrank the target, and their scores may be NaN.

    >>> target_ranks(np.array([[0.1, 0.5, 0.3, 0.3]]), np.array([2]))  # 0.5 > and one tie
    array([2])
    """
    scores = _check_scores(scores)
    n, num_items = scores.shape
    targets = _check_ids(targets, (n,), num_items, "targets")
    mask = _exclude_mask(exclude, n, num_items)
    hit = np.flatnonzero(mask[np.arange(n) % len(mask), targets])
    if hit.size:
        raise ValueError(f"target item is excluded in rows {_head(hit)}")
    ranks = np.empty(n, dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // num_items)
    for start in range(0, n, step):
        s, t, rows = scores[start:start + step], targets[start:start + step], np.arange(min(step, n - start))
        m = mask[start:start + step] if len(mask) > 1 else mask
        _raise_on_nan(s, start, ignore=m)
        ranks[start:start + step] = np.count_nonzero((s >= s[rows, t][:, None]) & ~m, axis=1) - 1  # minus target
    return ranks


def ranking_metrics_from_ranks(ranks, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """``hr@K``, ``ndcg@K``, ``mrr@K`` (in that order, for each K) from 0-based ranks.

    >>> ranking_metrics_from_ranks(np.array([0, 3]), ks=(1,))
    {'hr@1': 0.5, 'ndcg@1': 0.5, 'mrr@1': 0.5}
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0 or not np.issubdtype(ranks.dtype, np.integer) or ranks.min() < 0:
        raise ValueError(f"ranks must be a non-empty 1-D array of non-negative integers, got {ranks.dtype} "
                         f"{ranks.shape} with minimum {ranks.min() if ranks.size else None}")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")
    r = ranks.astype(np.float64)
    gains = {"hr": np.ones_like(r), "ndcg": 1.0 / np.log2(r + 2.0), "mrr": 1.0 / (r + 1.0)}
    return {f"{name}@{k}": float(np.where(ranks < k, g, 0.0).mean()) for name, g in gains.items() for k in ks}


def full_ranking_metrics(scores, targets, ks: Iterable[int] = DEFAULT_KS, exclude=None) -> dict[str, float]:
    """Full-catalogue protocol: ``ranking_metrics_from_ranks(target_ranks(...), ks)``."""
    return ranking_metrics_from_ranks(target_ranks(scores, targets, exclude), ks)


def _first_occurrence(a: np.ndarray) -> np.ndarray:
    """Row-wise mask that is True at the first occurrence of every value."""
    order = np.argsort(a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, axis=1)
    out = np.empty(a.shape, dtype=bool)
    np.put_along_axis(out, order, np.concatenate([s[:, :1] == s[:, :1], s[:, 1:] != s[:, :-1]], axis=1), axis=1)
    return out


def sample_negatives(num_items: int, histories: Sequence, num_negatives: int = 100, strategy: str = "uniform",
                     item_counts=None, seed: int = 0, first_valid_id: int = 2) -> np.ndarray:
    """Draw ``num_negatives`` distinct negative ids per user; int64 (n_users, num_negatives).

    Candidates are ids in ``[first_valid_id, num_items)`` not in the user's history (which
    should contain the target(s)). ``strategy="uniform"`` draws them uniformly; ``"popularity"``
    proportionally to ``item_counts`` (length num_items; zero-count items are never drawn).
    The draw equals sequential sampling without replacement and is fixed by ``seed``. It is
    vectorised rejection sampling (oversampled draws, invalid and duplicate ids dropped, rows
    that fall short extended with more draws). Rows whose history covers most of the sampling
    mass, or still short after ``cap`` draws, use Gumbel-top-k over the whole catalogue.

    >>> sample_negatives(10, [np.array([2, 3]), np.array([9])], num_negatives=3, seed=1).shape
    (2, 3)
    """
    if strategy not in ("uniform", "popularity"):
        raise ValueError(f"strategy must be 'uniform' or 'popularity', got {strategy!r}")
    if not 0 <= first_valid_id < num_items or num_negatives < 1:
        raise ValueError(f"need 0 <= first_valid_id ({first_valid_id}) < num_items ({num_items}) "
                         f"and num_negatives ({num_negatives}) >= 1")
    counts = np.ones(num_items) if strategy == "uniform" else np.asarray(
        [] if item_counts is None else item_counts, dtype=np.float64)
    if counts.shape != (num_items,) or not np.all(counts >= 0):
        raise ValueError(f"popularity needs non-negative item_counts of shape ({num_items},), got {counts.shape}")
    weights = np.where(np.arange(num_items) >= first_valid_id, counts, 0.0)
    n = len(histories)
    arrays = [np.asarray(h).ravel() for h in histories]
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=n)
    flat = np.concatenate([a for a in arrays if a.size] or [np.zeros(0, dtype=np.int64)])
    if flat.size and not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"histories must hold integer item ids, got {flat.dtype}")
    owner = np.repeat(np.arange(n), lengths)
    if flat.size and (flat.min() < 0 or flat.max() >= num_items):
        raise ValueError(f"history ids out of range [0, {num_items}) for users "
                         f"{_head(np.unique(owner[(flat < 0) | (flat >= num_items)]))}")
    keys = np.unique(owner * num_items + flat.astype(np.int64))  # sorted (user, item) pairs to avoid
    key_user, key_item = np.divmod(keys, num_items)
    allowed = weights > 0
    available = allowed.sum() - np.bincount(key_user[allowed[key_item]], minlength=n)
    short = np.flatnonzero(available < num_negatives)
    if short.size:
        raise ValueError(f"users {_head(short)} have only {_head(available[short])} candidate items "
                         f"outside their history, fewer than num_negatives={num_negatives}")
    rng, probs = np.random.default_rng(seed), weights / weights.sum()
    accept = 1.0 - np.bincount(key_user, weights=probs[key_item], minlength=n)  # P(a draw is not in history)
    out = np.empty((n, num_negatives), dtype=np.int64)
    need = np.ceil(1.25 * num_negatives / np.maximum(accept, 1e-9)) + 10  # oversampled draws per row
    cap = max(num_items // 4, 4 * num_negatives)  # beyond this, Gumbel-top-k over the catalogue is cheaper
    easy, leftovers = np.flatnonzero(need <= cap), [np.flatnonzero(need > cap)]
    step = max(1, _CHUNK_ELEMENTS // (2 * cap))
    for start in range(0, easy.size, step):  # blocks of rows bound the memory
        todo = easy[start:start + step]
        pending, width = np.zeros((todo.size, 0), dtype=np.int64), int(np.quantile(need[todo], 0.9))
        while todo.size and pending.shape[1] + width <= cap:
            draws = (rng.integers(first_valid_id, num_items, size=(todo.size, width)) if strategy == "uniform"
                     else rng.choice(num_items, size=(todo.size, width), p=probs))
            pending = np.concatenate([pending, draws], axis=1)  # extend rows: one long sequential draw
            q = todo[:, None] * num_items + pending
            ok = allowed[pending] & _first_occurrence(pending)
            if keys.size:
                ok &= keys[np.minimum(np.searchsorted(keys, q), keys.size - 1)] != q
            csum = np.cumsum(ok, axis=1)
            done = csum[:, -1] >= num_negatives
            out[todo[done]] = pending[done][(ok & (csum <= num_negatives))[done]].reshape(-1, num_negatives)
            todo, pending, width = todo[~done], pending[~done], pending.shape[1]
        leftovers.append(todo)
    todo = np.concatenate(leftovers)
    if todo.size:  # Gumbel-top-k: exact weighted sampling without replacement, chunked over rows
        log_w = np.where(allowed, np.log(np.maximum(weights, 1e-300)), -np.inf)
        lo, hi = np.searchsorted(key_user, todo), np.searchsorted(key_user, todo, side="right")
        step = max(1, _CHUNK_ELEMENTS // num_items)
        for start in range(0, todo.size, step):
            c_lo, cnt = lo[start:start + step], (hi - lo)[start:start + step]
            idx = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt - c_lo, cnt)
            keyed = log_w + rng.gumbel(size=(cnt.size, num_items))
            keyed[np.repeat(np.arange(cnt.size), cnt), key_item[idx]] = -np.inf
            out[todo[start:start + step]] = np.argpartition(-keyed, num_negatives - 1, axis=1)[:, :num_negatives]
    return out


def sampled_target_ranks(scores, targets, negatives) -> np.ndarray:
    """Sampled protocol ranks: each target among itself + its negatives (pessimistic ties).

    ``scores`` is the FULL score matrix (n, num_items); ``targets`` (n,) and
    ``negatives`` (n, num_negatives) are item ids (columns of ``scores``), e.g.
    from :func:`sample_negatives`. A negative equal to the target is an error.

    >>> scores = np.array([[0.0, 0.0, 0.5, 0.9, 0.1]])
    >>> sampled_target_ranks(scores, np.array([2]), np.array([[3, 4]]))
    array([1])
    """
    scores = _check_scores(scores)
    n, num_items = scores.shape
    targets = _check_ids(targets, (n,), num_items, "targets")
    negatives = np.asarray(negatives)
    negatives = _check_ids(negatives, (n, negatives.shape[-1] if negatives.ndim == 2 else "num_negatives"),
                           num_items, "negatives")
    if (clash := np.flatnonzero((negatives == targets[:, None]).any(axis=1))).size:
        raise ValueError(f"negatives contain the target item in rows {_head(clash)}")
    cand = np.concatenate([scores[np.arange(n), targets][:, None], np.take_along_axis(scores, negatives, 1)], 1)
    _raise_on_nan(cand)
    return np.count_nonzero(cand[:, 1:] >= cand[:, :1], axis=1)


def sampled_ranking_metrics(scores, targets, negatives, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Metrics of :func:`sampled_target_ranks` (same arguments).

    >>> scores = np.array([[0.0, 0.0, 0.5, 0.9, 0.1]])
    >>> sampled_ranking_metrics(scores, np.array([2]), np.array([[3, 4]]), ks=(1, 2))["hr@2"]
    1.0
    """
    return ranking_metrics_from_ranks(sampled_target_ranks(scores, targets, negatives), ks)


def _check_binary(labels, predictions, name: str = "predictions"):
    y, p = np.asarray(labels), np.asarray(predictions, dtype=np.float64)
    if y.ndim != 1 or y.shape != p.shape or y.size == 0:
        raise ValueError(f"labels and {name} must be non-empty 1-D arrays of equal length, got {y.shape}, {p.shape}")
    if np.isnan(p).any():
        raise ValueError(f"NaN {name} at {_head(np.flatnonzero(np.isnan(p)))}")
    return y, p


def _grouped_auc(y: np.ndarray, p: np.ndarray, group: np.ndarray, n_groups: int):
    """Per-group Mann-Whitney AUC (average ranks for ties), with positive/negative counts."""
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got values {np.unique(y)[:10]}")
    order = np.lexsort((p, group))
    g, ps, ys = group[order], p[order], y[order].astype(np.float64)
    run = np.cumsum(np.r_[True, (g[1:] != g[:-1]) | (ps[1:] != ps[:-1])]) - 1  # runs of tied predictions
    position = np.arange(len(g)) - np.searchsorted(g, g) + 1.0  # 1-based rank inside the group
    avg_rank = (np.bincount(run, weights=position) / np.bincount(run))[run]
    pos = np.bincount(g, weights=ys, minlength=n_groups)
    neg = np.bincount(g, minlength=n_groups) - pos
    rank_sum = np.bincount(g, weights=avg_rank * ys, minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (rank_sum - pos * (pos + 1) / 2) / (pos * neg), pos, neg


def auc(labels, predictions) -> float:
    """ROC AUC = P(score(pos) > score(neg)) + 0.5 P(tie).

    >>> auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.4, 0.1]))
    0.75
    """
    y, p = _check_binary(labels, predictions)
    value, pos, neg = _grouped_auc(y, p, np.zeros(len(y), dtype=np.int64), 1)
    if pos[0] == 0 or neg[0] == 0:
        raise ValueError("AUC is undefined when labels contain a single class")
    return float(value[0])


def gauc(labels, predictions, groups) -> float:
    """Group AUC: sum_g n_g * AUC_g / sum_g n_g over groups having both classes.

    >>> gauc(np.array([1, 0, 1, 1]), np.array([0.9, 0.1, 0.2, 0.3]), np.array(["a", "a", "b", "b"]))
    1.0
    """
    y, p = _check_binary(labels, predictions)
    groups = np.asarray(groups)
    if groups.shape != y.shape:
        raise ValueError(f"groups must have shape {y.shape}, got {groups.shape}")
    uniq, group = np.unique(groups, return_inverse=True)
    value, pos, neg = _grouped_auc(y, p, group.ravel(), len(uniq))
    valid = (pos > 0) & (neg > 0)
    if not valid.any():
        raise ValueError(f"GAUC is undefined: none of the {len(uniq)} groups has both positive and negative labels")
    size = (pos + neg)[valid]
    return float(np.sum(value[valid] * size) / size.sum())


def logloss(labels, predictions, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy with predictions clipped to [eps, 1 - eps].

    >>> round(logloss(np.array([1, 0]), np.array([0.8, 0.3])), 6)
    0.289909
    """
    y, p = _check_binary(labels, predictions)
    y, p = y.astype(np.float64), np.clip(p, eps, 1.0 - eps)
    if ((y < 0) | (y > 1)).any():
        raise ValueError("labels must lie in [0, 1]")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def format_metrics_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """Markdown table (aligned, floats to 4 decimals, missing cells blank).

    Rows with different ``"protocol"`` values raise ValueError (never mix them).

    >>> print(format_metrics_table([{"model": "sasrec", "protocol": "full", "hr@10": 0.123456}]))
    | model  | protocol |  hr@10 |
    |:-------|:---------|-------:|
    | sasrec | full     | 0.1235 |
    """
    protocols = {str(r["protocol"]) for r in rows if r.get("protocol") is not None}
    if len(protocols) > 1:
        raise ValueError(f"full-ranking and sampled results must not share a table, got protocols {sorted(protocols)}")
    columns = list(dict.fromkeys(k for r in rows for k in r)) if columns is None else list(columns)
    if not columns:
        return ""
    cells = [[r.get(c) for c in columns] for r in rows]
    body = [["" if v is None else f"{v:.4f}" if isinstance(v, (float, np.floating)) else str(v) for v in row]
            for row in cells]
    numeric = [any(row[i] is not None for row in cells) and
               all(row[i] is None or isinstance(row[i], (int, float, np.number)) for row in cells)
               for i in range(len(columns))]
    widths = [max([len(str(c))] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]

    def line(row) -> str:
        return "| " + " | ".join(x.rjust(w) if num else x.ljust(w) for x, w, num in zip(row, widths, numeric)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if num else ":" + "-" * (w + 1) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line([str(c) for c in columns]), rule] + [line(b) for b in body])
