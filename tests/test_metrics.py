"""Tests for tfrec.metrics: hand-computed cases, reference comparisons, error messages."""

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from tfrec import metrics as M

# Row 0: target 2 (0.3); 0.5 and 0.9 score higher, item 3 ties -> pessimistic rank 2 + 1 = 3.
# Row 1: constant model, target 4; the 4 other items all tie -> rank 4 (last), never 0.
SCORES = np.array([[0.1, 0.5, 0.3, 0.3, 0.9],
                   [0.2, 0.2, 0.2, 0.2, 0.2]])
TARGETS = np.array([2, 4])


def _reference_ranks(scores, targets, mask):
    """Brute force: #(valid others with score >= target score)."""
    return np.array([sum(1 for j, s in enumerate(row) if j != t and not m[j] and s >= row[t])
                     for row, t, m in zip(scores, targets, mask)])


@pytest.mark.parametrize("exclude, expected", [
    (None, [3, 4]),
    # ids 0/1 excluded: row 0 -> only 0.9 is higher, item 3 ties -> 2; row 1 -> items 2, 3 tie -> 2.
    ([0, 1], [2, 2]),
    (np.array([0, 1]), [2, 2]),
    ([], [3, 4]),
    # mask: row 0 drops items 3, 4 -> only 0.5 beats 0.3 -> 1; row 1 drops 0..3 -> 0.
    (np.array([[0, 0, 0, 1, 1], [1, 1, 1, 1, 0]], dtype=bool), [1, 0]),
    (np.array([1, 1, 0, 0, 0], dtype=bool), [2, 2]),  # 1-D mask shared by all rows
])
def test_target_ranks_pessimistic_ties_and_exclusion(exclude, expected):
    ranks = M.target_ranks(SCORES, TARGETS, exclude=exclude)
    assert ranks.dtype == np.int64
    np.testing.assert_array_equal(ranks, expected)


def test_target_ranks_matches_brute_force_across_chunks(monkeypatch):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(37, 11)).astype(np.float32)  # many ties
    targets = rng.integers(2, 11, size=37)
    mask = rng.random((37, 11)) < 0.3
    mask[np.arange(37), targets] = False
    expected = _reference_ranks(scores, targets, mask)
    np.testing.assert_array_equal(M.target_ranks(scores, targets, exclude=mask), expected)
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 25)  # 2 rows per chunk
    np.testing.assert_array_equal(M.target_ranks(scores, targets, exclude=mask), expected)


def test_target_ranks_constant_model_is_worst():
    metrics = M.full_ranking_metrics(np.zeros((3, 50)), np.array([2, 10, 49]), ks=(10,), exclude=[0, 1])
    assert metrics == {"hr@10": 0.0, "ndcg@10": 0.0, "mrr@10": 0.0}


def test_nan_in_excluded_items_is_ignored():
    scores = np.array([[np.nan, np.nan, 0.5, 0.2]])
    np.testing.assert_array_equal(M.target_ranks(scores, np.array([3]), exclude=[0, 1]), [1])


