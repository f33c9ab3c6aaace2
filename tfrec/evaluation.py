"""Leave-one-out evaluation of next-item models under labelled protocols.

`SequentialEvaluator` scores every evaluated user's history against the whole
catalog in batches (users sorted by history length, each batch trimmed to its
longest history) and computes, per protocol:

- `"full"`: rank of the target among all items (padding/OOV never rank;
  history items ranked too unless `exclude_history=True`);
- `"sampled<N>"` (e.g. `"sampled100"`): rank among N negatives fixed per user by
  seed (`tfrec.metrics.sample_negatives`, uniform or popularity), drawn outside
  the user's history and target.

Results are `{protocol: {"hr@10": ..., ...}}`, never mixed.
"""

import re
import weakref

import numpy as np
import tensorflow as tf

from tfrec import metrics
from tfrec.data.pipelines import pad_right
from tfrec.data.vocab import NUM_RESERVED


def _sampled_size(protocol):
    match = re.fullmatch(r"sampled(\d+)", protocol)
    if protocol != "full" and not match:
        raise ValueError(f"unknown protocol {protocol!r}; use 'full' or 'sampled<N>', e.g. 'sampled100'")
    return int(match.group(1)) if match else None


class SequentialEvaluator:
    """Ranking metrics of a `NextItemRecommender` on (history, target) pairs.

    Args:
        histories: list of 1-D int arrays, each user's items before the target.
        targets: int array `(n,)` of target item ids.
        vocab_size: int, item vocabulary size (including reserved ids).
        max_length: int, window the model reads (longer histories are cut).
        protocols: iterable of `"full"` / `"sampled<N>"`.
        ks: cut-offs.
        exclude_history: bool, drop the user's history items from full ranking.
        negative_sampling: `"uniform"` or `"popularity"` for sampled protocols.
        item_counts: `(vocab_size,)` counts, required for popularity sampling.
        seed: int, fixes the sampled negatives.
        batch_size: users scored at once.

    Example:
    >>> import numpy as np
    >>> from tfrec.layers import IdItemEncoder, SASRecBackbone
    >>> from tfrec.models.next_item import NextItemRecommender
    >>> model = NextItemRecommender(IdItemEncoder(6, 8), SASRecBackbone(5, num_layers=1), max_length=5)
    >>> ev = SequentialEvaluator([np.array([2, 3])], np.array([4]), vocab_size=6, max_length=5)
    >>> sorted(ev.evaluate(model)["full"])[:2]
    ['hr@10', 'hr@20']
    """

    def __init__(
        self,
        histories,
        targets,
        vocab_size,
        max_length,
        protocols=("full",),
        ks=metrics.DEFAULT_KS,
        exclude_history=False,
        negative_sampling="uniform",
        item_counts=None,
        seed=0,
        batch_size=1024,
    ):
        targets = np.asarray(targets, np.int64)
        if len(histories) != len(targets) or len(targets) == 0:
            raise ValueError(
                f"need one history per target and at least one user, got {len(histories)} histories, {len(targets)} targets"
            )
        empty = [i for i, h in enumerate(histories) if len(h) == 0]
        if empty:
            raise ValueError(f"histories must not be empty; empty at users {empty[:10]}")
        self.ks = tuple(ks)
        self.protocols = tuple(protocols)
        self.exclude_history = exclude_history
        self.batch_size = int(batch_size)
        self.vocab_size = int(vocab_size)
        order = np.argsort([min(len(h), max_length) for h in histories], kind="stable")
        self.histories = [np.asarray(histories[i], np.int64) for i in order]
        self.targets = targets[order]
        self.max_length = int(max_length)
        self._score_fns = weakref.WeakKeyDictionary()  # model -> compiled score_items
        self.negatives = {}
        for protocol in self.protocols:
            size = _sampled_size(protocol)
            if size:
                self.negatives[protocol] = metrics.sample_negatives(
                    self.vocab_size,
                    [np.append(h, t) for h, t in zip(self.histories, self.targets)],
                    num_negatives=size,
                    strategy=negative_sampling,
                    item_counts=item_counts,
                    seed=seed,
                    first_valid_id=NUM_RESERVED,
                )

    def _batches(self):
        for start in range(0, len(self.targets), self.batch_size):
            stop = min(start + self.batch_size, len(self.targets))
            batch = self.histories[start:stop]
            width = min(self.max_length, max(len(h) for h in batch))
            yield start, stop, pad_right(batch, width)

    def evaluate(self, model):
        """`{protocol: metrics}` for `model` (anything with `score_items(history_ids)`)."""
        return {
            protocol: metrics.ranking_metrics_from_ranks(ranks, self.ks)
            for protocol, ranks in self.ranks(model).items()
        }

    def ranks(self, model):
        """`{protocol: ranks}`: the 0-based rank of each target, aligned with `self.targets`.

        `self.targets` is in evaluation order (users sorted by history length),
        so per-user breakdowns (e.g. by target popularity) index both alike.
        """
        score = self._score_fns.get(model)
        if score is None:
            score = self._score_fns[model] = tf.function(model.score_items, reduce_retracing=True)
        ranks = {p: [] for p in self.protocols}
        for start, stop, window in self._batches():
            scores = score(tf.constant(window)).numpy()  # (batch, vocab)
            targets = self.targets[start:stop]
            for protocol in self.protocols:
                if protocol == "full":
                    exclude = list(range(NUM_RESERVED))  # padding and OOV
                    if self.exclude_history:
                        exclude = np.zeros(scores.shape, bool)
                        exclude[:, :NUM_RESERVED] = True
                        for row, history in enumerate(self.histories[start:stop]):
                            exclude[row, history] = True
                        exclude[np.arange(len(targets)), targets] = False
                    ranks[protocol].append(metrics.target_ranks(scores, targets, exclude=exclude))
                else:
                    negatives = self.negatives[protocol][start:stop]
                    ranks[protocol].append(metrics.sampled_target_ranks(scores, targets, negatives))
        return {protocol: np.concatenate(r) for protocol, r in ranks.items()}
