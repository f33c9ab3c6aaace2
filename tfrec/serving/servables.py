"""The servables: trained models wrapped as `tf.Module`s with the signatures of `tfrec.serving`.

One serving graph per task, written by every exporter (`export.saved_model`
writes them as versioned TF Serving SavedModels; the TFX Trainer saves them
from `tfx_pipeline.trainer`, the sequential one with its `evaluate` signature
added by `tfx_pipeline.serving`):

- `SequentialServable`: a `NextItemRecommender`, `recommend` (=
  `serving_default`), `user_embedding`, `recommend_examples`;
- `CTRServable`: a lifelong CTR model, `score` (= `serving_default`),
  `score_examples`.

Both map raw tokens in-graph with `ItemLookup` over a vocabulary file (one
token per line, id = line + 2, the layout of `Vocabulary.save` and of the TFX
Transform's `item_vocab`); `UserLookup` maps the ranker's user token. Stock TF
ops only. See `tfrec.serving.contract` for the signatures.
"""

import types

import numpy as np
import tensorflow as tf

from tfrec.data.vocab import NUM_RESERVED, OOV_ID, PAD_ID, Vocabulary
from tfrec.serving.contract import (
    CTR_SCORE_SPECS,
    EXCLUDE_SPEC,
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
    signature_variables,
)
from tfrec.models.next_item import keep_last
from tfrec.serving.retrieval import BruteForceIndex

__all__ = ["CTRServable", "ItemLookup", "SequentialServable", "UserLookup", "catalog_table", "check_model_users",
           "check_model_vocab"]


# --- the item vocabulary inside the graph ------------------------------------
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
    >>> import os, tempfile
    >>> import tensorflow as tf
    >>> from tfrec.data.vocab import Vocabulary
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


# Largest batch padded to a power of two (above it, a batch runs at its own size).
_MAX_BUCKET = 1 << 16


def _on_batch_buckets(fn, *tensors):
    """`fn(*tensors)` with the batch (first axis) zero-padded to the next power of two, outputs cut back.

    XLA compiles one program per input shape: padding the batch bounds the programs a
    server compiles to one per power of two (batch 5 runs the batch-8 program) instead of
    one per batch size. Padded rows are computed and dropped (a row never reads another).

    Example:
    >>> double = tf.function(lambda x: 2 * x)
    >>> _on_batch_buckets(double, tf.constant([[1], [2], [3]])).numpy().tolist()
    [[2], [4], [6]]
    """
    batch = tf.shape(tensors[0])[0]
    sizes = tf.constant([1 << i for i in range(_MAX_BUCKET.bit_length())], tf.int32)  # 1 .. _MAX_BUCKET
    size = tf.maximum(tf.gather(sizes, tf.minimum(tf.searchsorted(sizes, [batch])[0], len(sizes) - 1)), batch)
    padded = [tf.pad(t, tf.concat([[[0, size - batch]], tf.zeros([tf.rank(t) - 1, 2], tf.int32)], 0))
              for t in tensors]
    return tf.nest.map_structure(lambda out: out[:batch], fn(*padded))


