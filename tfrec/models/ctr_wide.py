"""The wide part every lifelong CTR model shares, the behaviour feedback tokens and
the two references (`popularity`, `logreg`).

**Wide part** (`WidePart`), a logistic regression over
- an item bias initialised from the training click prior in logit space
  (`LifelongData.item_click_prior`), so an untrained model scores the prior;
- user-history scalars computed from the request's history and its feedback
  (strictly earlier events only, as the history itself): the smoothed click rate
  so far (logit), the mean rating, the log history length, the smoothed click
  rate on the behaviours sharing a genre with the target (logit) and the log
  count of those behaviours, the smoothed click rate (logit) and mean rating of
  the `RECENT` latest behaviours, the time-gap bucket of the latest one / 32
  (`SCALARS`; the recent and gap ones are ours, for drift);
- the user profile (one weight per value of each field, e.g. gender, age bucket,
  occupation), the target's genres, an optional user-id bias.

Every weight but the item bias starts at zero. The deep models add their own
logit, whose output projection starts at zero too, so an untrained model scores
exactly the prior's AUC. The same features feed the deep MLP: the scalars and
learned embeddings of the profile and the target's genres (`side_features`).

Smoothing (ours): a rate is `(clicks + s * prior) / (n + s)` with `s =
smoothing` (default 5); the history click rate shrinks to the training click
rate, the genre click rate to the user's smoothed click rate.

**Feedback tokens** (`feedback_tokens`): 0 padding, 1 unknown (no feedback sent),
2..6 rating 1..5 (rounded, clipped), 7 / 8 not clicked / clicked (no rating).

**References**: `popularity` is the wide part with only its initial item bias
(no training); `logreg` is the wide part (a `WideCTR` model) whose weights are a
scikit-learn `LogisticRegression` (L2, lbfgs) fitted on the training samples only
(`fit_logistic_regression`), the design matrix built by `WidePart.design` from
the same features the models use.
"""

import keras
import numpy as np
from keras import ops

from tfrec.layers.multi_route_retrieval import lookup, take_rows

FEEDBACK_VOCAB = 9
SCALARS = ("history_click_rate", "mean_rating", "log_history_length", "genre_click_rate", "log_genre_count",
           "recent_click_rate", "recent_mean_rating", "last_gap")
RECENT = 20  # behaviours of the "recent" scalars


def _logit(p):
    p = np.clip(np.asarray(p, np.float64), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p)).astype("float32")


def feedback_tokens(history_ids, labels=None, ratings=None):
    """Feedback token `(B, H)` int32 of each behaviour (see module doc).

    >>> import numpy as np
    >>> feedback_tokens(np.array([[3, 4, 5, 0]]), np.array([[1., 0., 1., 0.]]),
    ...                 np.array([[5., 2., 0., 0.]])).numpy().tolist()
    [[6, 3, 8, 0]]
    """
    valid = ops.cast(history_ids, "int32") > 0
    if labels is None and ratings is None:
        return ops.where(valid, 1, 0)
    tokens = ops.ones_like(ops.cast(history_ids, "int32"))
    if labels is not None:
        tokens = 7 + ops.cast(ops.cast(labels, "float32") > 0.5, "int32")
    if ratings is not None:
        ratings = ops.cast(ratings, "float32")
        rated = 1 + ops.cast(ops.clip(ops.round(ratings), 1.0, 5.0), "int32")
        tokens = ops.where(ratings > 0, rated, tokens)
    return ops.where(valid, tokens, 0)


def table_or_shape(value, name, dtype, ndim):
    """`(values or None, shape)` of a table given as an array or `{"shape": [...]}`."""
    if value is None:
        return None, None
    if isinstance(value, dict):
        if set(value) != {"shape"}:
            raise ValueError(f"{name} given as a dict must be {{'shape': [...]}}, got keys {sorted(value)}.")
        return None, tuple(int(s) for s in value["shape"])
    values = np.asarray(value, dtype)
    if values.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {values.shape}.")
    return values, values.shape


