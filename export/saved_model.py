"""SavedModel export: sequential recommenders, CTR rankers and retrieval indexes, raw tokens in and out.

`export_sequential(model, item_vocab, base_dir)` writes a trained
`NextItemRecommender` as a `tf.Module` SavedModel whose graph is
`vocabulary lookup -> backbone -> dot product with the item table -> top-K -> tokens`,
stock TF ops only. Signatures (the contract of `tfrec.serving`, shared with the
TFX Trainer's SavedModel):

- `recommend` (also `serving_default`):
  `history: string (batch, None)`, right- or left-padded with `""`;
  `exclude_history: bool (batch,)`, per row, True = never return the row's
  history items (per row rather than a scalar so requests can be batched along
  dimension 0) -> `item_ids: string (batch, k)`, `scores: float32 (batch, k)`,
  best first. Scores equal `model.score_items` (dot product / temperature).
- `user_embedding`: `history` -> `embedding: float32 (batch, dim)`, the query of
  the retrieval servables (`export_index`), whose table is already divided by
  the model's temperature, so `retrieve(user_embedding(h))` = `recommend(h)`.
- `recommend_examples`: `serialized: string (batch,)` `tf.Example`s with a bytes
  feature `history` (item tokens, oldest first) and an optional int feature
  `exclude_history` (default 0) -> the outputs of `recommend` (for the TFX
  Evaluator).

Input handling (the same in every signature): `""` is padding and unknown
tokens are dropped (the model never trained an out-of-vocabulary vector);
the remaining items keep their order and only the last `max_length` are read.
A row left with no known item fails the request with INVALID_ARGUMENT
("history has no known item token"): callers fall back (e.g. to popular items).
`k` is fixed at export (the output shape). When a user's unseen items are fewer
than `k`, the empty slots hold `""` with score `EXCLUDED_SCORE`.

`export_ctr(model, item_vocab, base_dir)` writes a trained lifelong CTR model
(`tfrec.models.ctr_baselines.CTRModel`: R2LED or a baseline) as a ranker, graph
`vocabulary lookup -> most recent max_history known items -> model.score`, stock
TF ops only. Signatures:

- `score` (also `serving_default`): `history: string (batch, None)` (the
  user's item tokens, oldest first, padded with `""`), `candidates: string
  (batch, None)` (items to score, padded with `""`), the feedback of every
  history item `history_ratings: float32`, `history_labels: float32`,
  `history_timestamps: int64` (each `(batch, None)`, the shape of `history`),
  the request time `timestamp: int64 (batch,)` and the user token `user: string
  (batch,)` (see `tfrec.serving`; every input required: a caller that knows no
  feedback sends zeros, which is not what the model trained on) ->
  `probabilities: float32 (batch, num_candidates)` (click probabilities, equal to
  `model.predict` on the mapped ids) and `valid: bool (batch, num_candidates)`.
  A `""` candidate slot is padding: `valid` False, probability
  `PADDING_PROBABILITY` (0). A candidate token missing from the vocabulary is
  scored as the OOV id 1, `valid` True — exactly how `tfrec ctr evaluate`
  scores a target first seen after training.
- `score_examples`: `serialized: string (batch,)` `tf.Example`s with the same
  features (`tfrec.serving.parse_ctr_examples`) and a bytes `target` -> `probabilities: float32 (batch,)` (for the
  TFX Evaluator). A missing or `""` target fails with INVALID_ARGUMENT.

History handling of the ranker: `""` and unknown tokens are dropped with their
feedback (as for the sequential servable), the remaining items keep their order
and only the most recent `max_history` are read; each behaviour's gap bucket is
computed in-graph from `timestamp - history_timestamps` with the training
`gap_bucket`. The user token maps to the training user id and profile (an
unknown user is a new user: id 1, unknown profile) (the export argument; None = all). A history with
no known item is not an error here: it is scored as an empty history (the
model's answer from the candidate alone; training never shows one, as
`data.min_history >= 1`).

Directory layout (TF Serving): `<base_dir>/<version>/saved_model.pb` with the
version the next integer (or given); the version directory is written under a
temporary name and renamed when complete, so a server watching `base_dir` never
sees a half-written version. Beside `saved_model.pb`, `export_metadata.json`
records the kind, signatures, model config, vocabulary and data fingerprints,
versions and export time. The vocabulary file ships as `assets/item_vocab.txt`.

Example:
>>> path = export_sequential(model, item_vocab, "/tmp/servables/recommender")  # doctest: +SKIP
>>> served = tf.saved_model.load(str(path))  # doctest: +SKIP
>>> served.signatures["recommend"](history=tf.constant([["a", "b"]]),
...                                exclude_history=tf.constant([True]))["item_ids"]  # doctest: +SKIP
>>> ranker = tf.saved_model.load(str(export_ctr(ctr_model, item_vocab, "/tmp/servables/ranker")))  # doctest: +SKIP
>>> ranker.signatures["score"](history=tf.constant([["a", "b"]]), candidates=tf.constant([["c", "d", ""]]),
...     history_ratings=tf.constant([[5.0, 0.0]]), history_labels=tf.constant([[1.0, 0.0]]),
...     history_timestamps=tf.constant([[100, 200]], tf.int64), timestamp=tf.constant([300], tf.int64),
...     user=tf.constant(["u1"]))["probabilities"]  # doctest: +SKIP
"""