class SequentialServable(tf.Module):
    """The serving graph of a `NextItemRecommender`: raw tokens in, top-K tokens out.

    Args:
        model: a trained `NextItemRecommender`.
        item_vocab: its item `Vocabulary` (size must equal `model.vocab_size`).
        vocab_file: path of `item_vocab.save(...)` output; saved as an asset
            and read by the in-graph lookup table.
        k: int. Items returned by `recommend` (default 10).
        jit_compile: bool. Compile the numeric part (the backbone and the catalogue
            search) with XLA (default True; ours): measured on the Beauty DMESR-SASRec
            servable, about 3x less CPU per request than the same graph run op by op.
            The official `tensorflow_model_server` runs such a servable only with
            `--xla_cpu_compilation_enabled=true`; pass False for plain TF ops.

    Attributes:
        recommend, user_embedding, recommend_examples: the signature functions
        (see the module docstring).

    Example (an untrained model: which items come first depends on its weights,
    but the history items are excluded, so the two others fill k = 2):
    >>> import os, tempfile
    >>> import numpy as np
    >>> import tensorflow as tf
    >>> from tfrec.config import ModelConfig
    >>> from tfrec.data.vocab import Vocabulary
    >>> from tfrec.training import build_model
    >>> item_vocab = Vocabulary(["a", "b", "c", "d"])
    >>> model = build_model(ModelConfig(embedding_dim=8, max_length=4, num_layers=1, num_heads=1, dropout=0.0),
    ...                     item_vocab.size, seed=0)
    >>> _ = model.user_embedding(np.zeros((1, 4), "int32"))  # build the weights
    >>> vocab_file = os.path.join(tempfile.mkdtemp(), "item_vocab.txt")
    >>> item_vocab.save(vocab_file)
    >>> servable = SequentialServable(model, item_vocab, vocab_file, k=2)
    >>> out = servable.recommend(tf.constant([["a", "b", ""]]), tf.constant([True]))
    >>> sorted(out["item_ids"].numpy()[0].tolist()), out["scores"].shape
    ([b'c', b'd'], TensorShape([1, 2]))
    """

    def __init__(self, model, item_vocab, vocab_file, k=10, jit_compile=True):
        super().__init__(name="sequential_servable")
        # A semantic encoder (DMESR) is served as its materialised table, computed
        # once here; the catalog below reads that same table.
        model = model.with_item_table()
        table, tokens = catalog_table(model, item_vocab)
        self.index = BruteForceIndex(table, tokens, k=k, name="catalog")
        self.k = self.index.k
        self.jit_compile = bool(jit_compile)
        self.item_lookup = ItemLookup(item_vocab, vocab_file)
        # The Keras model stays out of the object graph (its optimizer state is
        # not needed to serve; a SimpleNamespace is not tracked); the variables
        # its calls read are tracked below (`model_variables`). Subclasses adding
        # signatures (the TFX `evaluate`) read it here.
        self._keras = types.SimpleNamespace(model=model)
        # The numeric part (backbone + catalogue search) on fixed shapes: the history as its last
        # `max_length` ids, exclusions as a (batch, num_items) mask. With `jit_compile` XLA fuses its
        # few hundred small ops into one program per power-of-two batch size (`_on_batch_buckets`);
        # the string lookups stay TF ops (XLA has no string type).
        embed = tf.function(model.user_embedding, jit_compile=self.jit_compile, autograph=False)

        def ranked(window, excluded):  # (batch, max_length) int32, (batch, n) bool
            return self.index.masked_search(model.user_embedding(window), excluded)

        ranked = tf.function(ranked, jit_compile=self.jit_compile, autograph=False)
        numeric = (lambda fn, *args: _on_batch_buckets(fn, *args)) if self.jit_compile else (lambda fn, *a: fn(*a))

        def user_embedding(history):
            return {"embedding": numeric(embed, self._window(history))}  # (batch, dim)

        def recommend(history, exclude_history):
            exclude_history = checked_exclude_flags(history, exclude_history)
            ids = self._history_ids(history)  # (batch, seq) int32
            exclude_rows = tf.where(exclude_history[:, None] & (ids >= NUM_RESERVED), ids - NUM_RESERVED, -1)
            window = keep_last(ids, model.max_length)  # (batch, max_length): what the model reads
            scores, rows = numeric(ranked, window, self.index.excluded_mask(exclude_rows))  # (batch, k) each
            return {"item_ids": self.index.tokens_of(rows), "scores": scores}

        def recommend_examples(serialized):
            return self.recommend(*parse_history_examples(serialized))

        self.user_embedding = tf.function(user_embedding, input_signature=[HISTORY_SPEC])
        self.recommend = tf.function(recommend, input_signature=[HISTORY_SPEC, EXCLUDE_SPEC])
        self.recommend_examples = tf.function(recommend_examples, input_signature=[SERIALIZED_SPEC])
        self.model_variables = signature_variables(
            (self.user_embedding, self.recommend, self.recommend_examples), model
        )

    def _window(self, history):
        """The last `max_length` known ids of each row, `(batch, max_length)` int32, right-padded."""
        return keep_last(self._history_ids(history), self._keras.model.max_length)

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

    Example (an untrained DIN; `""` candidate slots are padding):
    >>> import os, tempfile
    >>> import numpy as np
    >>> import tensorflow as tf
    >>> from tfrec.data.vocab import Vocabulary
    >>> from tfrec.models.ctr_baselines import build_ctr_baseline
    >>> item_vocab = Vocabulary(["a", "b", "c", "d"])
    >>> model = build_ctr_baseline("din", item_vocab.size, embedding_dim=8, mlp_units=(8,), top_k=2)
    >>> _ = model.predict({"history_ids": np.array([[2, 3]]), "target_id": np.array([4])}, verbose=0)  # build
    >>> vocab_file = os.path.join(tempfile.mkdtemp(), "item_vocab.txt")
    >>> item_vocab.save(vocab_file)
    >>> servable = CTRServable(model, item_vocab, vocab_file, max_history=1024)
    >>> out = servable.score(tf.constant([["a", "b"]]), tf.constant([["c", ""]]), tf.constant([[5., 0.]]),
    ...                      tf.constant([[1., 0.]]), tf.constant([[100, 200]], tf.int64),
    ...                      tf.constant([300], tf.int64), tf.constant(["u1"]))
    >>> out["valid"].numpy().tolist(), 0.0 < float(out["probabilities"][0, 0]) < 1.0
    ([[True, False]], True)
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