@keras.saving.register_keras_serializable(package="tfrec")
class WidePart(keras.layers.Layer):
    """Wide logit and side features of a lifelong CTR request (see module doc).

    Args:
        item_prior: float `(V,)` training click prior of each item id (or
            `{"shape": [V]}` when the weights come from a file).
        item_genres: optional int `(V, G)` genre ids (0 = none) or `{"shape": ...}`.
        num_users: int. User-id inputs `[0, num_users)`; 0 = no user-id bias.
        profile_sizes: list of int, vocabulary size of each user-profile field.
        global_rate: float. Training click rate (the history click rate's prior).
        smoothing: float. Pseudo-count of the smoothed rates. Defaults to 5.
        side_dim: int. Embedding size of profile values and genres in the side
            features. Defaults to 8.

    Inputs: dict with `history_ids (B, H)`, `target_id (B,)` and optionally
    `history_labels`, `history_ratings (B, H)`, `user_id (B,)`, `user_profile (B, P)`.

    Example:
    >>> import numpy as np
    >>> wide = WidePart(item_prior=np.array([0.5, 0.5, 0.2, 0.8]), global_rate=0.5)
    >>> logit, side = wide({"history_ids": np.array([[2, 3, 0]]), "target_id": np.array([3]),
    ...                     "history_labels": np.array([[0., 1., 0.]])})
    >>> round(float(logit[0]), 3), tuple(side.shape)
    (1.386, (1, 8))
    """

    def __init__(self, item_prior, item_genres=None, num_genres=None, num_users=0, profile_sizes=(),
                 global_rate=0.5, smoothing=5.0, side_dim=8, **kwargs):
        super().__init__(**kwargs)
        prior, self.prior_shape = table_or_shape(item_prior, "item_prior", "float32", 1)
        if self.prior_shape is None:
            raise ValueError("WidePart needs item_prior (V,).")
        genres, self.genres_shape = table_or_shape(item_genres, "item_genres", "int32", 2)
        if self.genres_shape is not None and self.genres_shape[0] != self.prior_shape[0]:
            raise ValueError(f"item_genres has {self.genres_shape[0]} rows, item_prior {self.prior_shape[0]}.")
        if not 0.0 < float(global_rate) < 1.0:
            raise ValueError(f"global_rate must be in (0, 1), got {global_rate}.")
        if float(smoothing) <= 0:
            raise ValueError(f"smoothing must be positive, got {smoothing}.")
        self.vocab_size = int(self.prior_shape[0])
        self.num_users = int(num_users)
        self.profile_sizes = [int(s) for s in profile_sizes]
        self.global_rate = float(global_rate)
        self.smoothing = float(smoothing)
        self.side_dim = int(side_dim)
        self._prior_values = prior
        self._genre_values = genres
        self._genre_bits = None  # `materialize`
        if self.genres_shape is not None and num_genres is None:
            if genres is None:
                raise ValueError("num_genres is required when item_genres is given as a shape.")
            num_genres = int(genres.max()) + 1
        self.num_genres = max(int(num_genres), 2) if self.genres_shape is not None else None

    def materialize(self):
        """Precompute what no request changes: each item's genres as one bit mask `(V,)`
        int32 (bit `g` = genre id `g`), so "shares a genre with the target" is one AND per
        behaviour instead of `G x G` comparisons. Exact; only when genre ids fit 31 bits
        (else nothing changes). `dematerialize()` drops it."""
        self._genre_bits = None
        if self.item_genres is not None and self.num_genres <= 31:
            genres = np.asarray(ops.convert_to_numpy(self.item_genres)).astype(np.int64)
            bits = np.where(genres > 0, np.left_shift(1, genres), 0)
            self._genre_bits = ops.convert_to_tensor(np.bitwise_or.reduce(bits, axis=1).astype(np.int32))
        return self

    def dematerialize(self):
        self._genre_bits = None
        return self

    @property
    def num_side_features(self):
        return len(SCALARS) + self.side_dim * (len(self.profile_sizes) + int(self.genres_shape is not None))

    def build(self, input_shape=None):
        v = self.vocab_size
        init = _logit(self._prior_values) if self._prior_values is not None else "zeros"
        self.item_bias = self.add_weight(shape=(v,), initializer=keras.initializers.Constant(init)
                                         if not isinstance(init, str) else init, name="item_bias")
        self.bias = self.add_weight(shape=(), initializer="zeros", name="bias")
        self.scalar_weights = self.add_weight(shape=(len(SCALARS),), initializer="zeros", name="scalar_weights")
        self.user_bias = (self.add_weight(shape=(self.num_users,), initializer="zeros", name="user_bias")
                          if self.num_users else None)
        self.profile_bias = [self.add_weight(shape=(s,), initializer="zeros", name=f"profile_bias_{j}")
                             for j, s in enumerate(self.profile_sizes)]
        self.profile_embeddings = [self.add_weight(shape=(s, self.side_dim), initializer="glorot_uniform",
                                                   name=f"profile_embedding_{j}")
                                   for j, s in enumerate(self.profile_sizes)]
        self.item_genres = self.genre_bias = self.genre_embedding = None
        if self.genres_shape is not None:
            self.item_genres = self.add_weight(shape=self.genres_shape, dtype="int32", initializer="zeros",
                                               trainable=False, name="item_genres")
            if self._genre_values is not None:
                self.item_genres.assign(self._genre_values)
            self.genre_bias = self.add_weight(shape=(self.num_genres,), initializer="zeros", name="genre_bias")
            self.genre_embedding = self.add_weight(shape=(self.num_genres, self.side_dim),
                                                   initializer="glorot_uniform", name="genre_embedding")
        super().build(input_shape)

    # --- features --------------------------------------------------------
    def scalars(self, inputs):
        """`(B, len(SCALARS))` float32 user-history scalars (module doc)."""
        history_ids = ops.cast(inputs["history_ids"], "int32")
        mask = ops.cast(history_ids > 0, "float32")  # (B, H)
        s, g = self.smoothing, self.global_rate
        labels = inputs.get("history_labels")
        known = mask if labels is not None else ops.zeros_like(mask)
        labels = ops.cast(labels, "float32") * known if labels is not None else known
        n_known, clicks = ops.sum(known, axis=1), ops.sum(labels, axis=1)
        rate = (clicks + s * g) / (n_known + s)  # (B,)
        ratings = inputs.get("history_ratings")
        if ratings is not None:
            ratings = ops.cast(ratings, "float32") * mask
            rated = ops.cast(ratings > 0, "float32")
            mean_rating = ops.sum(ratings, axis=1) / ops.maximum(ops.sum(rated, axis=1), 1.0) / 5.0
        else:
            mean_rating = ops.zeros_like(rate)
        if self.item_genres is not None:
            target_ids = ops.cast(inputs["target_id"], "int32")
            if self._genre_bits is not None:  # materialised: one int per behaviour, one AND
                bits = self._genre_bits
                shared = ops.bitwise_and(lookup(bits, history_ids),
                                         ops.take(bits, target_ids, axis=0)[:, None]) != 0  # (B, H)
            else:
                target = ops.take(self.item_genres, target_ids, axis=0)  # (B, G)
                hist = ops.take(self.item_genres, history_ids, axis=0)  # (B, H, G)
                shared = ops.any((hist[..., :, None] == target[:, None, None, :]) & (hist[..., :, None] > 0),
                                 axis=(-2, -1))  # (B, H)
            shared = ops.cast(shared, "float32")
            n_genre = ops.sum(shared * known, axis=1)
            genre_rate = (ops.sum(shared * labels, axis=1) + s * rate) / (n_genre + s)
            genre_count = ops.sum(shared * mask, axis=1)
        else:
            genre_rate, genre_count = rate, ops.zeros_like(rate)
        length = ops.sum(mask, axis=1)  # (B,); right-padded: latest at length - 1
        # The recent and last-gap scalars read only the RECENT positions before `length`, gathered
        # (B, RECENT), not masks over the whole history (same sums: integer counts and ratings).
        window = ops.cast(length, "int32")[:, None] - RECENT + ops.arange(RECENT, dtype="int32")[None]
        inside = ops.cast(window >= 0, "float32")  # (B, RECENT); short histories: fewer positions
        window = ops.maximum(window, 0)
        recent = take_rows(mask, window) * inside  # (B, RECENT)
        recent_rate = ((ops.sum(take_rows(labels, window) * recent, axis=1) + s * rate)
                       / (ops.sum(take_rows(known, window) * recent, axis=1) + s))
        if ratings is not None:
            recent_rating = (ops.sum(take_rows(ratings, window) * recent, axis=1)
                             / ops.maximum(ops.sum(take_rows(rated, window) * recent, axis=1), 1.0) / 5.0)
        else:
            recent_rating = ops.zeros_like(rate)
        gaps = inputs.get("history_gaps")
        if gaps is not None:  # the latest behaviour's gap: the window's last position
            last_gap = ops.cast(take_rows(gaps, window[:, -1:])[:, 0], "float32") * recent[:, -1] / 32.0
        else:
            last_gap = ops.zeros_like(rate)
        logit = lambda p: ops.log(p) - ops.log(1.0 - p)  # noqa: E731
        return ops.stack([logit(rate), mean_rating, ops.log1p(length), logit(genre_rate),
                          ops.log1p(genre_count), logit(recent_rate), recent_rating, last_gap], axis=1)

    def _target_genres(self, inputs):
        genres = ops.take(self.item_genres, ops.cast(inputs["target_id"], "int32"), axis=0)  # (B, G)
        return genres, ops.cast(genres > 0, "float32")

    def _profile(self, inputs, j):
        profile = inputs.get("user_profile")
        if profile is None:  # unknown profile (id 1)
            return ops.ones_like(ops.cast(inputs["target_id"], "int32"))
        return ops.clip(ops.cast(profile[:, j], "int32"), 0, self.profile_sizes[j] - 1)

    def call(self, inputs):
        """`(logit (B,), side_features (B, num_side_features))`."""
        target_ids = ops.cast(inputs["target_id"], "int32")
        scalars = self.scalars(inputs)
        logit = self.bias + ops.take(self.item_bias, target_ids, axis=0) + ops.matmul(scalars, self.scalar_weights)
        side = [scalars]
        if self.user_bias is not None and inputs.get("user_id") is not None:
            users = ops.clip(ops.cast(inputs["user_id"], "int32"), 0, self.num_users - 1)
            logit = logit + ops.take(self.user_bias, users, axis=0)
        for j in range(len(self.profile_sizes)):
            ids = self._profile(inputs, j)
            logit = logit + ops.take(self.profile_bias[j], ids, axis=0)
            side.append(ops.take(self.profile_embeddings[j], ids, axis=0))
        if self.item_genres is not None:
            genres, present = self._target_genres(inputs)
            logit = logit + ops.sum(ops.take(self.genre_bias, genres, axis=0) * present, axis=1)
            mean = ops.sum(ops.take(self.genre_embedding, genres, axis=0) * present[..., None], axis=1)
            side.append(mean / ops.maximum(ops.sum(present, axis=1, keepdims=True), 1.0))
        return logit, ops.concatenate(side, axis=-1)

    # --- logistic regression ---------------------------------------------
    def design(self, inputs):
        """Numpy design matrix blocks of a batch for `fit_logistic_regression`:
        `{"item": (B,), "user": (B,) or None, "profile": [(B,)...], "genres": (B, G) or None,
        "scalars": (B, S)}` (ids are the columns each sample activates)."""
        target_ids = np.asarray(inputs["target_id"]).astype(np.int64)
        out = {"item": target_ids, "scalars": np.asarray(self.scalars(inputs)), "user": None, "genres": None,
               "profile": [np.asarray(self._profile(inputs, j)) for j in range(len(self.profile_sizes))]}
        if self.user_bias is not None and inputs.get("user_id") is not None:
            out["user"] = np.clip(np.asarray(inputs["user_id"]).astype(np.int64), 0, self.num_users - 1)
        if self.item_genres is not None:
            out["genres"] = np.asarray(self._target_genres(inputs)[0])
        return out

    def get_config(self):
        config = super().get_config()
        config.update({
            "item_prior": {"shape": list(self.prior_shape)},
            "item_genres": {"shape": list(self.genres_shape)} if self.genres_shape else None,
            "num_genres": self.num_genres,
            "num_users": self.num_users, "profile_sizes": list(self.profile_sizes),
            "global_rate": self.global_rate, "smoothing": self.smoothing, "side_dim": self.side_dim,
        })
        return config