import datetime
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import tensorflow as tf

import tfrec
from export.retrieval import BruteForceIndex, RETRIEVE_SIGNATURE
from tfrec.data.vocab import NUM_RESERVED, OOV_ID, PAD_ID, Vocabulary
from tfrec.serving import (
    CANDIDATES_SPEC,
    CTR_SCORE_SPECS,
    EXCLUDE_SPEC,
    EXCLUDED_SCORE,
    HISTORY_SPEC,
    PADDING_PROBABILITY,
    RECOMMEND,
    RECOMMEND_EXAMPLES,
    SCORE,
    SCORE_EXAMPLES,
    SERIALIZED_SPEC,
    SERVING_DEFAULT,
    USER_EMBEDDING,
    checked_exclude_flags,
    checked_same_rows,
    compact_known_ids,
    ctr_history_features,
    parse_ctr_examples,
    parse_history_examples,
    recent_known_ids,
    signature_variables,
)

__all__ = [
    "EXCLUDED_SCORE",
    "METADATA_FILE",
    "PADDING_PROBABILITY",
    "CTRServable",
    "UserLookup",
    "ItemLookup",
    "SequentialServable",
    "catalog_table",
    "export_ctr",
    "export_index",
    "export_sequential",
    "next_version",
    "version_dir",
    "write_saved_model",
]

METADATA_FILE = "export_metadata.json"
VOCAB_ASSET = "item_vocab.txt"


# --- versioned SavedModel writing ------------------------------------------
def next_version(base_dir):
    """1 + the largest integer-named sub-directory of `base_dir` (1 if none)."""
    base = Path(base_dir)
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] if base.is_dir() else []
    return max(versions, default=0) + 1


def version_dir(base_dir, version=None):
    """`<base_dir>/<version>` for a new export: `version` (a free positive int) or the next one."""
    base = Path(base_dir)
    if base.exists() and not base.is_dir():
        raise ValueError(f"export base directory {base} exists and is not a directory")
    if version is None:
        version = next_version(base)
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ValueError(f"version must be a positive int (TF Serving version directory), got {version!r}")
    final = base / str(int(version))
    if final.exists():
        raise ValueError(f"version {version} already exists at {final}; pass another version or none (next free)")
    return final


def _signature_specs(signatures):
    """`{name: {"inputs": {arg: {dtype, shape}}, "outputs": {...}}}` of traced signatures."""
    def spec(t):
        return {"dtype": t.dtype.name, "shape": [None if d is None else int(d) for d in t.shape.as_list()]}

    out = {}
    for name, fn in signatures.items():
        concrete = fn.get_concrete_function()
        _, kwargs = concrete.structured_input_signature
        args = concrete.structured_input_signature[0]
        inputs = {s.name: spec(s) for s in (*args, *kwargs.values())}
        out[name] = {"inputs": inputs, "outputs": {k: spec(v) for k, v in concrete.structured_outputs.items()}}
    return out


