"""Tests for tfrec.layers.residual_quantizer: codes, reconstruction, k-means, RQ-VAE training.

Hand-made codebooks check the exact behaviour (nearest codeword per level on the
residuals, exact round trip for points at codeword sums, ties to the lowest id);
small synthetic clustered data checks fitting (RQ-KMeans level by level, RQ-VAE
with `model.fit`), dead-code resets, determinism and `keras.saving` round trips.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfrec.layers.residual_quantizer import ResidualQuantizer, kmeans, nearest_codewords


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def hand_quantizer(codebooks):
    """A built rqkmeans quantizer with the given codebooks (one (K, D) list per level)."""
    codebooks = [np.asarray(cb, dtype="float32") for cb in codebooks]
    rq = ResidualQuantizer(num_levels=len(codebooks), codebook_size=[len(cb) for cb in codebooks])
    rq.build((None, codebooks[0].shape[1]))
    for variable, table in zip(rq.codebooks, codebooks):
        variable.assign(table)
    return rq


def clustered_data(num_points=512, dim=16, num_coarse=8, num_fine=4, noise=0.02, seed=0):
    """Points = coarse centre + fine offset + small noise: a two-level structure."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(num_coarse, dim))
    fine = 0.3 * rng.normal(size=(num_fine, dim))
    x = coarse[rng.integers(num_coarse, size=num_points)] + fine[rng.integers(num_fine, size=num_points)]
    return (x + noise * rng.normal(size=x.shape)).astype("float32")


COARSE = [[0, 0], [10, 0], [0, 10], [10, 10]]
FINE = [[0, 0], [1, 0], [0, 1], [-1, 0]]


def test_round_trip_is_exact_for_points_at_codeword_sums():
    rq = hand_quantizer([COARSE, FINE])
    codes = np.array([[i, j] for i in range(4) for j in range(4)], dtype="int32")  # every code
    x = np.asarray(COARSE, "float32")[codes[:, 0]] + np.asarray(FINE, "float32")[codes[:, 1]]
    assigned = to_numpy(rq.compute_codes(x))
    assert assigned.dtype == np.int32 and assigned.shape == (16, 2)
    np.testing.assert_array_equal(assigned, codes)
    np.testing.assert_array_equal(to_numpy(rq.reconstruct(assigned)), x)
    # A prefix of the code reconstructs with the first levels only.
    np.testing.assert_array_equal(to_numpy(rq.reconstruct(assigned[:, :1])), np.asarray(COARSE)[codes[:, 0]])
    # `call` (rqkmeans) returns the same reconstruction and adds no loss.
    np.testing.assert_array_equal(to_numpy(rq(x)), x)
    assert rq.losses == []


def test_codes_are_nearest_codewords_on_residuals():
    rq = hand_quantizer([[[0, 0], [4, 0]], [[0, 0], [0, 1], [1, 1]]])
    x = np.array(
        [
            [3.0, 0.8],  # level 0: |x-(0,0)|^2=9.64, |x-(4,0)|^2=1.64 -> 1; residual (-1, .8): 1.64, 1.04, 4.04 -> 1
            [0.9, 1.2],  # level 0 -> 0; residual (.9, 1.2): 2.25, .85, .05 -> 2
            [2.0, 0.0],  # tie at level 0 -> lowest id 0; residual (2, 0): 4, 5, 2 -> 2
            [5.0, -3.0],  # level 0 -> 1; residual (1, -3): 10, 17, 17 -> 0
        ],
        "float32",
    )
    np.testing.assert_array_equal(to_numpy(rq.compute_codes(x)), [[1, 1], [0, 2], [0, 2], [1, 0]])
    np.testing.assert_array_equal(to_numpy(nearest_codewords(x, np.array([[0, 0], [4, 0]], "float32"))), [1, 0, 0, 1])


def test_rqkmeans_reduces_error_level_by_level_and_recovers_structure():
    x = clustered_data(num_coarse=8, num_fine=4)
    rq = ResidualQuantizer(num_levels=3, codebook_size=[8, 4, 4], seed=0).fit_rqkmeans(x, iterations=25)
    codes = to_numpy(rq.compute_codes(x))
    mse = [float(np.mean((x - to_numpy(rq.reconstruct(codes[:, : level + 1]))) ** 2)) for level in range(3)]
    baseline = float(np.mean((x - x.mean(0)) ** 2))
    assert baseline > mse[0] > mse[1] > mse[2], (baseline, mse)
    # Two levels match the generating structure: what is left is about the noise (0.02^2 = 4e-4).
    assert mse[1] < 2e-3, mse
    assert not rq.trainable_weights  # k-means codebooks are not trained by gradient