def wide_options(data, user_id=True, profile=True, genres=True, smoothing=5.0):
    """`WidePart` constructor arguments from a `LifelongData` (training statistics only).

    Raises `ValueError` when a requested feature is missing from the data."""
    train = data.splits["train"]
    options = {"item_prior": data.item_click_prior(), "global_rate": float(train.label.mean()),
               "smoothing": float(smoothing)}
    if genres:
        if data.item_genres is None:
            raise ValueError("the wide part asks for item genres but the data has no item table with genres "
                             "(set model.wide_genres: none)")
        options["item_genres"] = data.item_genres
        options["num_genres"] = data.genre_vocab.size
    if profile:
        if data.user_profiles is None:
            raise ValueError("the wide part asks for the user profile but the data has no user side file "
                             "(set model.wide_profile: none, or give data.users_path)")
        options["profile_sizes"] = data.profile_sizes
    if user_id:
        options["num_users"] = data.num_user_ids
    return options


HISTORY_FEATURES = ("history_labels", "history_ratings", "history_gaps")  # (B, H) beside history_ids
USER_FEATURES = ("user_id", "user_profile")  # (B,) / (B, P)


def check_ids(name, value, size):
    """Raise `ValueError` when numpy `value` holds ids outside `[0, size)` or non-integers."""
    if isinstance(value, (np.ndarray, list)):
        arr = np.asarray(value)
        if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= size):
            raise ValueError(f"{name} must be integer ids in [0, {size}), "
                             f"got dtype {arr.dtype}, range [{arr.min()}, {arr.max()}].")


