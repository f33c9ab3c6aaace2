"""Tests for the training engine (`tfrec.training.engine`).

- budget: a run with a 20 s budget ends within 5% of it (checked inside the epoch);
- early stopping restores the best epoch's weights; seeds reproduce;
- resume: a checkpoint restores weights, optimiser, random-generator and
  early-stopping state, so a resumed run ends where an uninterrupted one does
  (in-process here; `tests/test_engine_resume.py` kills a real `tfrec train`);
- two workers on 127.0.0.1 (MultiWorkerMirroredStrategy) reach one worker's loss;
- config: the shared engine keys, checks, `describe_keys`.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfrec.config import EngineConfig, ExperimentConfig, TrainConfig, describe_keys, load_config
from tfrec.ctr import CTRTrainConfig, load_ctr_config
from tfrec.training.engine import fit, make_strategy

ROOT = Path(__file__).resolve().parents[1]


def data(n=512, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def small_model(seed=0, dropout=0.2):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dropout(dropout), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", jit_compile=False)
    return model


def epoch_data(x, y, seed, batch_size=32):
    return lambda epoch: tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed + epoch).batch(batch_size)


class NegMSE:
    def __init__(self, x, y):
        self.x, self.y = x, y
        self.calls = 0

    def evaluate(self, model):
        self.calls += 1
        pred = keras.ops.convert_to_numpy(model(self.x, training=False))
        return {"neg_mse": -float(np.mean((pred - self.y) ** 2))}


class Scripted:
    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def evaluate(self, model):
        self.calls += 1
        return {"auc": self.values[self.calls - 1]}


class WeightLog(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append([np.array(w) for w in self.model.get_weights()])


# ------------------------------------------------------------------ budget
def test_budget_of_20_seconds_is_respected_within_5_percent():
    x, y = data(4096)
    model = small_model()
    config = EngineConfig(epochs=10_000, patience=10_000, monitor="neg_mse", max_train_seconds=20.0)
    start = time.perf_counter()
    result = fit(model, epoch_data(x, y, 0, batch_size=8), NegMSE(*data(256, 1)), config, verbose=0)
    wall = time.perf_counter() - start
    assert result.stopped_by == "budget"
    assert wall <= 20.0 * 1.05, wall
    assert result.train_seconds >= 20.0 * 0.95, result.train_seconds  # the budget is used, not cut short
    assert result.epochs == len(result.validation_curve) >= 1


def test_budget_stops_inside_the_epoch_and_validates_the_partial_epoch():
    x, y = data(2048)
    model = small_model()
    batches = []

    class Count(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            batches.append(batch)
            time.sleep(0.005)  # >= 10 s per epoch however fast the machine is

    config = EngineConfig(epochs=3, patience=10, monitor="neg_mse", max_train_seconds=3.0)
    slow = epoch_data(x, y, 0, batch_size=1)  # 2048 batches of >= 5 ms: far more than 3 s
    model.fit(slow(0).take(2), verbose=0)  # trace the train step first (its compile time is not the point here)
    evaluator = NegMSE(*data(64, 1))
    evaluator.evaluate(model)  # ... nor the evaluator's first call (before a first validation its time is unknown)
    result = fit(model, slow, evaluator, config, verbose=0, callbacks=[Count()])
    assert result.stopped_by == "budget" and result.epochs == 1
    assert 0 < len(batches) < 2048  # stopped mid-epoch
    assert len(result.validation_curve) == 1  # ... and the partial epoch was validated
    assert result.train_seconds <= 3.0 * 1.05


# ------------------------------------------------------------------ early stopping
def test_early_stopping_restores_the_best_epoch():
    x, y = data(256)
    model = small_model()
    log = WeightLog()  # runs after the tracker: sees each epoch's weights
    evaluator = Scripted([0.5, 0.7, 0.6, 0.65, 0.9])
    config = EngineConfig(epochs=5, patience=2, monitor="auc")
    result = fit(model, epoch_data(x, y, 0), evaluator, config, verbose=0, callbacks=[log])
    assert evaluator.calls == 4 and result.stopped_by == "patience"
    assert result.best_epoch == 2 and result.best == 0.7 and len(result.losses) == 4
    for got, want in zip(model.get_weights(), log.weights[1]):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(log.weights[3][0], log.weights[1][0])


def test_unknown_monitor_is_a_clear_error():
    x, y = data(64)
    with pytest.raises(ValueError, match="train.monitor 'ndcg@10' is not a validation metric; choose one of auc"):
        fit(small_model(), epoch_data(x, y, 0), Scripted([0.5]), EngineConfig(epochs=1), verbose=0)


def test_same_seed_same_run_other_seed_other_run():
    x, y = data(512)
    runs = []
    for seed in (3, 3, 4):
        model = small_model(seed)
        result = fit(model, epoch_data(x, y, seed), NegMSE(*data(64, 1)),
                     EngineConfig(epochs=3, monitor="neg_mse", seed=seed), verbose=0)
        runs.append((result.losses, [w.copy() for w in model.get_weights()]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(a, b)
    assert runs[0][0] != runs[2][0]


# ------------------------------------------------------------------ resume (in process)
def test_resume_continues_to_the_uninterrupted_result(tmp_path):
    x, y = data(512)
    val = data(64, 1)
    config = EngineConfig(epochs=5, patience=2, monitor="neg_mse")

    full_model = small_model(5)
    full = fit(full_model, epoch_data(x, y, 5), NegMSE(*val), config, verbose=0)

    # "Crash" after 2 epochs: a run configured for 2 epochs leaves its checkpoint behind.
    backup = tmp_path / "backup"
    import dataclasses

    fit(small_model(5), epoch_data(x, y, 5), NegMSE(*val), dataclasses.replace(config, epochs=2),
        backup_dir=backup, verbose=0)
    assert json.loads((backup / "state.json").read_text())["epochs_done"] == 2
    resumed_model = small_model(5)  # same seed as the run (it also seeds tf.data's global seed) ...
    rng = np.random.default_rng(1)  # ... but scrambled weights: they must come from the checkpoint
    resumed_model.set_weights([rng.normal(size=w.shape).astype("float32") for w in resumed_model.get_weights()])
    resumed = fit(resumed_model, epoch_data(x, y, 5), NegMSE(*val), dataclasses.replace(config, resume=True),
                  backup_dir=backup, verbose=0)
    assert resumed.resumed_from == 2
    assert resumed.losses == full.losses  # dropout masks and optimiser state continue exactly
    assert resumed.best_epoch == full.best_epoch
    assert [h["neg_mse"] for h in resumed.validation_curve] == [h["neg_mse"] for h in full.validation_curve]
    for a, b in zip(resumed_model.get_weights(), full_model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    x, y = data(64)
    config = EngineConfig(epochs=1, monitor="neg_mse")
    fit(small_model(), epoch_data(x, y, 0), NegMSE(x, y), config, backup_dir=tmp_path / "b", verbose=0,
        run_key={"lr": 1})
    import dataclasses

    with pytest.raises(ValueError, match="written by a run with another configuration"):
        fit(small_model(), epoch_data(x, y, 0), NegMSE(x, y), dataclasses.replace(config, resume=True),
            backup_dir=tmp_path / "b", verbose=0, run_key={"lr": 2})


# ------------------------------------------------------------------ two workers
WORKER = textwrap.dedent('''
    import json, os, sys
    import numpy as np
    from tfrec.training.engine import make_strategy, fit
    from tfrec.config import EngineConfig
    strategy = make_strategy(sys.argv[1])
    import keras, tensorflow as tf
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")

    class NegMSE:
        def evaluate(self, model):
            return {"neg_mse": -float(np.mean((keras.ops.convert_to_numpy(model(x, training=False)) - y) ** 2))}

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", jit_compile=False)

    def epoch_data(epoch):
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(512, seed=epoch).batch(64)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return ds.with_options(options)

    result = fit(model, epoch_data, NegMSE(), EngineConfig(epochs=3, patience=5, monitor="neg_mse"),
                 verbose=0, strategy=strategy)
    final = result.validation_curve[-1]["neg_mse"]
    print("RESULT " + json.dumps({"replicas": strategy.num_replicas_in_sync, "final": final}))
''')


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _result(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout
    return json.loads(lines[-1][len("RESULT "):])


def test_two_workers_reach_the_single_worker_loss(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONHASHSEED": "0"}
    env.pop("TF_CONFIG", None)
    single = subprocess.run([sys.executable, str(script), "none"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = [subprocess.Popen([sys.executable, str(script), "multi_worker"],
                                env={**env, "TF_CONFIG": json.dumps({"cluster": cluster,
                                                                     "task": {"type": "worker", "index": i}})},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [w.communicate(timeout=300) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
    one = _result(single.stdout)
    two = [_result(out) for out, _ in outputs]
    assert one["replicas"] == 1 and all(t["replicas"] == 2 for t in two)
    # Same global batches, gradients all-reduced: equal up to float32 summation order.
    for t in two:
        assert t["final"] == pytest.approx(one["final"], rel=1e-4), (one, two)
    assert two[0]["final"] == two[1]["final"]  # the workers hold the same weights


def test_mirrored_strategy_trains_like_the_default_one():
    x, y = data(256)
    results = []
    for distribution in ("none", "mirrored"):
        strategy = make_strategy(distribution)
        with strategy.scope():
            model = small_model(2, dropout=0.0)
        # Unshuffled: distributing a dataset rewrites its pipeline, which re-seeds a shuffle.
        batches = lambda epoch: tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
        result = fit(model, batches, NegMSE(*data(64, 1)), EngineConfig(epochs=2, monitor="neg_mse"),
                     verbose=0, strategy=strategy)
        results.append(result.losses)
    assert results[1] == pytest.approx(results[0], rel=1e-5)  # one local device: the same computation
    assert results[0][1] < results[0][0]


def test_multi_worker_without_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG is not set"):
        make_strategy("multi_worker")
    with pytest.raises(ValueError, match="train.distribution must be one of"):
        make_strategy("tpu")


# ------------------------------------------------------------------ config
def test_train_configs_share_the_engine_fields():
    engine = {f for f in EngineConfig.__dataclass_fields__}
    assert engine <= set(TrainConfig.__dataclass_fields__) and engine <= set(CTRTrainConfig.__dataclass_fields__)
    assert issubclass(TrainConfig, EngineConfig) and issubclass(CTRTrainConfig, EngineConfig)
    assert CTRTrainConfig().monitor == "auc" and TrainConfig().monitor == "ndcg@10"
    cfg = load_config(None, ["train.distribution=mirrored", "train.resume=true", "train.max_train_seconds=20"])
    assert (cfg.train.distribution, cfg.train.resume, cfg.train.max_train_seconds) == ("mirrored", True, 20.0)
    assert load_ctr_config(None, ["train.steps_per_execution=4"]).train.steps_per_execution == 4
    with pytest.raises(ValueError, match="train.distribution must be one of none, mirrored, multi_worker"):
        load_config(None, ["train.distribution=tpu"]).train.check()
    with pytest.raises(ValueError, match=r"unknown config key\(s\) train.budget"):
        load_config(None, ["train.budget=3"])


def test_every_config_file_still_loads():
    from tfx_pipeline.config import load_pipeline_config

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.name.startswith("pipeline_"):
            load_pipeline_config(path)
        elif "r2led" in path.name:
            load_ctr_config(path).train.check()
        else:
            load_config(path).train.check()


def test_describe_keys_lists_every_key():
    text = describe_keys(ExperimentConfig)
    for key in ("train.max_train_seconds", "train.distribution", "train.resume", "train.tensorboard_dir",
                "model.backbone", "data.interactions_path", "eval.protocols"):
        assert f"  {key} = " in text, key


# ------------------------------------------------------------------ weight averaging
class RawLog(keras.callbacks.Callback):
    """Every batch's raw weights (before the engine's validation swaps anything in)."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append([np.array(w) for w in self.model.get_weights()])