def write_saved_model(module, base_dir, signatures, version=None, metadata=None, namespace_whitelist=()):
    """Save `module` as `<base_dir>/<version>/` with `export_metadata.json`, atomically.

    Args:
        module: a `tf.Module` tracking every variable and resource its
            signature functions use.
        base_dir: the model's base directory (TF Serving `base_path`).
        signatures: `{name: tf.function with an input_signature}`; must include
            `"serving_default"`.
        version: int or None (next integer).
        metadata: dict merged into `export_metadata.json`.
        namespace_whitelist: custom-op namespaces to allow (e.g. `("Scann",)`).

    Returns:
        `Path` of the version directory.
    """
    if SERVING_DEFAULT not in signatures:
        raise ValueError(f"signatures must include {SERVING_DEFAULT!r}, got {sorted(signatures)}")
    final = version_dir(base_dir, version)
    base, version = final.parent, int(final.name)
    base.mkdir(parents=True, exist_ok=True)
    staging = base / f".tmp-{int(version)}-{uuid.uuid4().hex[:8]}"  # not a number: servers ignore it
    try:
        options = tf.saved_model.SaveOptions(namespace_whitelist=list(namespace_whitelist) or None)
        tf.saved_model.save(module, str(staging), signatures=signatures, options=options)
        meta = {
            "version": int(version),
            "export_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "signatures": _signature_specs(signatures),
            "tfrec_version": tfrec.__version__,
            "tensorflow_version": tf.__version__,
            "custom_op_namespaces": sorted(namespace_whitelist),
            **(metadata or {}),
        }
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        try:
            os.rename(staging, final)
        except OSError as err:
            raise ValueError(f"cannot publish version {version} at {final}: {err}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


# --- the item vocabulary inside the graph ------------------------------------
def vocab_fingerprint(item_vocab):
    """sha256 of the vocabulary file contents (`Vocabulary.to_text`)."""
    return hashlib.sha256(item_vocab.to_text().encode("utf-8")).hexdigest()


def vocab_metadata(item_vocab):
    """The `vocab` entry of `export_metadata.json`."""
    return {"size": item_vocab.size, "num_items": len(item_vocab.tokens),
            "fingerprint": vocab_fingerprint(item_vocab), "asset": f"assets/{VOCAB_ASSET}"}


def check_model_vocab(model, item_vocab):
    """ValueError unless `item_vocab` is a `Vocabulary` with `model.vocab_size` ids."""
    if not isinstance(item_vocab, Vocabulary):
        raise ValueError(f"item_vocab must be a tfrec Vocabulary, got {type(item_vocab).__name__}")
    if model.vocab_size != item_vocab.size:
        raise ValueError(
            f"model has {model.vocab_size} item ids but the vocabulary has {item_vocab.size} "
            "(tokens + padding + OOV): was the model trained with another vocabulary?"
        )


class ItemLookup(tf.Module):
    """The item vocabulary as an in-graph table: tokens -> ids.

    Args:
        item_vocab: the `Vocabulary`.
        vocab_file: path of `item_vocab.save(...)` output; saved as an asset
            and read by the lookup table (must hold `item_vocab`'s tokens).

    `ids(tokens)` maps `""` to padding (0), tokens missing from the vocabulary
    to OOV (1) and the others to their ids (2..), int32, same shape.

    Example:
    >>> vocab, path = Vocabulary(["a", "b"]), os.path.join(tempfile.mkdtemp(), "item_vocab.txt")
    >>> vocab.save(path)
    >>> ItemLookup(vocab, path).ids(tf.constant([["b", "zz", ""]])).numpy().tolist()
    [[3, 1, 0]]
    """

    def __init__(self, item_vocab, vocab_file, name="item_lookup"):
        super().__init__(name=name)
        if Vocabulary.load(vocab_file) != item_vocab:
            raise ValueError(f"vocab_file {vocab_file} does not hold item_vocab's tokens")
        # token -> line number = id - NUM_RESERVED; unknown tokens -> -1 (OOV once shifted).
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.TextFileInitializer(
                str(vocab_file), tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
            ),
            default_value=-1,
        )

    def ids(self, tokens):
        ids = tf.cast(self.table.lookup(tokens) + NUM_RESERVED, tf.int32)
        return tf.where(tokens == "", tf.constant(PAD_ID, tf.int32), ids)