def score_candidates(model, history_ids, candidate_ids, features):
    """`model.score`: click probabilities `(B, C)` of `C` candidates per history.

    `features`: optional `history_labels`, `history_ratings`, `history_gaps` `(B, H)`
    and `user_id (B,)`, `user_profile (B, P)` (absent = unknown feedback / user)."""
    unknown = sorted(set(features) - set(HISTORY_FEATURES) - set(USER_FEATURES))
    if unknown:
        raise ValueError(f"unknown score features {unknown}; known: {HISTORY_FEATURES + USER_FEATURES}.")
    check_ids("history_ids", history_ids, model.vocab_size)
    check_ids("candidate_ids", candidate_ids, model.vocab_size)
    features = {k: v for k, v in features.items() if v is not None}
    history_ids = ops.cast(history_ids, "int32")
    candidate_ids = ops.cast(candidate_ids, "int32")
    if len(candidate_ids.shape) == 1:
        candidate_ids = candidate_ids[:, None]
    features = {"history_ids": history_ids, **features}
    if not model.built:  # the first call builds the model through keras
        model({**{k: v[:1] for k, v in features.items()}, "target_id": candidate_ids[:1, 0]})
    return ops.reshape(model._candidate_probabilities(features, candidate_ids), ops.shape(candidate_ids))



