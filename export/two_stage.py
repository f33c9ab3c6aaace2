"""Two-stage recommendation as one endpoint: retrieval candidates re-ranked by a CTR model.

`TwoStageServable` is a composite Python servable (`export.server.servable.PythonServable`)
that answers one request with three calls to other models of the same server:

1. **recommender** (`export_sequential`), signature `user_embedding`: the request
   history -> the user's query embedding;
2. **retrieval** (`export_index`, brute force or ScaNN), signature `retrieve`:
   the embedding -> the retrieval servable's top items; items of the history and
   empty slots are dropped and the first `candidates` (default 100) kept, in
   retrieval order;
3. **ranker** (`export_ctr`), signature `score`: the request history, its
   feedback (`history_ratings`, `history_labels`, `history_timestamps`), the
   request `timestamp` and `user`, passed through unchanged, and those
   candidates -> click probabilities; the `k` (default 10) most probable
   candidates are returned, best first (ties keep retrieval order).

Signatures:

- `recommend` (also `serving_default`): `history: string (batch, None)` (item
  tokens, oldest first, padded with `""`) and the ranker's feedback inputs
  (`tfrec.serving.CTR_FEEDBACK_INPUTS`: `history_ratings`, `history_labels`
  float32 and `history_timestamps` int64, each the shape of `history`;
  `timestamp` int64 and `user` string, `(batch,)`; all required, as in the
  ranker's `score`) -> `item_ids: string (batch, k)`,
  `scores: float32 (batch, k)` (ranker probabilities), `retrieval_scores:
  float32 (batch, k)` (the retrieval servable's scores of the same items) and
  `num_candidates: int32 (batch,)` (candidates the ranker scored).
- `recommend_k`: the same plus `k: int32 ()` (1..`candidates`) -> outputs with
  `k` columns.
- On a server with a history store (`tfrec serve --history_store ...`), both
  accept `user_id: string (batch,)` instead of `history` and its feedback: the
  server reads the users' recent events (items, feedback, timestamps; `timestamp`
  = the request's if sent, else the server's clock) and the answer equals the one
  for that history (`export.server.user_history`).

A slot no candidate can fill (the retrieval answer held fewer than `k` items
outside the history) holds item `""` with `scores` and `retrieval_scores`
`EXCLUDED_SCORE`, as in every `tfrec.serving` signature. The retrieval servable's
`k` (fixed at its export: `tfrec export --k N`) bounds the candidates: export it
with `k >= candidates + ` the history items you expect to exclude (a warning
is logged once when it returns fewer than `candidates` columns).

Batching: with server-side batching on, concurrent two-stage requests are merged
where they enter (like any servable, `export.server.batching`), and the merged
batch runs the three stages as three model calls: the inner models are called
inside the batch, unbatched (one history padding, one Python round trip per
stage for the whole batch, no stacked batch timeouts). The `recommend_k`
signature (a scalar `k` input) cannot be merged; its inner calls are batched by
the inner models instead.

Errors: an inner model's error keeps its status code (e.g. a history without
any known item -> INVALID_ARGUMENT from the recommender) and its message is
prefixed with the stage and model; an inner model that is not loaded
(NOT_FOUND from the server) becomes UNAVAILABLE: the two-stage model exists,
one of its dependencies does not serve yet.

Configuration (TF Serving model config file; options as a URL query of
`base_path`, every one optional, defaults shown)::

    model_config_list {
      config { name: 'recommender' base_path: '/servables/recommender' model_platform: 'tensorflow' }
      config { name: 'retrieval_bruteforce' base_path: '/servables/retrieval_bruteforce'
               model_platform: 'tensorflow' }
      config { name: 'ranker' base_path: '/servables/ranker' model_platform: 'tensorflow' }
      config {
        name: 'two_stage'
        base_path: 'export.two_stage:factory?recommender=recommender&retrieval=retrieval_bruteforce&ranker=ranker&candidates=100&k=10'
        model_platform: 'python'
      }
    }

served with `tfrec serve --model_config_file ... --allowed_python_modules export.two_stage`
(python servables come only from modules the command line allows).

Example (not run as a doctest: `context` is a live serving core holding the exported
`recommender`, `retrieval_bruteforce` and `ranker` models; `tests/test_two_stage.py` builds one):
>>> servable = factory("two_stage", context, ranker="ranker", k="5")  # doctest: +SKIP
>>> servable.run("recommend", {"history": np.array([[b"i1", b"i7", b""]], dtype=object),
...     "history_ratings": np.array([[5.0, 0.0, 0.0]], np.float32),
...     "history_labels": np.array([[1.0, 1.0, 0.0]], np.float32),
...     "history_timestamps": np.array([[100, 200, 0]]), "timestamp": np.array([300]),
...     "user": np.array([b"u1"], dtype=object)})["item_ids"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading

import grpc
import numpy as np
import tensorflow as tf

from tfrec.serving.retrieval import RETRIEVE_SIGNATURE
from export.server.errors import ServingError
from export.server.servable import DEFAULT_SIGNATURE, PythonServable, Signature
from tfrec.serving import CTR_FEEDBACK_INPUTS, CTR_SCORE_SPECS, EXCLUDED_SCORE, RECOMMEND, SCORE, USER_EMBEDDING

logger = logging.getLogger(__name__)

RECOMMEND_K = "recommend_k"
DEFAULTS = {"recommender": "recommender", "retrieval": "retrieval_bruteforce", "ranker": "ranker",
            "candidates": 100, "k": 10}


def select_candidates(history, item_ids, scores, count):
    """The retrieved items of each row minus its history items and empty slots, first `count` kept.

    Args:
        history: bytes `(batch, H)` object array (padding `b""`).
        item_ids: bytes `(batch, R)` retrieved items, best first; scores: float `(batch, R)`.
        count: int, candidates kept per row.

    Returns:
        `(candidates bytes (batch, C), scores float32 (batch, C), counts int32 (batch,))`
        with `C = max(1, longest row kept)`, padded with `b""` / `EXCLUDED_SCORE`.

    Example:
    >>> ids, scores, counts = select_candidates(
    ...     np.array([[b"a", b""]], object), np.array([[b"a", b"b", b"", b"c"]], object),
    ...     np.array([[4.0, 3.0, 2.0, 1.0]]), count=5)
    >>> ids.tolist(), scores.tolist(), counts.tolist()
    ([[b'b', b'c']], [[3.0, 1.0]], [2])
    """
    kept = []
    for row_history, row_ids in zip(history, item_ids):
        seen = set(row_history.tolist())
        kept.append([j for j, item in enumerate(row_ids.tolist()) if item and item not in seen][:count])
    width = max([1, *map(len, kept)])
    candidates = np.full((len(kept), width), b"", dtype=object)
    candidate_scores = np.full((len(kept), width), EXCLUDED_SCORE, np.float32)
    for row, columns in enumerate(kept):
        candidates[row, : len(columns)] = item_ids[row, columns]
        candidate_scores[row, : len(columns)] = scores[row, columns]
    return candidates, candidate_scores, np.array([len(c) for c in kept], np.int32)


def top_by_probability(candidates, probabilities, retrieval_scores, k):
    """The `k` most probable real candidates of each row, best first (ties: earlier candidate first).

    `b""` candidates are padding and never chosen; rows with fewer than `k`
    real candidates end with `b""` slots scored `EXCLUDED_SCORE`.

    Returns:
        `(item_ids bytes (batch, k), scores float32 (batch, k), retrieval_scores float32 (batch, k))`.

    Example:
    >>> top_by_probability(np.array([[b"x", b"y", b""]], object), np.array([[0.2, 0.9, 0.0]]),
    ...                    np.array([[5.0, 4.0, 0.0]]), k=3)[0].tolist()
    [[b'y', b'x', b'']]
    """
    valid = candidates != b""
    ranked = np.where(valid, probabilities, -np.inf)
    order = np.argsort(-ranked, axis=1, kind="stable")[:, :k]  # (batch, <= k)
    batch = len(candidates)
    item_ids = np.full((batch, k), b"", dtype=object)
    scores = np.full((batch, k), EXCLUDED_SCORE, np.float32)
    kept_retrieval = np.full((batch, k), EXCLUDED_SCORE, np.float32)
    chosen = np.take_along_axis(valid, order, axis=1)  # (batch, <= k)
    width = order.shape[1]
    item_ids[:, :width] = np.where(chosen, np.take_along_axis(candidates, order, axis=1), b"")
    scores[:, :width] = np.where(chosen, np.take_along_axis(probabilities, order, axis=1), EXCLUDED_SCORE)
    kept_retrieval[:, :width] = np.where(chosen, np.take_along_axis(retrieval_scores, order, axis=1), EXCLUDED_SCORE)
    return item_ids, scores, kept_retrieval


def _positive_int(name, value):
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise ValueError(f"two-stage option {name} must be a positive int, got {value!r}")
    return number


class TwoStageServable(PythonServable):
    """Retrieval candidates re-ranked by a CTR model (see the module docstring).

    Args:
        name: model name; context: the serving core (`None` outside a server).
        version: int, default 1.
        recommender, retrieval, ranker: names of the served models of each stage.
        candidates: int, retrieved items (outside the history) the ranker scores.
        k: int, items returned by `recommend` (<= `candidates`).
    """

    def __init__(self, name, context=None, version=1, recommender=DEFAULTS["recommender"],
                 retrieval=DEFAULTS["retrieval"], ranker=DEFAULTS["ranker"], candidates=DEFAULTS["candidates"],
                 k=DEFAULTS["k"]):
        super().__init__(name, context, version)
        self.models = {"recommender": str(recommender), "retrieval": str(retrieval), "ranker": str(ranker)}
        for stage, model in self.models.items():
            if not model or model == name:
                raise ValueError(f"two-stage option {stage} must name another served model, got {model!r}")
        self.candidates = _positive_int("candidates", candidates)
        self.k = _positive_int("k", k)
        if self.k > self.candidates:
            raise ValueError(f"two-stage option k={self.k} exceeds candidates={self.candidates}")
        history = {spec.name: tf.TensorSpec(spec.shape, spec.dtype)
                   for spec in CTR_SCORE_SPECS if spec.name != "candidates"}  # history + the ranker's feedback

        def outputs(width):
            return {"item_ids": tf.TensorSpec([None, width], tf.string),
                    "scores": tf.TensorSpec([None, width], tf.float32),
                    "retrieval_scores": tf.TensorSpec([None, width], tf.float32),
                    "num_candidates": tf.TensorSpec([None], tf.int32)}

        recommend = Signature.of(RECOMMEND, history, outputs(self.k))
        self.signatures = {
            DEFAULT_SIGNATURE: Signature.of(DEFAULT_SIGNATURE, recommend.inputs, recommend.outputs),
            RECOMMEND: recommend,
            RECOMMEND_K: Signature.of(RECOMMEND_K, {**history, "k": tf.TensorSpec([], tf.int32)},
                                      outputs(None)),
        }
        self._warned_short_retrieval = threading.Event()

    def _call(self, stage, signature, inputs):
        """Outputs of the `stage` model; its errors keep their code (NOT_FOUND -> UNAVAILABLE)."""
        model = self.models[stage]
        if self.context is None:
            raise ServingError.failed_precondition(f"{self.name}: the two-stage servable runs inside a model server")
        try:
            return self.context.predict_outputs(model, inputs, signature=signature)
        except ServingError as err:
            code = grpc.StatusCode.UNAVAILABLE if err.code == grpc.StatusCode.NOT_FOUND else err.code
            raise ServingError(code, f"{self.name}: {stage} model '{model}' ({signature}): {err.message}") from None

    def compute(self, signature, inputs):
        history = inputs["history"]
        k = self.k
        if signature == RECOMMEND_K:
            k = int(inputs["k"])
            if not 1 <= k <= self.candidates:
                raise ServingError.invalid_argument(f"k must be in [1, {self.candidates}] (the candidates), got {k}")
        embedding = self._call("recommender", USER_EMBEDDING, {"history": history})["embedding"]
        retrieved = self._call("retrieval", RETRIEVE_SIGNATURE, {"queries": embedding})
        item_ids = np.asarray(retrieved["item_ids"], dtype=object)
        if item_ids.shape[1] < self.candidates and not self._warned_short_retrieval.is_set():
            self._warned_short_retrieval.set()
            logger.warning("%s: retrieval model '%s' returns %d items, fewer than candidates=%d; export it with "
                           "a larger k", self.name, self.models["retrieval"], item_ids.shape[1], self.candidates)
        candidates, candidate_scores, counts = select_candidates(
            history, item_ids, np.asarray(retrieved["scores"], np.float32), self.candidates)
        feedback = {name: inputs[name] for name in CTR_FEEDBACK_INPUTS}
        probabilities = self._call("ranker", SCORE, {"history": history, "candidates": candidates,
                                                     **feedback})["probabilities"]
        item_ids, scores, retrieval_scores = top_by_probability(
            candidates, np.asarray(probabilities, np.float32), candidate_scores, k)
        return {"item_ids": item_ids, "scores": scores, "retrieval_scores": retrieval_scores,
                "num_candidates": counts}


def factory(name, context, **options):
    """`TwoStageServable(name, context, **options)`; options as strings from the model config's `base_path`.

    Known options: `recommender`, `retrieval`, `ranker` (model names), `candidates`, `k` (ints).
    """
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown two-stage option(s) {unknown}; known: {', '.join(DEFAULTS)}")
    return TwoStageServable(name, context, **options)
