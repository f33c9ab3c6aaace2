"""Residual quantizer: a vector -> a short code of `num_levels` codeword ids.

Level 0 quantizes the vector to its nearest codeword, level 1 quantizes the
residual left over, and so on; the reconstruction is the sum of the chosen
codewords. Two ways to obtain the codebooks:

- `mode="rqkmeans"`: codebooks fitted level by level with k-means on the
  residuals of the input vectors (`fit_rqkmeans`): no encoder, no gradient.
- `mode="rqvae"`: an MLP encoder maps the input to a `latent_dim` latent, the
  latent is residual-quantized, an MLP decoder reconstructs the input
  (`fit_rqvae`, or any `model.fit` over a model that calls the layer).

RQ-VAE training (`call`): reconstruction `||x - x_hat||^2` plus, per level,
the codebook term `||sg(r_l) - e_l||^2` and the commitment term
`commitment_weight * ||r_l - sg(e_l)||^2` (squared L2 norms, batch means),
added with `add_loss`. The decoder sees the quantized latent through a
straight-through estimator `z + sg(z_q - z)`. Codebooks are learned by
**gradient** through the codebook term (ours: chosen over EMA updates because it
needs no state updates inside `call` and works with a plain `model.fit`); the
residual passed to level l+1 subtracts `sg(e_l)`, so the commitment terms train
the encoder only. Dead codes (used by fewer than `dead_code_threshold` items
when the whole training set is quantized, checked after every epoch of
`fit_rqvae`) are re-seeded from random current residuals (`reset_dead_codes`).
Codebooks are initialised by residual k-means on the latents of the first
shuffled rows (the standard trick), so training starts with used codes.

Ties in nearest-codeword search go to the lowest codeword id. k-means uses
k-means++ seeding, a fixed number of Lloyd iterations (stopping early once
assignments are stable) and re-seeds an empty cluster with the point farthest
from its centroid; everything is driven by one `numpy` generator per seed, so a
fit is deterministic.

References:
- Lee et al., "Autoregressive Image Generation using Residual Quantization", CVPR 2022 (RQ-VAE).
- Rajput et al., "Recommender Systems with Generative Retrieval", NeurIPS 2023 (TIGER:
  semantic IDs from an RQ-VAE over item text embeddings; 3 levels x 256 codes,
  commitment weight 0.25, k-means codebook initialisation).
"""

import keras
import numpy as np
from keras import ops


def nearest_codewords(x, codebook):
    """Id of the nearest codeword (squared L2) for each row; ties -> lowest id.

    Args:
        x: `(N, D)` float tensor or array.
        codebook: `(K, D)` float tensor or array.

    Returns:
        `(N,)` int32 tensor.
    """
    # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2; ||x||^2 does not change the argmin.
    scores = ops.sum(ops.square(codebook), axis=-1)[None, :] - 2.0 * ops.matmul(
        x, ops.transpose(codebook)
    )  # (N, K)
    return ops.cast(ops.argmin(scores, axis=-1), "int32")


def _nearest_numpy(x, codebook):
    return ops.convert_to_numpy(nearest_codewords(x, codebook)).astype(np.int64)