def _export_with_vocab(item_vocab, base_dir, version, build, metadata):
    """Write the servable `build(vocab_file)` returns, its vocabulary shipped as an asset.

    `metadata(servable)` gives the servable's `export_metadata.json` entries
    (the `vocab` entry is added here).
    """
    version_dir(base_dir, version)  # fail before the slow part
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / VOCAB_ASSET
        item_vocab.save(vocab_file)
        servable = build(vocab_file)
        meta = {**metadata(servable), "vocab": vocab_metadata(item_vocab)}
        return write_saved_model(servable, base_dir, servable.signatures(), version=version, metadata=meta)


# --- sequential recommender servable ---------------------------------------
def catalog_table(model, item_vocab):
    """The scoring table of a trained model, materialised once.

    Args:
        model: a `NextItemRecommender` (any item encoder with `all_items()`).
        item_vocab: its item `Vocabulary`.

    Returns:
        `(table, tokens)`: float32 `(num_items, dim)` = item vectors of ids
        `2..` divided by `model.temperature` (so dot products with
        `model.user_embedding` are the model's scores), and the item tokens
        in row order. Padding and OOV rows are left out (they never rank).
    """
    missing = [a for a in ("item_encoder", "user_embedding", "vocab_size", "temperature") if not hasattr(model, a)]
    if missing:
        raise ValueError(f"expected a NextItemRecommender-like model, got {type(model).__name__} without {missing}")
    check_model_vocab(model, item_vocab)
    items = np.asarray(model.item_encoder.all_items(), dtype="float32")  # (vocab, dim)
    if items.shape[0] != item_vocab.size:
        raise ValueError(f"item_encoder.all_items() has {items.shape[0]} rows, expected {item_vocab.size}")
    return items[NUM_RESERVED:] / np.float32(model.temperature), list(item_vocab.tokens)


class SequentialServable(tf.Module):
    """The serving graph of a `NextItemRecommender`: raw tokens in, top-K tokens out.

    Args:
        model: a trained `NextItemRecommender`.
        item_vocab: its item `Vocabulary` (size must equal `model.vocab_size`).
        vocab_file: path of `item_vocab.save(...)` output; saved as an asset
            and read by the in-graph lookup table.
        k: int. Items returned by `recommend` (default 10).

    Attributes:
        recommend, user_embedding, recommend_examples: the signature functions
        (see the module docstring).

    Example:
    >>> item_vocab.save("/tmp/vocab.txt")  # doctest: +SKIP
    >>> servable = SequentialServable(model, item_vocab, "/tmp/vocab.txt", k=5)  # doctest: +SKIP
    >>> servable.recommend(tf.constant([["a", "b", ""]]), tf.constant([False]))  # doctest: +SKIP
    """

    def __init__(self, model, item_vocab, vocab_file, k=10):
        super().__init__(name="sequential_servable")
        # A semantic encoder (DMESR) is served as its materialised table, computed
        # once here; the catalog below reads that same table.
        model = model.with_item_table()
        table, tokens = catalog_table(model, item_vocab)
        self.index = BruteForceIndex(table, tokens, k=k, name="catalog")
        self.k = self.index.k
        self.item_lookup = ItemLookup(item_vocab, vocab_file)
        # The Keras model stays out of the object graph (its optimizer state is
        # not needed to serve); the variables its calls read are tracked below.
        def user_embedding(history):
            return {"embedding": model.user_embedding(self._history_ids(history))}  # (batch, dim)

        def recommend(history, exclude_history):
            exclude_history = checked_exclude_flags(history, exclude_history)
            ids = self._history_ids(history)  # (batch, seq) int32
            user = model.user_embedding(ids)  # (batch, dim)
            exclude_rows = tf.where(exclude_history[:, None] & (ids >= NUM_RESERVED), ids - NUM_RESERVED, -1)
            scores, rows = self.index.search(user, exclude_rows)  # (batch, k) each
            return {"item_ids": self.index.tokens_of(rows), "scores": scores}

        def recommend_examples(serialized):
            return self.recommend(*parse_history_examples(serialized))

        self.user_embedding = tf.function(user_embedding, input_signature=[HISTORY_SPEC])
        self.recommend = tf.function(recommend, input_signature=[HISTORY_SPEC, EXCLUDE_SPEC])
        self.recommend_examples = tf.function(recommend_examples, input_signature=[SERIALIZED_SPEC])
        self.model_variables = signature_variables(
            (self.user_embedding, self.recommend, self.recommend_examples), model
        )

    def _history_ids(self, history):
        """Item ids `(batch, seq)` int32: known items first, in order, then 0 padding."""
        return compact_known_ids(self.item_lookup.ids(history), require_known=True)[0]

    def signatures(self):
        return {
            SERVING_DEFAULT: self.recommend,
            RECOMMEND: self.recommend,
            USER_EMBEDDING: self.user_embedding,
            RECOMMEND_EXAMPLES: self.recommend_examples,
        }