@pytest.mark.parametrize("scores, targets, exclude, match", [
    (SCORES, TARGETS, [0, 2], r"excluded in rows \[0\]"),
    (SCORES, TARGETS, np.array([[0, 0, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=bool), r"excluded in rows \[1\]"),
    (np.array([[0.1, 0.2], [np.nan, 0.3], [0.1, np.nan]]), np.array([0, 1, 0]), None, r"NaN scores in rows \[1, 2\]"),
    (SCORES, np.array([2, 5]), None, r"targets out of range \[0, 5\) in rows \[1\]"),
    (SCORES, np.array([2.0, 4.0]), None, "integer array"),
    (SCORES, np.array([2]), None, r"shape \(2,\)"),
    (SCORES[0], np.array([2]), None, r"\(n, num_items\)"),
    (SCORES, TARGETS, [7], r"exclude ids out of range"),
    (SCORES, TARGETS, np.ones((3, 5), dtype=bool), "boolean exclude mask"),
])
def test_target_ranks_errors(scores, targets, exclude, match):
    with pytest.raises(ValueError, match=match):
        M.target_ranks(scores, targets, exclude=exclude)


def test_ranking_metrics_hand_computed():
    # ranks [0, 1, 4, 10]:
    #   K=5 (and K=10: rank 10 is not < 10): hits = ranks 0, 1, 4
    #     HR   = 3/4 = 0.75
    #     NDCG = (1/log2(2) + 1/log2(3) + 1/log2(6)) / 4 = (1 + 0.6309297536 + 0.3868528072) / 4 = 0.5044456402
    #     MRR  = (1 + 1/2 + 1/5) / 4 = 1.7 / 4 = 0.425
    #   K=20: all hit
    #     HR   = 1
    #     NDCG = (2.0177825608 + 1/log2(12)) / 4 = (2.0177825608 + 0.2789429456) / 4 = 0.5741813766
    #     MRR  = (1.7 + 1/11) / 4 = 0.4477272727
    #   K=1: only rank 0 -> HR = NDCG = MRR = 1/4
    m = M.ranking_metrics_from_ranks(np.array([0, 1, 4, 10]), ks=(1, 5, 10, 20))
    expected = {"hr@1": 0.25, "hr@5": 0.75, "hr@10": 0.75, "hr@20": 1.0,
                "ndcg@1": 0.25, "ndcg@5": 0.5044456402, "ndcg@10": 0.5044456402, "ndcg@20": 0.5741813766,
                "mrr@1": 0.25, "mrr@5": 0.425, "mrr@10": 0.425, "mrr@20": 0.4477272727}
    assert list(m) == list(expected)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-9), key
        assert isinstance(m[key], float)


def test_default_ks_keys():
    assert M.DEFAULT_KS == (5, 10, 20)
    assert set(M.ranking_metrics_from_ranks(np.array([0]))) == {
        f"{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in (5, 10, 20)}


@pytest.mark.parametrize("ranks, ks, match", [
    (np.array([], dtype=np.int64), (5,), "non-empty"),
    (np.array([0.0, 1.0]), (5,), "integer"),
    (np.array([[0, 1]]), (5,), "1-D"),
    (np.array([0, -1]), (5,), "non-negative"),
    (np.array([0, 1]), (0,), "positive"),
    (np.array([0, 1]), (), "positive"),
])
def test_ranking_metrics_errors(ranks, ks, match):
    with pytest.raises(ValueError, match=match):
        M.ranking_metrics_from_ranks(ranks, ks)


def test_full_ranking_metrics_is_ranks_plus_metrics():
    # ranks with ids 0/1 excluded are [2, 2] -> HR@3 = 1, NDCG@3 = 1/log2(4) = 0.5, MRR@3 = 1/3
    m = M.full_ranking_metrics(SCORES, TARGETS, ks=(2, 3), exclude=[0, 1])
    assert m == pytest.approx({"hr@2": 0.0, "hr@3": 1.0, "ndcg@2": 0.0, "ndcg@3": 0.5, "mrr@2": 0.0, "mrr@3": 1 / 3})


def test_sampled_ranking_metrics_hand_computed():
    scores = np.array([[0.0, 0.0, 0.5, 0.9, 0.1, 0.5],
                       [0.0, 0.0, 0.7, 0.1, 0.2, 0.3]])
    # row 0: target 2 (0.5) vs negatives 3 (0.9, higher), 5 (0.5, tie) -> rank 2; item 4 is not a candidate
    # row 1: target 2 (0.7) vs negatives 3, 4 -> rank 0
    m = M.sampled_ranking_metrics(scores, np.array([2, 2]), np.array([[3, 5], [3, 4]]), ks=(1, 3))
    assert m == pytest.approx({"hr@1": 0.5, "hr@3": 1.0, "ndcg@1": 0.5, "ndcg@3": (1 + 0.5) / 2,
                               "mrr@1": 0.5, "mrr@3": (1 + 1 / 3) / 2})


@pytest.mark.parametrize("negatives, match", [
    (np.array([[3, 2], [3, 4]]), r"contain the target item in rows \[0\]"),
    (np.array([[3, 6], [3, 4]]), r"negatives out of range \[0, 6\) in rows \[0\]"),
    (np.array([[3, 4]]), "shape"),
    (np.array([3, 4]), r"shape \(2, 'num_negatives'\)"),
])
def test_sampled_ranking_metrics_errors(negatives, match):
    with pytest.raises(ValueError, match=match):
        M.sampled_ranking_metrics(np.zeros((2, 6)), np.array([2, 2]), negatives)


def test_sampled_nan_candidate_scores_raise():
    scores = np.array([[0.0, 0.0, 0.5, np.nan, 0.1]])
    with pytest.raises(ValueError, match=r"NaN scores in rows \[0\]"):
        M.sampled_ranking_metrics(scores, np.array([2]), np.array([[3, 4]]))


# ---------------------------------------------------------------- sample_negatives

HISTORIES = [np.array([2, 3, 4]), np.array([10, 11, 2, 2]), [], np.array([0, 1, 5])]


def test_sample_negatives_deterministic_by_seed():
    a = M.sample_negatives(60, HISTORIES, num_negatives=20, seed=7)
    np.testing.assert_array_equal(a, M.sample_negatives(60, HISTORIES, num_negatives=20, seed=7))
    assert not np.array_equal(a, M.sample_negatives(60, HISTORIES, num_negatives=20, seed=8))


@pytest.mark.parametrize("num_items, num_negatives", [(60, 20), (20, 11), (5000, 100)])
@pytest.mark.parametrize("strategy", ["uniform", "popularity"])
def test_sample_negatives_valid(num_items, num_negatives, strategy):
    rng = np.random.default_rng(1)
    histories = HISTORIES + [rng.integers(0, min(num_items, 40), size=rng.integers(0, 6)) for _ in range(300)]
    counts = np.arange(num_items) % 7  # every 7th item has count 0
    neg = M.sample_negatives(num_items, histories, num_negatives, strategy=strategy, item_counts=counts, seed=3)
    assert neg.shape == (len(histories), num_negatives) and neg.dtype == np.int64
    assert neg.min() >= 2 and neg.max() < num_items
    assert all(len(set(row)) == num_negatives for row in neg.tolist())
    assert all(not set(row) & set(np.asarray(h).tolist()) for row, h in zip(neg.tolist(), histories))
    if strategy == "popularity":
        assert not np.any(counts[neg] == 0)


def test_sample_negatives_no_users():
    assert M.sample_negatives(10, [], num_negatives=3).shape == (0, 3)


def test_sample_negatives_exact_when_available_equals_num_negatives():
    # 10 items, candidates 2..9 (8 items); history covers 3 of them -> the 5 others must all be drawn
    neg = M.sample_negatives(10, [np.array([2, 5, 9, 0])], num_negatives=5, seed=0)
    assert sorted(neg[0].tolist()) == [3, 4, 6, 7, 8]


def test_sample_negatives_uniform_is_roughly_uniform():
    neg = M.sample_negatives(22, [np.array([2])] * 4000, num_negatives=5, seed=0)
    freq = np.bincount(neg.ravel(), minlength=22)[3:] / neg.size  # 19 candidates, expected 1/19 each
    np.testing.assert_allclose(freq, 1 / 19, rtol=0.1)


def test_sample_negatives_popularity_prefers_frequent_items():
    counts = np.zeros(40)
    counts[:2] = 1e6  # padding/OOV are never candidates, whatever their count
    counts[2], counts[4:17], counts[17:30] = 1000, 20, 1  # 3 and 30..39 have count 0
    neg = M.sample_negatives(40, [np.array([5])] * 500, num_negatives=3, strategy="popularity",
                             item_counts=counts, seed=0)
    freq = np.bincount(neg.ravel(), minlength=40)
    assert freq[[0, 1, 3, 5]].sum() == 0 and freq[30:].sum() == 0  # zero count, padding, history
    assert freq[2] > 450  # P(item 2 in the first draw) = 1000 / 1500; over 3 draws ~ 0.98
    assert freq[4:17].sum() / 12 > 5 * freq[17:30].mean()  # item 5 is in the history


def test_sample_negatives_both_paths_are_uniform():
    # users 0..1499 exclude 2..170 (29 candidates left, too few for rejection -> Gumbel-top-k path);
    # users 1500..2999 exclude 2..100 (99 left -> rejection path). Both must be uniform on what is left.
    histories = [np.arange(2, 171)] * 1500 + [np.arange(2, 101)] * 1500
    neg = M.sample_negatives(200, histories, num_negatives=5, seed=0)
    hard, easy = np.bincount(neg[:1500].ravel(), minlength=200), np.bincount(neg[1500:].ravel(), minlength=200)
    assert hard[:171].sum() == 0 and easy[:101].sum() == 0
    np.testing.assert_allclose(hard[171:], 1500 * 5 / 29, rtol=0.2)
    np.testing.assert_allclose(easy[101:], 1500 * 5 / 99, rtol=0.35)


def test_sample_negatives_popularity_gumbel_path():
    counts = np.zeros(60)
    counts[2:51], counts[51:59], counts[59] = 1000, 1, 100  # history holds 2..50: >99% of the mass
    neg = M.sample_negatives(60, [np.arange(2, 51)] * 2000, num_negatives=3, strategy="popularity",
                             item_counts=counts, seed=0)
    freq = np.bincount(neg.ravel(), minlength=60)
    assert freq[:51].sum() == 0
    assert freq[59] > 0.95 * 2000  # P(59 first) = 100/108; ~0.998 over three draws
    np.testing.assert_allclose(freq[51:59], (3 * 2000 - freq[59]) / 8, rtol=0.25)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_items=8, histories=[np.array([2]), np.array([2, 3, 4])], num_negatives=4),
     r"users \[1\] have only \[3\] candidate items"),
    (dict(num_items=8, histories=[np.array([2])], num_negatives=2, strategy="popularity",
          item_counts=np.array([5, 5, 1, 1, 0, 0, 0, 0])), r"users \[0\] have only \[1\]"),
    (dict(num_items=8, histories=[np.array([2])], strategy="random"), "strategy"),
    (dict(num_items=8, histories=[np.array([2])], strategy="popularity"), "item_counts"),
    (dict(num_items=8, histories=[np.array([2])], strategy="popularity", item_counts=-np.ones(8)), "non-negative"),
    (dict(num_items=8, histories=[np.array([2]), np.array([8])], num_negatives=2), r"out of range .* users \[1\]"),
    (dict(num_items=8, histories=[np.array([2.5])], num_negatives=2), "integer"),
    (dict(num_items=8, histories=[np.array([2])], num_negatives=0), "num_negatives"),
])
def test_sample_negatives_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.sample_negatives(**kwargs)


