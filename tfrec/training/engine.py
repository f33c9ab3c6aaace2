"""The one training engine: `fit(model, train_data, evaluator, config)`.

Used by next-item training (`tfrec.training.train_sequential`), CTR training
(`tfrec.ctr.train_ctr`) and the TFX Trainer (`tfx_pipeline.trainer`).
Configured by `tfrec.config.EngineConfig` (the `train:` keys both tasks share).

What it does, epoch by epoch (one `model.fit` call per epoch, so an epoch's data
can be a fresh, seeded pipeline: `train_data` may be `epoch -> tf.data.Dataset`):

- **Early stopping** (`BestEpochTracker`): after every epoch the caller's
  evaluator gives validation metrics (NDCG@10 for next-item, AUC for CTR); the
  best epoch's weights are kept and restored at the end; training stops after
  `patience` epochs without a new best.
- **Budget** (`max_train_seconds`, training plus validation): checked after every
  batch (every `steps_per_execution` batches). Rule (ours): training stops once
  `elapsed + the last validation's duration >= budget`, so the closing validation
  still fits; the partial epoch is validated like a full one and its weights are
  kept if they are the best. Before the first validation its duration counts as 0.
- **Resume**: after every epoch a checkpoint goes to `backup_dir` (model and
  optimiser variables, including random-generator states; the best weights; the
  tracker's state: best metric, best epoch, history, elapsed seconds; the loss
  curve). With `resume=True` a run continues after the last finished epoch, so a
  run killed mid-epoch loses at most that epoch. When `train_data` is a function of
  the epoch, the resumed run sees the same batches as an uninterrupted one.
- **Weight averaging** (`ema_momentum`, ours, off by default): an exponential
  moving average of the trainable weights, updated after every batch
  (`WeightAverage`); validation, the best weights and the returned model use the
  average, training continues from the raw weights. Checkpointed with the rest.
- **Plateau decay** (`lr_decay_factor`, ours, off by default): the learning rate
  times the factor after every `lr_decay_patience` epochs without a new best
  validation metric (`PlateauDecay`; derived from the validation history, so resumed
  runs agree). Set the decay patience below `patience`, or early stopping comes first.
- **TensorBoard** logs (`tensorboard_dir`), the Keras progress bar (`verbose`),
  **seeds** (`keras.utils.set_random_seed`, optional op determinism).
- **Distribution**: `make_strategy(config.distribution)`; build and compile the
  model under `strategy.scope()`. In a multi-worker run every worker trains; only
  the chief writes checkpoints and logs, and the budget decision is agreed by all
  workers (an all-reduce), so no worker waits for a step the others skip.

Example:
>>> import keras, numpy as np
>>> from tfrec.config import EngineConfig
>>> from tfrec.training.engine import fit
>>> class NegMSE:  # any object with evaluate(model) -> {metric: value}
...     def evaluate(self, model):
...         return {"neg_mse": -float(model.evaluate(x, y, verbose=0))}
>>> x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
>>> y = x.sum(axis=1, keepdims=True)
>>> keras.utils.set_random_seed(0)
>>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
>>> model.compile(optimizer="sgd", loss="mse")
>>> config = EngineConfig(epochs=3, patience=2, monitor="neg_mse", batch_size=16)
>>> import tensorflow as tf
>>> data = lambda epoch: tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
>>> result = fit(model, data, NegMSE(), config, verbose=0)
>>> result.epochs, result.stopped_by
(3, 'epochs')
"""

import dataclasses
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

CHECKPOINT_STATE = "state.json"
STATE_VERSION = 1


# ------------------------------------------------------------------ strategies
def make_strategy(distribution="none"):
    """The `tf.distribute.Strategy` for `train.distribution`.

    `none`: the default strategy (one device); `mirrored`: `MirroredStrategy` over
    the local devices; `multi_worker`: `MultiWorkerMirroredStrategy` whose cluster
    comes from the `TF_CONFIG` environment variable (create it before any other
    TensorFlow work of the process).
    """
    if distribution == "none":
        return tf.distribute.get_strategy()
    if distribution == "mirrored":
        return tf.distribute.MirroredStrategy()
    if distribution == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ValueError("train.distribution is multi_worker but TF_CONFIG is not set "
                             "(it names the cluster's workers and this worker's index)")
        try:
            cluster = json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError as err:
            raise ValueError(f"TF_CONFIG is not valid JSON: {err}") from None
        if not isinstance(cluster, dict) or "cluster" not in cluster or "task" not in cluster:
            raise ValueError("TF_CONFIG must hold {'cluster': {...}, 'task': {'type': ..., 'index': ...}}")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"train.distribution must be one of none, mirrored, multi_worker; got {distribution!r}")