def test_kmeans_handles_duplicates_and_empty_clusters():
    # 3 distinct points for 4 clusters: k-means++ must duplicate a centre; the
    # empty cluster is re-seeded, nothing becomes NaN and every point is a centre.
    x = np.array([[0, 0]] * 4 + [[1, 1]] * 3 + [[5, 5]] * 3, "float32")
    centroids = kmeans(x, 4, iterations=10, seed=0)
    assert np.all(np.isfinite(centroids))
    for point in ([0, 0], [1, 1], [5, 5]):
        assert np.any(np.all(np.isclose(centroids, point), axis=1)), (point, centroids)
    with pytest.raises(ValueError, match="at least as many points as clusters: got 10 points for 16"):
        kmeans(x, 16)


def test_rqkmeans_is_deterministic_given_a_seed():
    x = clustered_data(num_points=256)

    def fit(seed):
        rq = ResidualQuantizer(num_levels=2, codebook_size=8).fit_rqkmeans(x, seed=seed)
        return [to_numpy(cb) for cb in rq.codebooks], to_numpy(rq.compute_codes(x))

    (books_a, codes_a), (books_b, codes_b), (books_c, _) = fit(3), fit(3), fit(4)
    for a, b in zip(books_a, books_b):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(codes_a, codes_b)
    assert not all(np.array_equal(a, c) for a, c in zip(books_a, books_c))


def test_rqvae_trains_with_model_fit():
    # 512 points from 8 coarse x 4 fine clusters in 16-d: variance ~1.1 per entry,
    # ~0.07 of it in the fine offsets. A short fit (240 steps) must capture the
    # coarse level and part of the fine one.
    x = clustered_data(num_points=512, num_coarse=8, num_fine=4)
    rq = ResidualQuantizer(
        num_levels=2, codebook_size=[8, 4], mode="rqvae", latent_dim=8, hidden_dims=[32], seed=0
    )
    history = rq.fit_rqvae(x, epochs=30, batch_size=64, seed=0, learning_rate=3e-3)
    losses = history.history["loss"]
    assert losses[-1] < 0.25 * losses[0], losses
    codes = to_numpy(rq.compute_codes(x))
    x_hat = to_numpy(rq.reconstruct(codes))
    cosine = np.sum(x * x_hat, 1) / np.linalg.norm(x, axis=1) / np.linalg.norm(x_hat, axis=1)
    # Stated bounds: reconstruction MSE < 0.1 (< 10% of the data variance), mean
    # cosine > 0.95, and at least 7 of 8 / 3 of 4 codewords used.
    assert np.mean((x - x_hat) ** 2) < 0.1
    assert cosine.mean() > 0.95
    assert len(np.unique(codes[:, 0])) >= 7 and len(np.unique(codes[:, 1])) >= 3


def test_rqvae_fit_is_deterministic_given_a_seed():
    x = clustered_data(num_points=128)

    def fit():
        rq = ResidualQuantizer(num_levels=2, codebook_size=4, mode="rqvae", latent_dim=4, hidden_dims=[8], seed=2)
        history = rq.fit_rqvae(x, epochs=2, batch_size=32, seed=5)
        return history.history["loss"], [to_numpy(w) for w in rq.weights]

    (loss_a, weights_a), (loss_b, weights_b) = fit(), fit()
    assert loss_a == loss_b
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_array_equal(a, b)


def test_rqvae_call_adds_loss_and_straight_through_gradients_reach_every_weight():
    x = clustered_data(num_points=64)
    rq = ResidualQuantizer(num_levels=2, codebook_size=4, mode="rqvae", latent_dim=4, hidden_dims=[8])
    rq.build((None, x.shape[1]))
    with tf.GradientTape() as tape:
        x_hat = rq(x)
        loss = tf.add_n(rq.losses)
    assert x_hat.shape == x.shape and len(rq.losses) == 1
    grads = tape.gradient(loss, rq.trainable_weights)
    names = [w.path for w in rq.trainable_weights]
    assert len(names) == 2 * 2 + 2 * 2 + 2  # encoder 2 Dense, decoder 2 Dense, 2 codebooks
    for name, grad in zip(names, grads):
        assert grad is not None and float(tf.reduce_sum(tf.abs(grad))) > 0, name