def export_sequential(model, item_vocab, base_dir, k=10, version=None, data_fingerprint=None, experiment_config=None):
    """Export a trained `NextItemRecommender` as a versioned SavedModel.

    Args:
        model: the trained model.
        item_vocab: its item `Vocabulary`.
        base_dir: model base directory; the SavedModel goes to `base_dir/<version>/`.
        k: int, items per `recommend` answer (1..number of items).
        version: int or None (next integer).
        data_fingerprint: optional fingerprint of the training data
            (`PreparedData.metadata["fingerprint"]`), recorded in the metadata.
        experiment_config: optional dict (`ExperimentConfig.to_dict()`), recorded.

    Returns:
        `Path` of the version directory.
    """
    def metadata(servable):
        return {
            "kind": "sequential",
            "k": servable.k,
            "model_class": type(model).__name__,
            "model_config": model.get_config(),
            "max_length": model.max_length,
            "temperature": model.temperature,
            "embedding_dim": servable.index.dim,
            "data_fingerprint": data_fingerprint,
            "experiment_config": experiment_config,
            "stock_ops_only": True,
            "empty_history": "INVALID_ARGUMENT",
            "unknown_tokens": "dropped",
        }

    return _export_with_vocab(
        item_vocab, base_dir, version, lambda vocab_file: SequentialServable(model, item_vocab, vocab_file, k=k),
        metadata,
    )


# --- CTR ranker servable --------------------------------------------------------
class UserLookup(tf.Module):
    """User token -> the CTR models' `user_id` (index + 2; unknown = 1) and `user_profile` rows, in-graph.

    Args:
        users: `(U,)` user tokens of the training data (`LifelongData.users`), or None
            (every user unknown).
        user_profiles: `(U, P)` int32 profile token ids (`LifelongData.user_profiles`) or None.

    An unknown user (or `""`) gets `user_id` 1 and a profile of unknown values (1),
    exactly what training gives a user missing from the side file: a new user.

    Example:
    >>> import numpy as np
    >>> lookup = UserLookup(np.array(["u1", "u2"]), np.array([[3, 4], [5, 2]]))
    >>> ids, profile = lookup(tf.constant(["u2", "new"]))
    >>> ids.numpy().tolist(), profile.numpy().tolist()
    ([3, 1], [[5, 2], [1, 1]])
    """

    def __init__(self, users=None, user_profiles=None, name="user_lookup"):
        super().__init__(name=name)
        users = np.asarray([] if users is None else users, dtype=object).astype(str)
        if len(set(users.tolist())) != len(users):
            raise ValueError("users must be distinct tokens")
        self.num_users = len(users)
        self.table = None
        if self.num_users:
            ids = tf.range(NUM_RESERVED, NUM_RESERVED + self.num_users, dtype=tf.int32)  # user index + 2
            self.table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(tf.constant(users.tolist(), tf.string), ids), default_value=OOV_ID)
        self.profiles = None
        if user_profiles is not None:
            profiles = np.asarray(user_profiles)
            if profiles.ndim != 2 or len(profiles) != self.num_users or not np.issubdtype(profiles.dtype, np.integer):
                raise ValueError(f"user_profiles must be an int ({len(users)}, P) array (one row per user), "
                                 f"got {profiles.dtype} {profiles.shape}")
            reserved = np.stack([np.full(profiles.shape[1], PAD_ID), np.full(profiles.shape[1], OOV_ID)])
            self.profiles = tf.constant(np.concatenate([reserved, profiles]).astype(np.int32))  # (U + 2, P)

    def __call__(self, user):
        """`(user_id int32 (batch,), user_profile int32 (batch, P) or None)` of user tokens `(batch,)`."""
        ids = self.table.lookup(user) if self.table is not None else tf.fill(tf.shape(user), OOV_ID)
        profile = tf.gather(self.profiles, ids) if self.profiles is not None else None
        return ids, profile