def is_chief(strategy):
    """True unless this is a non-chief worker of a multi-worker strategy."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0
                                             and "chief" not in resolver.cluster_spec().as_dict())


def _multi_worker(strategy):
    return bool(getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)())


def any_worker(strategy, flag):
    """`flag` OR-ed over the workers of a multi-worker strategy (itself otherwise)."""
    if not _multi_worker(strategy):
        return bool(flag)
    value = strategy.run(lambda: tf.constant(1.0 if flag else 0.0))
    return float(strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)) > 0


def seed_everything(seed, deterministic_ops=False):
    """`keras.utils.set_random_seed(seed)`; with `deterministic_ops` also TF op determinism."""
    keras.utils.set_random_seed(seed)
    if deterministic_ops:
        tf.config.experimental.enable_op_determinism()


def compile_options(config):
    """The `model.compile` keyword arguments an `EngineConfig` sets."""
    return {"jit_compile": bool(config.jit_compile), "steps_per_execution": int(config.steps_per_execution)}


def build_optimizer(train_config):
    """Adam (AdamW when `weight_decay` is set) from an `EngineConfig`."""
    tc = train_config
    if tc.weight_decay:
        return keras.optimizers.AdamW(tc.learning_rate, weight_decay=tc.weight_decay, clipnorm=tc.clipnorm)
    return keras.optimizers.Adam(tc.learning_rate, clipnorm=tc.clipnorm)


# ---------------------------------------------------------- early stopping/budget
class BestEpochTracker(keras.callbacks.Callback):
    """Validation after every epoch; keeps the best weights; stops early or on budget.

    Adds `val_<metric>` to the epoch logs, so the History, progress bar and
    TensorBoard callbacks placed after it record them. Usable on its own in
    `model.fit(callbacks=[tracker])`; `fit` of this module drives it across
    one-epoch `fit` calls (`persistent=True`) and checkpoints its `state()`.

    Args:
        evaluator: an object whose `evaluate(model)` returns metrics: a
            `SequentialEvaluator` with protocol "full" (`{protocol: {metric:
            value}}`), or any evaluator returning `{metric: value}` directly
            with `protocol=None` (e.g. the CTR evaluator of `tfrec.ctr`).
        monitor: metric name, e.g. "ndcg@10" or "auc" (higher is better).
        patience: epochs without improvement before stopping.
        max_seconds: optional wall-time budget (training plus validation), checked
            after every batch (see the module doc for the rule).
        protocol: the key of `evaluate()`'s result holding the metrics, or None.
        strategy: the distribution strategy (multi-worker: the budget decision is
            agreed by all workers).
        averager: optional `WeightAverage`; validation and the kept weights then use
            the averaged weights.
    """

    def __init__(self, evaluator, monitor="ndcg@10", patience=10, max_seconds=None, protocol="full",
                 strategy=None, persistent=False, averager=None):
        super().__init__()
        self.averager = averager
        self.evaluator = evaluator
        self.protocol = protocol
        self.monitor = monitor
        self.patience = patience
        self.max_seconds = max_seconds
        self.strategy = strategy or tf.distribute.get_strategy()
        self.persistent = persistent
        self.history = []  # {"epoch", "seconds" since start, metric: value}
        self.begun = False

    # -- state
    def begin(self, state=None):
        """Start the clock (or continue a checkpointed `state()`)."""
        self.best, self.best_epoch, self.best_weights = -np.inf, 0, None
        self.best_seconds, self.elapsed_before, self.last_eval_seconds = 0.0, 0.0, 0.0
        self.history, self.stop_reason = [], None
        if state:
            self.best = state["best"] if state["best"] is not None else -np.inf
            self.best_epoch, self.best_seconds = state["best_epoch"], state["best_seconds"]
            self.elapsed_before, self.last_eval_seconds = state["elapsed"], state["last_eval_seconds"]
            self.history, self.stop_reason = state["history"], state["stop_reason"]
        self.start = time.perf_counter()
        self.begun = True

    def state(self):
        """JSON-able early-stopping and budget state (the best weights are kept apart)."""
        return {"best": None if not np.isfinite(self.best) else float(self.best), "best_epoch": self.best_epoch,
                "best_seconds": self.best_seconds, "elapsed": self.elapsed(),
                "last_eval_seconds": self.last_eval_seconds, "history": self.history,
                "stop_reason": self.stop_reason}

    def elapsed(self):
        return self.elapsed_before + time.perf_counter() - self.start

    def _out_of_time(self):
        return self.max_seconds is not None and self.elapsed() + self.last_eval_seconds >= self.max_seconds

    # -- callback
    def on_train_begin(self, logs=None):
        if not (self.persistent and self.begun):
            self.begin()

    def on_train_batch_end(self, batch, logs=None):
        if self.max_seconds is not None and any_worker(self.strategy, self._out_of_time()):
            self.model.stop_training = True
            self.stop_reason = "budget"

    def on_epoch_end(self, epoch, logs=None):
        eval_start = time.perf_counter()
        raw = self.averager.swap_in() if self.averager is not None else None
        try:  # validated (and kept, when best) with the averages in; training resumes from the raw weights
            result = self.evaluator.evaluate(self.model)
            if self.protocol is not None:
                result = result[self.protocol]
            result = {k: float(v) for k, v in result.items()}
            if self.monitor not in result:
                raise ValueError(f"train.monitor {self.monitor!r} is not a validation metric; "
                                 f"choose one of {', '.join(sorted(result))}")
            improved = result[self.monitor] > self.best
            if improved:
                self.best_weights = self.model.get_weights()
        finally:
            if raw is not None:
                self.averager.swap_out(raw)
        self.last_eval_seconds = time.perf_counter() - eval_start
        elapsed = self.elapsed()
        self.history.append({"epoch": epoch + 1, "seconds": elapsed, **result})
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in result.items()})
        if improved:
            self.best, self.best_epoch = result[self.monitor], epoch + 1
            self.best_seconds = elapsed
        elif epoch + 1 - self.best_epoch >= self.patience:
            self.model.stop_training = True
            self.stop_reason = self.stop_reason or "patience"
        if self.max_seconds is not None and any_worker(self.strategy, self._out_of_time()):
            self.model.stop_training = True
            self.stop_reason = "budget"

    def restore_best(self):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)

    def on_train_end(self, logs=None):
        if not self.persistent:
            self.restore_best()


def plateau_decays(history, monitor, patience):
    """How many times the learning rate was cut by `PlateauDecay`'s rule over a validation `history`
    (`BestEpochTracker.history`): a cut after every `patience` epochs without a new best, counted
    from the best epoch or the last cut, whichever is later.

    >>> plateau_decays([{"m": v} for v in (0.1, 0.2, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3)], "m", 2)
    2
    """
    best, anchor, cuts = -np.inf, 0, 0
    for epoch, entry in enumerate(history, start=1):
        if entry[monitor] > best:
            best, anchor = entry[monitor], epoch
        elif epoch - anchor >= patience:
            cuts, anchor = cuts + 1, epoch
    return cuts


class PlateauDecay(keras.callbacks.Callback):
    """Learning rate times `factor` after every `patience` epochs without a new best validation
    metric (ours; `train.lr_decay_factor`, `train.lr_decay_patience`), like Keras'
    `ReduceLROnPlateau` but read from the engine's `BestEpochTracker`, so the rate follows from
    the validation history alone and a resumed run continues with the same rate.

    Place it after the tracker. `lr = learning_rate * factor ** plateau_decays(...)`, at least
    `min_learning_rate`.

    >>> import numpy as np
    >>> class Fixed:  # validation never improves after the first epoch
    ...     def evaluate(self, model):
    ...         return {"m": 1.0}
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile(keras.optimizers.SGD(0.1), "mse")
    >>> tracker = BestEpochTracker(Fixed(), monitor="m", patience=100, protocol=None)
    >>> decay = PlateauDecay(tracker, learning_rate=0.1, factor=0.5, patience=1)
    >>> _ = model.fit(np.ones((4, 2)), np.zeros((4, 1)), epochs=3, verbose=0, callbacks=[tracker, decay])
    >>> round(float(model.optimizer.learning_rate), 6)  # cut after epochs 2 and 3
    0.025
    """

    def __init__(self, tracker, learning_rate, factor=0.5, patience=2, min_learning_rate=0.0):
        super().__init__()
        if not 0.0 < float(factor) < 1.0:
            raise ValueError(f"config key train.lr_decay_factor must be in (0, 1), got {factor!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"config key train.lr_decay_patience must be an int >= 1, got {patience!r}")
        self.tracker, self.learning_rate = tracker, float(learning_rate)
        self.factor, self.patience, self.min_learning_rate = float(factor), patience, float(min_learning_rate)

    def current(self):
        """The rate the validation history so far asks for."""
        cuts = plateau_decays(self.tracker.history, self.tracker.monitor, self.patience)
        return max(self.learning_rate * self.factor ** cuts, self.min_learning_rate)

    def on_train_begin(self, logs=None):
        self.model.optimizer.learning_rate = self.current()  # a resumed run: the rate its history gives

    def on_epoch_end(self, epoch, logs=None):
        rate = self.current()
        self.model.optimizer.learning_rate = rate
        if logs is not None:
            logs["learning_rate"] = rate


class WeightAverage(keras.callbacks.Callback):
    """Exponential moving average of a model's trainable weights (ours; `train.ema_momentum`).

    After every training batch: `average = momentum * average + (1 - momentum) * weight`
    (the first batch copies the weights). `swap_in()` puts the averages into the
    model and returns the raw values for `swap_out(raw)`. Unlike Keras' optimizer
    `use_ema`, the model keeps training from its raw weights across the engine's
    one-epoch `fit` calls. Works in plain `model.fit` too (average, then `swap_in()`).

    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> ema = WeightAverage(0.9)
    >>> _ = model.fit(np.ones((8, 2)), np.zeros((8, 1)), batch_size=4, epochs=2, verbose=0, callbacks=[ema])
    >>> raw = ema.swap_in()  # the model now holds the averages
    >>> ema.swap_out(raw)  # and back
    >>> bool(np.allclose(model.get_weights()[0], raw[0]))
    True
    """

    def __init__(self, momentum=0.999):
        super().__init__()
        if not 0.0 < float(momentum) < 1.0:
            raise ValueError(f"config key train.ema_momentum must be in (0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.averages = None
        self.count = None

    def _ensure(self):
        # A subclassed model has no variables before its first step: build lazily.
        if self.averages is None or len(self.averages) != len(self.model.trainable_variables):
            trainable = self.model.trainable_variables
            if not trainable:
                raise ValueError("WeightAverage: the model has no trainable variables yet (build it first)")
            with tf.init_scope():
                self.averages = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="average")
                                 for v in trainable]
                self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="average_count")
            momentum = self.momentum

            @tf.function
            def update(values):
                m = tf.where(self.count > 0, momentum, 0.0)
                for average, value in zip(self.averages, values):
                    average.assign(m * average + (1.0 - m) * tf.cast(value, average.dtype))
                self.count.assign_add(1)

            self._update = update

    @property
    def variables(self):
        """The averages and the update count (for checkpoints); builds them if needed."""
        self._ensure()
        return [*self.averages, self.count]

    def on_train_batch_end(self, batch, logs=None):
        self._ensure()
        self._update([v.value for v in self.model.trainable_variables])

    def swap_in(self):
        """Put the averages into the model; returns the raw values (for `swap_out`)."""
        self._ensure()
        trainable = self.model.trainable_variables
        raw = [keras.ops.convert_to_numpy(v) for v in trainable]
        if int(self.count.numpy()) > 0:
            for var, average in zip(trainable, self.averages):
                var.assign(average)
        return raw

    def swap_out(self, raw):
        """Put the raw values `swap_in` returned back into the model."""
        for var, value in zip(self.model.trainable_variables, raw):
            var.assign(value)


# ------------------------------------------------------------------ checkpoints
def _variables(model, averager=None):
    variables = list(model.variables)
    if model.optimizer is not None:
        variables += list(model.optimizer.variables)
    if averager is not None:
        variables += averager.variables
    return variables


def save_checkpoint(directory, model, tracker, epochs_done, losses, run_key=None, averager=None):
    """Write the run's state to `directory` atomically (a new folder replaces the old)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.savez(tmp / "variables.npz", *[keras.ops.convert_to_numpy(v) for v in _variables(model, averager)])
    if tracker.best_weights is not None:
        np.savez(tmp / "best.npz", *tracker.best_weights)
    state = {"version": STATE_VERSION, "run_key": run_key, "epochs_done": epochs_done, "losses": losses,
             "tracker": tracker.state()}
    (tmp / CHECKPOINT_STATE).write_text(json.dumps(state))
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _load_arrays(path):
    with np.load(path) as npz:
        return [npz[f"arr_{i}"] for i in range(len(npz.files))]