def test_dead_code_reset_revives_unused_codes():
    x = clustered_data(num_points=256)
    rq = ResidualQuantizer(num_levels=2, codebook_size=8, dead_code_threshold=1).fit_rqkmeans(x)
    table = to_numpy(rq.codebooks[0]).copy()
    table[3] = 1e3  # far from every point: never used
    rq.codebooks[0].assign(table)
    assert 3 not in to_numpy(rq.compute_codes(x))[:, 0]
    num_reset = rq.reset_dead_codes(x, seed=0)
    assert num_reset[0] == 1
    codes = to_numpy(rq.compute_codes(x))
    assert sorted(np.unique(codes[:, 0])) == list(range(8))
    revived = to_numpy(rq.codebooks[0])[3]
    assert np.any(np.all(np.isclose(x, revived), axis=1))  # re-seeded from a (level-0 residual =) point
    assert rq.reset_dead_codes(x) == [0, 0]  # nothing left to reset


@pytest.mark.parametrize("mode", ["rqkmeans", "rqvae"])
def test_save_load_round_trip_gives_identical_codes(mode, tmp_path):
    x = clustered_data(num_points=128)
    rq = ResidualQuantizer(
        num_levels=2, codebook_size=[8, 4], mode=mode, latent_dim=4, hidden_dims=[8], seed=1
    )
    if mode == "rqvae":
        rq.build((None, x.shape[1]))  # random weights are enough for a round trip; fitting is tested above
    else:
        rq.fit_rqkmeans(x)
    config = rq.get_config()
    assert {k: config[k] for k in ("num_levels", "codebook_size", "mode", "latent_dim", "hidden_dims",
                                    "commitment_weight", "dead_code_threshold", "seed")} == {
        "num_levels": 2, "codebook_size": [8, 4], "mode": mode, "latent_dim": 4, "hidden_dims": [8],
        "commitment_weight": 0.25, "dead_code_threshold": 1, "seed": 1,
    }
    json.dumps(keras.saving.serialize_keras_object(rq))
    assert ResidualQuantizer.from_config(config).get_config() == config

    model = keras.Sequential([keras.Input((x.shape[1],)), rq])
    model.save(tmp_path / "rq.keras")
    restored = keras.saving.load_model(tmp_path / "rq.keras", compile=False).layers[-1]
    assert isinstance(restored, ResidualQuantizer)
    codes = to_numpy(rq.compute_codes(x))
    np.testing.assert_array_equal(to_numpy(restored.compute_codes(x)), codes)
    np.testing.assert_allclose(to_numpy(restored.reconstruct(codes)), to_numpy(rq.reconstruct(codes)), atol=1e-6)


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="list of num_levels=3 ints, got \\[8, 8\\]"):
        ResidualQuantizer(num_levels=3, codebook_size=[8, 8])
    with pytest.raises(ValueError, match="mode must be one of .* got 'vq'"):
        ResidualQuantizer(mode="vq")
    with pytest.raises(ValueError, match="integer >= 2"):
        ResidualQuantizer(codebook_size=1)
    rq = ResidualQuantizer(num_levels=2, codebook_size=4)
    with pytest.raises(ValueError, match="no codebooks yet"):
        rq.compute_codes(np.zeros((3, 2), "float32"))
    with pytest.raises(ValueError, match="use fit_rqkmeans"):
        rq.fit_rqvae(np.zeros((8, 2), "float32"))
    with pytest.raises(ValueError, match="level 0: k-means needs at least as many points as clusters: got 3"):
        rq.fit_rqkmeans(np.random.default_rng(0).normal(size=(3, 2)))
    rq = hand_quantizer([COARSE, FINE])
    with pytest.raises(ValueError, match="has dim 3, but this quantizer was built for dim 2"):
        rq.compute_codes(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        rq.compute_codes(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="code 4 at level 1 \\(row 1\\) is outside \\[0, 4\\)"):
        rq.reconstruct(np.array([[0, 0], [1, 4]]))
    with pytest.raises(ValueError, match="1 <= l <= 2"):
        rq.reconstruct(np.zeros((2, 3), "int32"))