def test_weight_average_is_validated_kept_and_training_continues_from_raw_weights():
    x, y = data(256)
    val = data(64, 1)
    model = small_model(7)
    raw = RawLog()
    config = EngineConfig(epochs=3, patience=5, monitor="neg_mse", ema_momentum=0.9)
    result = fit(model, epoch_data(x, y, 7, batch_size=64), NegMSE(*val), config, verbose=0, callbacks=[raw])
    # The averages by hand from the raw weights after every batch (first batch copies).
    average = [w.copy() for w in raw.weights[0]]
    per_epoch = []  # the average at the end of each epoch (4 batches of 64)
    for step, weights in enumerate(raw.weights[1:], start=2):
        average = [0.9 * a + 0.1 * w for a, w in zip(average, weights)]
        if step % 4 == 0:
            per_epoch.append([a.copy() for a in average])
    assert len(per_epoch) == 3 and result.epochs == 3
    best = per_epoch[result.best_epoch - 1]
    for got, want in zip(model.get_weights(), best):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    pred = model(val[0], training=False).numpy()
    assert -float(np.mean((pred - val[1]) ** 2)) == pytest.approx(result.best, rel=1e-5)
    # Training itself is untouched: the raw trajectory equals a run without averaging.
    plain = RawLog()
    fit(small_model(7), epoch_data(x, y, 7, batch_size=64), NegMSE(*val),
        EngineConfig(epochs=3, patience=5, monitor="neg_mse"), verbose=0, callbacks=[plain])
    for a, b in zip(raw.weights[-1], plain.weights[-1]):
        np.testing.assert_array_equal(a, b)