def load_checkpoint(directory, model, first_batch, run_key=None, averager=None):
    """The state dict of `directory`'s checkpoint, its variables loaded into `model` (or None).

    `first_batch` (a training batch) builds the model and optimiser first.
    """
    directory = Path(directory)
    if not directory.is_dir() and directory.with_name(directory.name + ".old").is_dir():
        directory = directory.with_name(directory.name + ".old")  # killed while replacing
    if not (directory / CHECKPOINT_STATE).is_file():
        return None
    try:
        state = json.loads((directory / CHECKPOINT_STATE).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"resume checkpoint {directory} is corrupt: {err}") from None
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"resume checkpoint {directory} has version {state.get('version')}, "
                         f"expected {STATE_VERSION}; delete it or set train.resume=false")
    if state.get("run_key") != run_key:
        raise ValueError(f"resume checkpoint {directory} was written by a run with another configuration; "
                         "resume with the same config, or delete the folder / change train.backup_dir")
    build_for_training(model, first_batch)
    if averager is not None:
        averager.set_model(model)
    variables, values = _variables(model, averager), _load_arrays(directory / "variables.npz")
    if len(variables) != len(values) or any(tuple(v.shape) != a.shape for v, a in zip(variables, values)):
        raise ValueError(f"resume checkpoint {directory} does not fit this model (another config?); "
                         "delete it or change train.backup_dir")
    for var, value in zip(variables, values):
        var.assign(value)
    state["best_weights"] = _load_arrays(directory / "best.npz") if (directory / "best.npz").is_file() else None
    return state