def kmeans(x, num_clusters, iterations=20, seed=0):
    """k-means with k-means++ seeding; deterministic given `seed`.

    Args:
        x: `(N, D)` float array, N >= `num_clusters`.
        num_clusters: int. Number of centroids K.
        iterations: int. Maximum Lloyd iterations (stops early when stable).
        seed: int. Seed of the numpy generator used for seeding.

    Returns:
        `(K, D)` float32 centroids.

    Example:
    >>> np.sort(kmeans(np.array([[0.0], [0.1], [5.0], [5.1]]), 2)[:, 0]).astype(float).round(2).tolist()
    [0.05, 5.05]
    """
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    if n < num_clusters:
        raise ValueError(
            f"k-means needs at least as many points as clusters: got {n} points for "
            f"{num_clusters} clusters; use a smaller codebook_size."
        )
    rng = np.random.default_rng(seed)
    x64 = x.astype(np.float64)
    sq_norms = np.sum(x64 * x64, axis=1)  # (N,)
    # k-means++: each new centroid is a point drawn with probability ~ D(x)^2.
    chosen = [int(rng.integers(n))]
    min_d2 = np.maximum(sq_norms - 2.0 * x64 @ x64[chosen[0]] + sq_norms[chosen[0]], 0.0)
    for _ in range(1, num_clusters):
        total = min_d2.sum()
        if total > 0:
            nxt = int(rng.choice(n, p=min_d2 / total))
        else:  # every point coincides with a centroid: duplicates (re-seeded below if empty)
            nxt = int(rng.integers(n))
        chosen.append(nxt)
        d2 = np.maximum(sq_norms - 2.0 * x64 @ x64[nxt] + sq_norms[nxt], 0.0)
        np.minimum(min_d2, d2, out=min_d2)
    centroids = x64[chosen].copy()  # (K, D)

    previous = None
    for _ in range(iterations):
        assign = _nearest_numpy(x, centroids.astype(np.float32))  # (N,)
        counts = np.bincount(assign, minlength=num_clusters)
        order = np.argsort(assign, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        nonempty = counts > 0
        sums = np.add.reduceat(x64[order], starts[nonempty], axis=0)  # (K_nonempty, D)
        centroids[nonempty] = sums / counts[nonempty, None]
        empty = np.flatnonzero(~nonempty)
        if empty.size:
            # Re-seed empty clusters with the points farthest from their centroid.
            d2 = np.sum((x64 - centroids[assign]) ** 2, axis=1)
            farthest = np.argsort(-d2, kind="stable")[: empty.size]
            centroids[empty] = x64[farthest]
        elif previous is not None and np.array_equal(assign, previous):
            break
        previous = assign
    return centroids.astype(np.float32)


@keras.saving.register_keras_serializable(package="tfrec")
class ResidualQuantizer(keras.layers.Layer):
    """Residual quantizer (RQ-KMeans or RQ-VAE) producing semantic-ID codes.

    Args:
        num_levels: int. Code length L. Defaults to 3.
        codebook_size: int or list of L ints. Codewords per level. Defaults to 256.
        mode: `"rqkmeans"` (codebooks by residual k-means on the inputs) or
            `"rqvae"` (MLP encoder/decoder, codebooks on the latents).
            Defaults to `"rqkmeans"`.
        latent_dim: int. RQ-VAE latent size (ignored for rqkmeans). Defaults to 32.
        hidden_dims: list of ints. RQ-VAE encoder hidden sizes (ReLU); the
            decoder mirrors them. Defaults to `(256, 128)`.
        commitment_weight: float. Beta of the commitment term. Defaults to 0.25.
        dead_code_threshold: int. In `reset_dead_codes`, codewords used by fewer
            items than this are re-seeded; 0 disables resets. Defaults to 1.
        seed: int. Seeds the initializers and, unless overridden, the fits.

    Call args:
        x: `(batch, input_dim)` float. Returns the reconstruction
            `(batch, input_dim)`; in rqvae mode also adds the training losses.

    Example:
    >>> x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    >>> rq = ResidualQuantizer(num_levels=2, codebook_size=4).fit_rqkmeans(x)
    >>> codes = rq.compute_codes(x)            # (64, 2) int32
    >>> tuple(rq.reconstruct(codes).shape)     # sum of the chosen codewords
    (64, 8)
    """

    MODES = ("rqkmeans", "rqvae")

    def __init__(
        self,
        num_levels=3,
        codebook_size=256,
        mode="rqkmeans",
        latent_dim=32,
        hidden_dims=(256, 128),
        commitment_weight=0.25,
        dead_code_threshold=1,
        seed=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(num_levels) < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}.")
        sizes = [codebook_size] * int(num_levels) if np.isscalar(codebook_size) else list(codebook_size)
        if len(sizes) != int(num_levels):
            raise ValueError(
                f"codebook_size must be an int or a list of num_levels={num_levels} ints, got {codebook_size}."
            )
        if any(int(k) != k or k < 2 for k in sizes):
            raise ValueError(f"every codebook size must be an integer >= 2, got {codebook_size}.")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}.")
        if int(latent_dim) < 1 or any(int(h) < 1 for h in hidden_dims):
            raise ValueError(f"latent_dim and hidden_dims must be positive, got {latent_dim}, {hidden_dims}.")
        if commitment_weight < 0 or dead_code_threshold < 0:
            raise ValueError(
                f"commitment_weight and dead_code_threshold must be >= 0, got "
                f"{commitment_weight}, {dead_code_threshold}."
            )
        self.num_levels = int(num_levels)
        self.codebook_size = int(codebook_size) if np.isscalar(codebook_size) else [int(k) for k in sizes]
        self.codebook_sizes = [int(k) for k in sizes]
        self.mode = mode
        self.latent_dim = int(latent_dim)
        self.hidden_dims = [int(h) for h in hidden_dims]
        self.commitment_weight = float(commitment_weight)
        self.dead_code_threshold = int(dead_code_threshold)
        self.seed = int(seed)

    # === Build ===
    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None or len(input_shape) != 2:
            raise ValueError(f"ResidualQuantizer expects inputs (batch, dim) with a known dim, got {input_shape}.")
        self.input_dim = int(input_dim)
        self.code_dim = self.latent_dim if self.mode == "rqvae" else self.input_dim
        self.encoder_layers, self.decoder_layers = [], []
        if self.mode == "rqvae":
            self.encoder_layers = self._mlp(self.hidden_dims, self.latent_dim, self.input_dim, "encoder", 0)
            self.decoder_layers = self._mlp(
                self.hidden_dims[::-1], self.input_dim, self.latent_dim, "decoder", 100
            )
        self.codebooks = [
            self.add_weight(
                shape=(k, self.code_dim),
                initializer=keras.initializers.RandomNormal(stddev=0.02, seed=self.seed + 1000 + level),
                trainable=self.mode == "rqvae",
                name=f"codebook_{level}",
            )
            for level, k in enumerate(self.codebook_sizes)
        ]
        self.built = True

    def _mlp(self, hidden, out_dim, in_dim, prefix, seed_offset):
        layers = []
        for i, units in enumerate([*hidden, out_dim]):
            last = i == len(hidden)
            layer = keras.layers.Dense(
                units,
                activation=None if last else "relu",
                kernel_initializer=keras.initializers.GlorotUniform(seed=self.seed + seed_offset + i),
                name=f"{prefix}_{'out' if last else i}",
            )
            layer.build((None, in_dim))
            in_dim = units
            layers.append(layer)
        return layers

    # === Encode / quantize / reconstruct ===
    def encode(self, x):
        """Vectors to be quantized: the RQ-VAE latent, or `x` itself. `(N, code_dim)`."""
        z = ops.convert_to_tensor(x, dtype="float32")
        for layer in self.encoder_layers:
            z = layer(z)
        return z

    def decode(self, z):
        """Inverse of `encode`: the RQ-VAE decoder, or the identity. `(N, input_dim)`."""
        for layer in self.decoder_layers:
            z = layer(z)
        return z

    def _residual_quantize(self, z):
        """Greedy residual quantization of `z (N, code_dim)`: codes and training losses."""
        residual, quantized = z, ops.zeros_like(z)
        codes, codebook_loss, commitment_loss = [], 0.0, 0.0
        for codebook in self.codebooks:
            idx = nearest_codewords(residual, codebook)  # (N,)
            selected = ops.take(codebook, idx, axis=0)  # (N, code_dim)
            codebook_loss += ops.mean(ops.sum(ops.square(ops.stop_gradient(residual) - selected), axis=-1))
            commitment_loss += ops.mean(ops.sum(ops.square(residual - ops.stop_gradient(selected)), axis=-1))
            residual = residual - ops.stop_gradient(selected)
            quantized = quantized + selected
            codes.append(idx)
        return ops.stack(codes, axis=-1), quantized, codebook_loss, commitment_loss

    def _check_inputs(self, x, what="x"):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"{what} must be a (num_items, dim) matrix, got shape {x.shape}.")
        if self.built and x.shape[1] != self.input_dim:
            raise ValueError(f"{what} has dim {x.shape[1]}, but this quantizer was built for dim {self.input_dim}.")
        if not np.all(np.isfinite(x)):
            bad_row = np.argwhere(~np.isfinite(x))[0, 0]
            raise ValueError(f"{what} contains NaN or infinite values (first bad row {bad_row}).")
        if not self.built:
            self.build((None, x.shape[1]))
        return x

    def _require_built(self, what):
        if not self.built:
            raise ValueError(f"{what}: this quantizer has no codebooks yet; call fit_rqkmeans/fit_rqvae first.")

    def compute_codes(self, x, batch_size=8192):
        """Codes `(N, num_levels)` int32: nearest codeword per level on the residuals.

        (Not named `quantize`: `keras.layers.Layer.quantize` is Keras' weight
        quantization API, e.g. `model.quantize("int8")`.)
        """
        self._require_built("compute_codes")
        x = self._check_inputs(x)
        chunks = [
            self._residual_quantize(self.encode(x[i : i + batch_size]))[0] for i in range(0, len(x), batch_size)
        ]
        return ops.concatenate(chunks, axis=0) if chunks else ops.zeros((0, self.num_levels), "int32")

    def reconstruct(self, codes):
        """Reconstruction `(N, input_dim)` from codes `(N, l)`, 1 <= l <= num_levels.

        With fewer than `num_levels` columns, only the first levels are used
        (prefix reconstruction). Codes must lie in `[0, codebook_size)` per level.
        """
        self._require_built("reconstruct")
        codes = np.asarray(ops.convert_to_numpy(codes))
        if codes.ndim != 2 or not 1 <= codes.shape[1] <= self.num_levels:
            raise ValueError(f"codes must be (N, l) with 1 <= l <= {self.num_levels}, got shape {codes.shape}.")
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}.")
        for level in range(codes.shape[1]):
            bad = (codes[:, level] < 0) | (codes[:, level] >= self.codebook_sizes[level])
            if bad.any():
                raise ValueError(
                    f"code {codes[bad, level][0]} at level {level} (row {np.flatnonzero(bad)[0]}) is outside "
                    f"[0, {self.codebook_sizes[level]})."
                )
        quantized = ops.zeros((len(codes), self.code_dim))
        for level in range(codes.shape[1]):
            quantized = quantized + ops.take(self.codebooks[level], codes[:, level].astype("int32"), axis=0)
        return self.decode(quantized)  # (N, input_dim)

    def call(self, x):
        z = self.encode(x)  # (batch, code_dim)
        _, quantized, codebook_loss, commitment_loss = self._residual_quantize(z)
        if self.mode == "rqkmeans":
            return quantized
        x_hat = self.decode(z + ops.stop_gradient(quantized - z))  # straight-through
        reconstruction_loss = ops.mean(ops.sum(ops.square(ops.convert_to_tensor(x) - x_hat), axis=-1))
        self.add_loss(reconstruction_loss + codebook_loss + self.commitment_weight * commitment_loss)
        return x_hat

    def compute_output_shape(self, input_shape):
        return input_shape

    # === Fitting ===
    def _fit_codebooks_kmeans(self, z, iterations, seed):
        residual = np.asarray(z, dtype=np.float32)
        for level, (codebook, k) in enumerate(zip(self.codebooks, self.codebook_sizes)):
            try:
                centroids = kmeans(residual, k, iterations=iterations, seed=seed + level)
            except ValueError as err:
                raise ValueError(f"level {level}: {err}") from None
            codebook.assign(centroids)
            residual = residual - centroids[_nearest_numpy(residual, centroids)]

    def fit_rqkmeans(self, x, iterations=20, seed=None):
        """Fit the codebooks by k-means on the residuals, level by level. Returns `self`.

        Args:
            x: `(N, input_dim)` float array, N >= every codebook size.
            iterations: int. Lloyd iterations per level.
            seed: int. Defaults to the layer's `seed`.
        """
        if self.mode != "rqkmeans":
            raise ValueError(
                f"fit_rqkmeans needs mode='rqkmeans', this quantizer has mode={self.mode!r}; use fit_rqvae."
            )
        x = self._check_inputs(x)
        self._fit_codebooks_kmeans(x, iterations, self.seed if seed is None else int(seed))
        return self

    def reset_dead_codes(self, x, seed=None):
        """Re-seed codewords used by fewer than `dead_code_threshold` rows of `x`.

        Levels are processed in order; a dead codeword becomes the current
        residual of a random row (without replacement), so it is used at once.
        Returns the number of codewords re-seeded per level.
        """
        self._require_built("reset_dead_codes")
        x = self._check_inputs(x)
        rng = np.random.default_rng(self.seed if seed is None else seed)
        residual = ops.convert_to_numpy(self.encode(x)).astype(np.float32)
        num_reset = []
        for codebook, k in zip(self.codebooks, self.codebook_sizes):
            table = ops.convert_to_numpy(codebook).copy()
            counts = np.bincount(_nearest_numpy(residual, table), minlength=k)
            dead = np.flatnonzero(counts < self.dead_code_threshold)
            if dead.size:
                rows = rng.choice(len(residual), size=dead.size, replace=dead.size > len(residual))
                table[dead] = residual[rows]
                codebook.assign(table)
            num_reset.append(int(dead.size))
            residual = residual - table[_nearest_numpy(residual, table)]
        return num_reset

    def fit_rqvae(
        self,
        x,
        epochs=50,
        batch_size=256,
        seed=None,
        learning_rate=1e-3,
        kmeans_init_size=None,
        kmeans_iterations=20,
        verbose=0,
    ):
        """Train the RQ-VAE with `model.fit`; returns the Keras `History`.

        Codebooks start as residual k-means of the latents of the first
        `kmeans_init_size` shuffled rows (default: `max(batch_size, 16 * max codebook
        size)`, capped at N). After every epoch, `reset_dead_codes` runs over `x`.
        Shuffling is by `tf.data` with `seed`, so a fit is repeatable.
        """
        if self.mode != "rqvae":
            raise ValueError(f"fit_rqvae needs mode='rqvae', this quantizer has mode={self.mode!r}; use fit_rqkmeans.")
        import tensorflow as tf

        x = self._check_inputs(x)
        seed = self.seed if seed is None else int(seed)
        rng = np.random.default_rng(seed)
        init_size = kmeans_init_size or max(batch_size, 16 * max(self.codebook_sizes))
        init_rows = x[rng.permutation(len(x))[: min(len(x), max(init_size, max(self.codebook_sizes)))]]
        self._fit_codebooks_kmeans(ops.convert_to_numpy(self.encode(init_rows)), kmeans_iterations, seed)

        inputs = keras.Input((self.input_dim,))
        model = keras.Model(inputs, self(inputs))
        model.compile(optimizer=keras.optimizers.Adam(learning_rate))
        data = (
            tf.data.Dataset.from_tensor_slices(x)
            .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size)
        )
        callbacks = []
        if self.dead_code_threshold > 0:
            callbacks.append(
                keras.callbacks.LambdaCallback(
                    on_epoch_end=lambda epoch, logs: self.reset_dead_codes(x, seed=seed + 1 + epoch)
                )
            )
        return model.fit(data, epochs=epochs, verbose=verbose, callbacks=callbacks, shuffle=False)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_levels": self.num_levels,
                "codebook_size": self.codebook_size,
                "mode": self.mode,
                "latent_dim": self.latent_dim,
                "hidden_dims": self.hidden_dims,
                "commitment_weight": self.commitment_weight,
                "dead_code_threshold": self.dead_code_threshold,
                "seed": self.seed,
            }
        )
        return config