@keras.saving.register_keras_serializable(package="tfrec")
class WideCTR(keras.Model):
    """The wide part alone: `sigmoid(WidePart logit)`, the `popularity` and `logreg` references.

    Inputs and `score` as `tfrec.models.ctr_baselines.CTRModel`.

    Example:
    >>> import numpy as np
    >>> model = WideCTR(wide={"item_prior": np.array([0.5, 0.5, 0.2, 0.8]), "global_rate": 0.5})
    >>> x = {"history_ids": np.array([[2, 0]]), "target_id": np.array([3])}
    >>> round(float(model(x)[0]), 3)
    0.8
    """

    def __init__(self, wide, **kwargs):
        super().__init__(**kwargs)
        self.wide = WidePart(**wide, name="wide")
        self.vocab_size = self.wide.vocab_size

    def call(self, inputs, training=False):
        return ops.sigmoid(self.wide(inputs)[0])

    def score(self, history_ids, candidate_ids, **features):
        return score_candidates(self, history_ids, candidate_ids, features)

    def compile(self, optimizer="adam", loss="binary_crossentropy", **kwargs):
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def get_config(self):
        config = super().get_config()
        config["wide"] = {k: v for k, v in self.wide.get_config().items()
                          if k not in ("name", "trainable", "dtype")}
        return config