def _build_from_local_batch(model, strategy, batch):
    """Build `model` (symbolically) from one undistributed batch before a multi-replica `fit`.

    Keras 3's TF trainer builds a model under a strategy from the first distributed
    batch by `strategy.reduce("MEAN", batch)`, which fails on an `(x, y)` structure of
    `PerReplica` values; the build only needs shapes and dtypes, so we give it a
    local batch and skip that step."""
    with strategy.scope():
        model._symbolic_build(data_batch=batch)
    object.__setattr__(model, "_maybe_symbolic_build", lambda iterator=None, data_batch=None: None)


def _patch_multi_worker_log_reduction():
    """Keras 3's TF trainer reduces a multi-worker step's scalar logs with
    `strategy.reduce("MEAN", v, axis=0)`, which fails on scalars; reduce them with
    `axis=None` (the mean over replicas) instead. Idempotent; multi-worker only."""
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica
    if getattr(original, "_tfrec_patched", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None if v.shape.rank == 0 else 0), values)
        return original(values, strategy, reduction)

    reduce_per_replica._tfrec_patched = True
    tf_trainer.reduce_per_replica = reduce_per_replica


def _jsonable(value):
    return json.loads(json.dumps(value)) if value is not None else None


def build_for_training(model, batch):
    """Create the model's and optimiser's variables (as the first training step would)."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not model.built:
        model(x, training=False)
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


# -------------------------------------------------------------------------- fit
class _OneEpoch(keras.callbacks.Callback):
    """Ends a `model.fit` call after its first epoch (placed after every other callback)."""

    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True


@dataclasses.dataclass
class FitResult:
    """What `fit` did: per-epoch losses, validation curve, best epoch, stop reason."""

    losses: list
    validation_curve: list
    best_epoch: int
    best: float
    seconds_to_best: float
    train_seconds: float
    epochs: int
    stopped_by: str  # "patience" | "budget" | "epochs"
    resumed_from: int = 0  # epochs already done when resumed (0 = fresh run)


def fit(model, train_data, evaluator, config, *, protocol=None, steps_per_epoch=None, backup_dir=None,
        tensorboard_dir=None, verbose="auto", strategy=None, callbacks=(), run_key=None):
    """Train a compiled `model` with early stopping, budget, checkpoints and logs.

    Args:
        model: a compiled Keras model (built and compiled under `strategy.scope()`).
        train_data: a `tf.data.Dataset` of training batches, or `epoch -> Dataset`
            (exactly reproducible resume: epoch `e`'s data depends only on `e`).
        evaluator: `evaluate(model)` -> validation metrics (see `BestEpochTracker`).
        config: an `EngineConfig` (`epochs`, `patience`, `monitor`, `max_train_seconds`,
            `resume`).
        protocol: the key of the evaluator's result holding the metrics, or None.
        steps_per_epoch: batches per epoch (None = one pass over `train_data`).
        backup_dir: checkpoint folder (None = no checkpoints; `config.resume` needs one).
        tensorboard_dir: TensorBoard log folder (None = no logs).
        verbose: Keras `fit` verbosity (progress bar "auto"/1, one line per epoch 2, 0).
        strategy: the `tf.distribute` strategy the model was built under.
        callbacks: extra Keras callbacks.
        run_key: a JSON-able description of the run (e.g. its config without
            `train.resume`) stored with checkpoints; resuming under another is an error.

    Returns:
        `FitResult`; the model holds the best epoch's weights.
    """
    strategy = strategy or tf.distribute.get_strategy()
    chief = is_chief(strategy)
    data_fn = train_data if callable(train_data) else (lambda epoch: train_data)
    if config.resume and backup_dir is None:
        raise ValueError("train.resume needs a checkpoint folder (train.backup_dir or a saved run)")
    averager = WeightAverage(config.ema_momentum) if config.ema_momentum else None
    if averager is not None and strategy.num_replicas_in_sync > 1:
        raise ValueError("train.ema_momentum is not supported with train.distribution over several replicas")
    tracker = BestEpochTracker(evaluator, monitor=config.monitor, patience=config.patience,
                               max_seconds=config.max_train_seconds, protocol=protocol, strategy=strategy,
                               persistent=True, averager=averager)
    tracker.set_model(model)
    losses, first_epoch = [], 0
    state = None
    if config.resume:
        first = next(iter(data_fn(0).take(1)))
        with strategy.scope():
            state = load_checkpoint(backup_dir, model, first, run_key=_jsonable(run_key), averager=averager)
    tracker.begin(state["tracker"] if state else None)
    if state:
        tracker.best_weights = state["best_weights"]
        losses, first_epoch = list(state["losses"]), int(state["epochs_done"])
        if verbose:
            print(f"resuming after epoch {first_epoch} from {backup_dir}")
    if not chief and backup_dir is not None:  # workers other than the chief write to a scratch copy
        backup_dir = Path(backup_dir).with_name(Path(backup_dir).name + f".worker{strategy.cluster_resolver.task_id}")
    all_callbacks = [tracker, *callbacks] if averager is None else [averager, tracker, *callbacks]
    if config.lr_decay_factor:
        all_callbacks.insert(all_callbacks.index(tracker) + 1, PlateauDecay(
            tracker, config.learning_rate, config.lr_decay_factor, config.lr_decay_patience,
            config.min_learning_rate))
    if tensorboard_dir and chief:
        all_callbacks.append(keras.callbacks.TensorBoard(str(tensorboard_dir), write_graph=False))
    all_callbacks.append(_OneEpoch())  # last: each fit call runs one epoch (the bar still says "Epoch e/N")

    if strategy.num_replicas_in_sync > 1:
        _build_from_local_batch(model, strategy, next(iter(data_fn(first_epoch).take(1))))
    if _multi_worker(strategy):
        _patch_multi_worker_log_reduction()

    epoch = first_epoch
    finished = state is not None and state["tracker"]["stop_reason"] is not None
    while not finished and epoch < config.epochs:
        with warnings.catch_warnings():  # one fit per epoch: the end of each epoch's data is expected
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            history = model.fit(data_fn(epoch), initial_epoch=epoch, epochs=config.epochs,
                                steps_per_epoch=steps_per_epoch, callbacks=all_callbacks, verbose=verbose,
                                shuffle=False)  # the data shuffles itself (seeded per epoch)
        epoch += 1
        losses += [float(v) for v in history.history.get("loss", [])]
        finished = tracker.stop_reason is not None
        if backup_dir is not None:
            save_checkpoint(backup_dir, model, tracker, epoch, losses, run_key=_jsonable(run_key), averager=averager)
    tracker.restore_best()
    return FitResult(
        losses=losses, validation_curve=tracker.history, best_epoch=tracker.best_epoch,
        best=float(tracker.best) if np.isfinite(tracker.best) else float("nan"),
        seconds_to_best=tracker.best_seconds, train_seconds=tracker.elapsed(), epochs=len(tracker.history),
        stopped_by=tracker.stop_reason or "epochs", resumed_from=first_epoch,
    )