def check_model_users(model, users, user_profiles):
    """`ValueError` when the model's wide part reads user ids / profiles the export was not given."""
    wide = getattr(model, "wide", None)
    if wide is None:
        return
    num_users, profile_sizes = getattr(wide, "num_users", 0), list(getattr(wide, "profile_sizes", []))
    if num_users and (users is None or len(users) + NUM_RESERVED != num_users):
        raise ValueError(f"the model has a user-id bias over {num_users} ids: export it with the training users "
                         f"(users=LifelongData.users, {num_users - NUM_RESERVED} tokens), got "
                         f"{'none' if users is None else len(users)}")
    if profile_sizes and (user_profiles is None or np.asarray(user_profiles).shape[1:] != (len(profile_sizes),)):
        raise ValueError(f"the model reads a user profile of {len(profile_sizes)} fields: export it with "
                         "user_profiles=LifelongData.user_profiles")


class CTRServable(tf.Module):
    """The serving graph of a lifelong CTR model: raw tokens and feedback in, click probabilities out.

    Args:
        model: a trained `CTRModel` (R2LED or a baseline).
        item_vocab: its item `Vocabulary` (size must equal `model.vocab_size`).
        vocab_file: path of `item_vocab.save(...)` output (see `ItemLookup`).
        max_history: int or None. Most recent known history items read (None = all).
        users, user_profiles: the training users and their profiles (`UserLookup`);
            required when the model's wide part reads them.

    Attributes:
        score, score_examples: the signature functions (see the module docstring).

    Example:
    >>> item_vocab.save("/tmp/vocab.txt")  # doctest: +SKIP
    >>> servable = CTRServable(model, item_vocab, "/tmp/vocab.txt", max_history=1024)  # doctest: +SKIP
    >>> servable.score(tf.constant([["a", "b"]]), tf.constant([["c", ""]]), tf.constant([[5., 0.]]),
    ...                tf.constant([[1., 0.]]), tf.constant([[100, 200]], tf.int64), tf.constant([300], tf.int64),
    ...                tf.constant(["u1"]))["probabilities"]  # doctest: +SKIP
    """

    def __init__(self, model, item_vocab, vocab_file, max_history=None, users=None, user_profiles=None):
        super().__init__(name="ctr_servable")
        missing = [a for a in ("score", "vocab_size") if not hasattr(model, a)]
        if missing:
            raise ValueError(f"expected a CTRModel (R2LED or a baseline), got {type(model).__name__} without {missing}")
        check_model_vocab(model, item_vocab)
        check_model_users(model, users, user_profiles)
        if max_history is not None and (
            isinstance(max_history, bool) or not isinstance(max_history, (int, np.integer)) or max_history < 1
        ):
            raise ValueError(f"max_history must be a positive int or None, got {max_history!r}")
        self.max_history = None if max_history is None else int(max_history)
        if getattr(model, "built", False) and hasattr(model, "materialize"):
            model.materialize()  # what no request changes is computed once and traced as constants
        self.item_lookup = ItemLookup(item_vocab, vocab_file)
        self.user_lookup = UserLookup(users, user_profiles)

        def score(history, candidates, history_ratings, history_labels, history_timestamps, timestamp, user):
            candidates = checked_same_rows(history, candidates, "candidates needs one row per history row")
            user = checked_same_rows(history, user, "user needs one token per history row")
            features = ctr_history_features(self.item_lookup.ids(history), history_ratings, history_labels,
                                            history_timestamps, timestamp, self.max_history)  # (batch, width)
            features["user_id"], profile = self.user_lookup(user)
            if profile is not None:
                features["user_profile"] = profile
            candidate_ids = self.item_lookup.ids(candidates)  # (batch, C): "" -> 0, unknown -> OOV (1)
            valid = candidate_ids != PAD_ID
            probabilities = tf.cast(model.score(features.pop("history_ids"), candidate_ids, **features), tf.float32)
            probabilities = tf.where(valid, probabilities, tf.constant(PADDING_PROBABILITY, tf.float32))
            return {"probabilities": probabilities, "valid": valid}

        def score_examples(serialized):
            inputs = parse_ctr_examples(serialized)
            target = inputs.pop("target")
            check = tf.debugging.assert_greater(
                tf.strings.length(target), 0,
                message="every tf.Example needs a non-empty target item token (bytes feature target)",
            )
            with tf.control_dependencies([check]):
                candidates = tf.identity(target)[:, None]
            return {"probabilities": self.score(candidates=candidates, **inputs)["probabilities"][:, 0]}

        self.score = tf.function(score, input_signature=list(CTR_SCORE_SPECS))
        self.score_examples = tf.function(score_examples, input_signature=[SERIALIZED_SPEC])
        self.model_variables = signature_variables((self.score, self.score_examples), model)

    def signatures(self):
        return {SERVING_DEFAULT: self.score, SCORE: self.score, SCORE_EXAMPLES: self.score_examples}