def test_sample_negatives_then_sampled_metrics():
    rng = np.random.default_rng(0)
    targets = rng.integers(2, 300, size=50)
    neg = M.sample_negatives(300, [np.array([t]) for t in targets], num_negatives=100, seed=0)
    scores = np.zeros((50, 300))
    scores[np.arange(50), targets] = 1.0  # oracle
    assert M.sampled_ranking_metrics(scores, targets, neg, ks=(1,)) == {"hr@1": 1.0, "ndcg@1": 1.0, "mrr@1": 1.0}
    assert M.sampled_ranking_metrics(np.zeros((50, 300)), targets, neg, ks=(100, 101))["hr@101"] == 1.0


# ---------------------------------------------------------------- CTR metrics

@pytest.mark.parametrize("labels, preds, expected", [
    # pos-neg pairs: (.9>.8) (.9>.1) (.4<.8) (.4>.1) -> 3/4
    ([1, 0, 1, 0], [0.9, 0.8, 0.4, 0.1], 0.75),
    # tie: (.5=.5 -> 1/2) (.5>.1) (.9>.5) (.9>.1) -> 3.5/4
    ([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1], 0.875),
    ([1, 0, 0], [0.3, 0.3, 0.3], 0.5),
    ([0, 1], [0.9, 0.1], 0.0),
    ([True, False], [0.9, 0.1], 1.0),
])
def test_auc_hand_computed(labels, preds, expected):
    assert M.auc(np.array(labels), np.array(preds)) == pytest.approx(expected)