def fit_logistic_regression(model, dataset, c=1.0, max_iter=2000):
    """Fit the wide part of `model` (a `WideCTR` or any model with `.wide`) as a
    scikit-learn L2 logistic regression on `dataset` (the *training* samples),
    then write the coefficients into its weights. Returns the fitted estimator.

    Columns: one-hot item, user, each profile field, multi-hot target genres, and
    the standardised scalars (their scale folded back into the weights). `max_iter`:
    lbfgs iterations; 200 (scikit-learn's default here before) stopped short of
    convergence on MovieLens-1M (~3.6k one-hot items), 2,000 converges."""
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression

    wide = model.wide
    blocks, labels = [], []
    for features, label in dataset:
        if not wide.built:
            model(features)
        blocks.append(wide.design(features))
        labels.append(np.asarray(label))
    y = np.concatenate(labels)
    n = len(y)
    cat = lambda key: np.concatenate([b[key] for b in blocks])  # noqa: E731
    scalars = cat("scalars").astype(np.float64)
    mean, std = scalars.mean(0), scalars.std(0) + 1e-6
    columns, offset, slots = [sp.csr_matrix((scalars - mean) / std)], len(SCALARS), {}

    def one_hot(ids, size, key):
        nonlocal offset
        rows = np.repeat(np.arange(n), ids.shape[1] if ids.ndim == 2 else 1)
        flat = ids.reshape(-1)
        keep = flat > 0 if ids.ndim == 2 else np.ones(len(flat), bool)
        columns.append(sp.csr_matrix((np.ones(keep.sum()), (rows[keep], flat[keep])), shape=(n, size)))
        slots[key] = (offset, size)
        offset += size

    one_hot(cat("item"), wide.vocab_size, "item")
    if blocks[0]["user"] is not None:
        one_hot(cat("user"), wide.num_users, "user")
    for j, size in enumerate(wide.profile_sizes):
        one_hot(np.concatenate([b["profile"][j] for b in blocks]), size, f"profile_{j}")
    if blocks[0]["genres"] is not None:
        one_hot(cat("genres"), wide.genre_bias.shape[0], "genres")
    x = sp.hstack(columns).tocsr()
    estimator = LogisticRegression(C=c, max_iter=max_iter, solver="lbfgs").fit(x, y)
    coef = estimator.coef_[0]
    weights = coef[:len(SCALARS)] / std
    wide.scalar_weights.assign(weights.astype("float32"))
    wide.bias.assign(np.float32(estimator.intercept_[0] - (weights * mean).sum()))
    get = lambda key: coef[slots[key][0]:slots[key][0] + slots[key][1]].astype("float32")  # noqa: E731
    wide.item_bias.assign(get("item"))
    if "user" in slots:
        wide.user_bias.assign(get("user"))
    for j in range(len(wide.profile_sizes)):
        wide.profile_bias[j].assign(get(f"profile_{j}"))
    if "genres" in slots:
        wide.genre_bias.assign(get("genres"))
    return estimator