def export_ctr(model, item_vocab, base_dir, version=None, max_history=None, data_fingerprint=None,
               experiment_config=None, users=None, user_profiles=None):
    """Export a trained lifelong CTR model as a versioned ranker SavedModel.

    Args:
        model: the trained `CTRModel` (`tfrec ctr train`'s `model.keras`).
        item_vocab: its item `Vocabulary` (`LifelongData.item_vocab`).
        base_dir: model base directory; the SavedModel goes to `base_dir/<version>/`.
        version: int or None (next integer).
        max_history: int or None. Most recent known history items the ranker
            reads (use the training `model.max_history`); None = all.
        data_fingerprint: optional fingerprint of the training data
            (`LifelongData.metadata["fingerprint"]`), recorded in the metadata.
        experiment_config: optional dict (`CTRConfig.to_dict()`), recorded.
        users, user_profiles: `LifelongData.users` and `.user_profiles`: the
            servable maps the request's `user` token to the training user id and
            profile in-graph (unknown user = a new user). Required when the
            model's wide part reads user ids / profiles (`ValueError` otherwise).

    Returns:
        `Path` of the version directory.
    """
    def metadata(servable):
        return {
            "kind": "ctr",
            "model_class": type(model).__name__,
            "model_config": model.get_config(),
            "max_history": servable.max_history,
            "data_fingerprint": data_fingerprint,
            "experiment_config": experiment_config,
            "stock_ops_only": True,
            "padding_candidates": {"probability": PADDING_PROBABILITY, "valid": False},
            "unknown_tokens": {"history": "dropped with their feedback", "candidates": "scored as the OOV id",
                               "user": "a new user (unknown id and profile)"},
            "num_users": servable.user_lookup.num_users,
            "user_profile": servable.user_lookup.profiles is not None,
            "empty_history": "scored (no behaviour)",
        }

    return _export_with_vocab(
        item_vocab, base_dir, version,
        lambda vocab_file: CTRServable(model, item_vocab, vocab_file, max_history=max_history, users=users,
                                       user_profiles=user_profiles), metadata,
    )


def export_index(index, base_dir, version=None, source=None):
    """Export a `RetrievalIndex` as a versioned SavedModel.

    Signatures `retrieve` and `serving_default`: `queries: float32 (batch, dim)`
    -> `{"item_ids": string (batch, k), "scores": float32 (batch, k)}`. A ScaNN
    index is saved with the `Scann` op namespace allowed; load it after
    `import scann`.

    Args:
        index: a `BruteForceIndex` or `ScaNNIndex`.
        base_dir, version: as `export_sequential`.
        source: optional dict recorded as the index's provenance (e.g. the
            model config, vocabulary and data fingerprints).

    Returns:
        `Path` of the version directory.
    """
    metadata = {
        "kind": f"retrieval_{index.kind}",
        "index": index.config(),
        "stock_ops_only": not index.save_namespace_whitelist,
        "requires": ["scann"] if index.save_namespace_whitelist else [],
        "source": source,
    }
    signatures = {SERVING_DEFAULT: index.retrieve, RETRIEVE_SIGNATURE: index.retrieve}
    return write_saved_model(
        index, base_dir, signatures, version=version, metadata=metadata,
        namespace_whitelist=index.save_namespace_whitelist,
    )


# --- `tfrec export` -----------------------------------------------------------