@pytest.mark.parametrize("rounding", [None, 1])
def test_auc_matches_sklearn(rounding):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    preds = rng.random(2000) + 0.3 * labels
    preds = preds if rounding is None else preds.round(rounding)  # rounding creates many ties
    assert M.auc(labels, preds) == pytest.approx(roc_auc_score(labels, preds), abs=1e-12)


def test_gauc_hand_computed():
    # group "a" (4 impressions): labels [1,0,1,0], preds [.9,.8,.4,.1] -> AUC 0.75
    # group "b" (2 impressions): labels [0,1], preds [.3,.6] -> AUC 1.0
    # group "c" (3 impressions): all negative -> skipped
    # GAUC = (4 * 0.75 + 2 * 1.0) / 6 = 5/6
    labels = np.array([1, 0, 0, 0, 1, 1, 0, 0, 0])
    preds = np.array([0.9, 0.3, 0.5, 0.8, 0.6, 0.4, 0.2, 0.1, 0.7])
    groups = np.array(["a", "b", "c", "a", "b", "a", "c", "a", "c"])
    assert M.gauc(labels, preds, groups) == pytest.approx(5 / 6)


def test_gauc_matches_per_group_sklearn():
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 30, 3000)
    labels = rng.integers(0, 2, 3000)
    preds = (rng.random(3000) + 0.2 * labels).round(2)
    num = den = 0.0
    for g in np.unique(groups):
        sel = groups == g
        if len(np.unique(labels[sel])) == 2:
            num += sel.sum() * roc_auc_score(labels[sel], preds[sel])
            den += sel.sum()
    assert M.gauc(labels, preds, groups) == pytest.approx(num / den, abs=1e-12)