def test_weight_average_resumes_to_the_uninterrupted_result(tmp_path):
    import dataclasses

    x, y = data(512)
    val = data(64, 1)
    config = EngineConfig(epochs=4, patience=4, monitor="neg_mse", ema_momentum=0.95)
    full_model = small_model(5)
    full = fit(full_model, epoch_data(x, y, 5), NegMSE(*val), config, verbose=0)
    backup = tmp_path / "backup"
    fit(small_model(5), epoch_data(x, y, 5), NegMSE(*val), dataclasses.replace(config, epochs=2),
        backup_dir=backup, verbose=0)
    resumed_model = small_model(5)
    resumed = fit(resumed_model, epoch_data(x, y, 5), NegMSE(*val), dataclasses.replace(config, resume=True),
                  backup_dir=backup, verbose=0)
    assert resumed.resumed_from == 2
    assert [h["neg_mse"] for h in resumed.validation_curve] == [h["neg_mse"] for h in full.validation_curve]
    for a, b in zip(resumed_model.get_weights(), full_model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_weight_average_momentum_is_checked():
    with pytest.raises(ValueError, match="train.ema_momentum must be in"):
        EngineConfig(ema_momentum=1.5).check()


class RateLog(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rates = []

    def on_epoch_end(self, epoch, logs=None):
        self.rates.append(round(float(self.model.optimizer.learning_rate), 8))


def test_plateau_decay_cuts_the_rate_after_epochs_without_a_new_best():
    x, y = data(64)
    config = EngineConfig(epochs=6, patience=10, monitor="auc", learning_rate=0.01, lr_decay_factor=0.5,
                          lr_decay_patience=2)
    log = RateLog()
    # best at epoch 2; cuts after epochs 4 and 6 (two epochs without a new best, counted from the last cut)
    result = fit(small_model(), epoch_data(x, y, 0), Scripted([0.5, 0.6, 0.6, 0.55, 0.6, 0.6]), config,
                 verbose=0, callbacks=[log])
    assert result.best_epoch == 2
    assert log.rates == [0.01, 0.01, 0.01, 0.005, 0.005, 0.0025]


def test_plateau_decay_resumes_with_the_rate_of_its_history(tmp_path):
    import dataclasses

    x, y = data(256)
    values = [0.6, 0.5, 0.5, 0.5]  # cuts after epochs 2, 3 and 4
    config = EngineConfig(epochs=4, patience=10, monitor="auc", learning_rate=0.01, lr_decay_factor=0.5,
                          lr_decay_patience=1)
    full_model, full_log = small_model(3), RateLog()
    fit(full_model, epoch_data(x, y, 3), Scripted(values), config, verbose=0, callbacks=[full_log])
    backup = tmp_path / "backup"
    fit(small_model(3), epoch_data(x, y, 3), Scripted(values[:2]), dataclasses.replace(config, epochs=2),
        backup_dir=backup, verbose=0)
    resumed_model, resumed_log = small_model(3), RateLog()
    fit(resumed_model, epoch_data(x, y, 3), Scripted(values[2:]), dataclasses.replace(config, resume=True),
        backup_dir=backup, verbose=0, callbacks=[resumed_log])
    assert full_log.rates == [0.01, 0.005, 0.0025, 0.00125]
    assert resumed_log.rates == full_log.rates[2:]
    for a, b in zip(resumed_model.get_weights(), full_model.get_weights()):  # epoch 3 trained at 0.005
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("key, value, needle", [
    ("lr_decay_factor", 1.5, "train.lr_decay_factor must be in"),
    ("lr_decay_patience", 0, "train.lr_decay_patience must be >= 1"),
    ("min_learning_rate", 1.0, "train.min_learning_rate must be in"),
])
def test_plateau_decay_keys_are_checked(key, value, needle):
    with pytest.raises(ValueError, match=needle):
        EngineConfig(**{key: value}).check()