@pytest.mark.parametrize("fn, args, match", [
    (M.auc, ([1, 1], [0.1, 0.2]), "single class"),
    (M.auc, ([1, 2], [0.1, 0.2]), "0/1"),
    (M.auc, ([1, 0], [0.1, np.nan]), "NaN"),
    (M.auc, ([1, 0], [0.1]), "equal length"),
    (M.auc, ([], []), "non-empty"),
    (M.gauc, ([1, 0, 1], [0.1, 0.2, 0.3], [0, 1, 2]), "none of the 3 groups"),
    (M.gauc, ([1, 0], [0.1, 0.2], [0]), "groups must have shape"),
    (M.logloss, ([1, 2], [0.1, 0.2]), r"\[0, 1\]"),
])
def test_ctr_metric_errors(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*(np.array(a) for a in args))


def test_logloss_hand_computed():
    # -(ln 0.8 + ln 0.7) / 2 = (0.2231435513 + 0.3566749439) / 2 = 0.2899092476
    assert M.logloss(np.array([1, 0]), np.array([0.8, 0.3])) == pytest.approx(0.2899092476)
    # clipping: prediction 0 for a positive -> -ln(1e-7) = 16.1180956510; prediction 1 for a negative likewise
    assert M.logloss(np.array([1, 0]), np.array([0.0, 1.0])) == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert M.logloss(np.array([1]), np.array([0.0]), eps=1e-3) == pytest.approx(-math.log(1e-3))


@pytest.mark.parametrize("extreme", [False, True])
def test_logloss_matches_sklearn(extreme):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 2000)
    preds = np.clip(rng.random(2000) * 0.8 + 0.2 * labels, 0.0, 1.0)
    if extreme:  # exact 0 and 1 predictions: ours clips to [1e-7, 1 - 1e-7], so clip for sklearn too
        preds[:50], preds[50:100] = 0.0, 1.0
    reference = log_loss(labels, np.clip(preds, 1e-7, 1 - 1e-7), labels=[0, 1])
    assert M.logloss(labels, preds) == pytest.approx(reference, rel=1e-9)


# ---------------------------------------------------------------- table

def test_format_metrics_table():
    rows = [{"model": "sasrec", "protocol": "full", "hr@10": 0.123456, "epochs": 3},
            {"model": "gru4rec-large", "protocol": "full", "hr@10": np.float32(0.5)}]
    table = M.format_metrics_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| model         | protocol |  hr@10 | epochs |"
    assert lines[1] == "|:--------------|:---------|-------:|-------:|"
    assert lines[2] == "| sasrec        | full     | 0.1235 |      3 |"
    assert lines[3] == "| gru4rec-large | full     | 0.5000 |        |"
    assert M.format_metrics_table(rows, columns=["hr@10", "model"]).splitlines()[2] == "| 0.1235 | sasrec        |"
    assert M.format_metrics_table([]) == ""


def test_format_metrics_table_refuses_mixed_protocols():
    rows = [{"model": "a", "protocol": "full", "hr@10": 0.1}, {"model": "a", "protocol": "sampled100", "hr@10": 0.6}]
    with pytest.raises(ValueError, match="protocols"):
        M.format_metrics_table(rows)
