"""Training of next-item models: build from config, fit with early stopping, evaluate, save.

`train_sequential(config)` is what `tfrec train` runs:

1. read the interactions (bundled dataset or user file), k-core filter,
   vocabularies, chronological sequences (`tfrec.data.preprocess`);
2. leave-one-out split (last item = test, second-last = validation);
3. build `NextItemRecommender` (item encoder + backbone) from `ModelConfig`;
4. `model.fit` on all positions at once; after every epoch the validation
   NDCG@10 (full ranking) is computed, logged to TensorBoard, and the best
   weights are kept; training stops after `patience` epochs without a new best
   (or when `max_train_seconds` is spent) and the best weights are restored;
5. validation and test metrics under every configured protocol;
6. the run directory gets `model.keras`, `item_vocab.txt`, `results.json`,
   TensorBoard logs under `logs/`.
"""

import json
import time
from pathlib import Path

import keras
import numpy as np

from tfrec.config import ExperimentConfig
from tfrec.data.pipelines import training_dataset
from tfrec.data.preprocess import PrepareConfig, leave_one_out, prepare
from tfrec.data.readers import load_dataset, read_interactions
from tfrec.evaluation import SequentialEvaluator
from tfrec.layers import BERT4RecBackbone, GRU4RecBackbone, IdItemEncoder, SASRecBackbone
from tfrec.models import NextItemRecommender

BACKBONES = ("sasrec", "bert4rec", "gru4rec")
ITEM_ENCODERS = ("id", "dmesr")


def build_backbone(model_config):
    """The backbone layer named by `model_config.backbone`."""
    mc = model_config
    transformer_args = dict(
        num_layers=mc.num_layers,
        num_heads=mc.num_heads,
        ffn_dim=mc.ffn_dim,
        dropout=mc.dropout,
        normalize_first=mc.normalize_first,
    )
    if mc.backbone == "sasrec":
        return SASRecBackbone(mc.max_length, **transformer_args)
    if mc.backbone == "bert4rec":
        return BERT4RecBackbone(mc.max_length, **transformer_args)
    if mc.backbone == "gru4rec":
        return GRU4RecBackbone(mc.gru_hidden_dim, num_layers=mc.num_layers, dropout=mc.dropout,
                               input_norm=mc.gru_input_norm)
    raise ValueError(f"unknown backbone {mc.backbone!r}; choose one of {BACKBONES}")


def build_model(model_config, vocab_size, item_encoder=None, seed=None):
    """A `NextItemRecommender`; `item_encoder` defaults to an `IdItemEncoder`."""
    mc = model_config
    encoder = item_encoder or IdItemEncoder(vocab_size, mc.embedding_dim)
    return NextItemRecommender(
        encoder,
        build_backbone(mc),
        max_length=mc.max_length,
        objective="cloze" if mc.backbone == "bert4rec" else "causal",
        loss=mc.loss,
        num_negatives=mc.num_negatives,
        sampling=mc.sampling,
        temperature=mc.temperature,
        seed=seed,
    )


def build_item_encoder(config: ExperimentConfig, item_vocab):
    """The item encoder `config.model.item_encoder` names, over `item_vocab`.

    `"dmesr"` reads the semantic store `config.dmesr.store_path` (its vocabulary
    must be `item_vocab`: `VocabularyMismatchError` otherwise) and builds a
    `DMESRItemEncoder`; `"id"` gives `IdItemEncoder`.
    """
    mc = config.model
    if mc.item_encoder == "id":
        return IdItemEncoder(item_vocab.size, mc.embedding_dim)
    if mc.item_encoder == "dmesr":
        from tfrec.semantics.dmesr import build_dmesr_item_encoder, load_dmesr_tables

        tables = load_dmesr_tables(None, config.dmesr, item_vocab=item_vocab)  # reads dmesr.store_path
        return build_dmesr_item_encoder(config.dmesr, tables, item_vocab.size, mc.embedding_dim, log=print)
    raise ValueError(f"unknown model.item_encoder {mc.item_encoder!r}; choose one of {ITEM_ENCODERS}")


def load_interactions(data_config):
    """The interactions DataFrame named by a `DataConfig`, plus a source label."""
    if data_config.interactions_path:
        return read_interactions(data_config.interactions_path), str(data_config.interactions_path)
    dataset = load_dataset(data_config.dataset, data_config.data_root)
    return dataset.interactions, dataset.name


class BestEpochTracker(keras.callbacks.Callback):
    """Validation after every epoch; keeps the best weights; stops early.

    Adds `val_<metric>` to the epoch logs, so the History, progress bar and
    TensorBoard callbacks placed after it record them.

    Args:
        evaluator: an object whose `evaluate(model)` returns metrics: a
            `SequentialEvaluator` with protocol "full" (`{protocol: {metric:
            value}}`), or any evaluator returning `{metric: value}` directly
            with `protocol=None` (e.g. the CTR evaluator of `tfrec.ctr_training`).
        monitor: metric name, e.g. "ndcg@10" or "auc" (higher is better).
        patience: epochs without improvement before stopping.
        max_seconds: optional wall-time budget for training (checked at epoch ends).
        protocol: the key of `evaluate()`'s result holding the metrics, or None.
    """

    def __init__(self, evaluator, monitor="ndcg@10", patience=10, max_seconds=None, protocol="full"):
        super().__init__()
        self.evaluator = evaluator
        self.protocol = protocol
        self.monitor = monitor
        self.patience = patience
        self.max_seconds = max_seconds
        self.history = []  # (epoch, seconds since start, {metric: value})

    def on_train_begin(self, logs=None):
        self.best, self.best_epoch, self.best_weights = -np.inf, 0, None
        self.start = time.perf_counter()
        self.best_seconds = 0.0

    def on_epoch_end(self, epoch, logs=None):
        result = self.evaluator.evaluate(self.model)
        if self.protocol is not None:
            result = result[self.protocol]
        elapsed = time.perf_counter() - self.start
        self.history.append({"epoch": epoch + 1, "seconds": elapsed, **result})
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in result.items()})
        if result[self.monitor] > self.best:
            self.best, self.best_epoch = result[self.monitor], epoch + 1
            self.best_seconds = elapsed
            self.best_weights = self.model.get_weights()
        elif epoch + 1 - self.best_epoch >= self.patience:
            self.model.stop_training = True
        if self.max_seconds is not None and elapsed >= self.max_seconds:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


def build_optimizer(train_config):
    """Adam (AdamW when `weight_decay` is set) from a `TrainConfig`."""
    tc = train_config
    if tc.weight_decay:
        return keras.optimizers.AdamW(tc.learning_rate, weight_decay=tc.weight_decay, clipnorm=tc.clipnorm)
    return keras.optimizers.Adam(tc.learning_rate, clipnorm=tc.clipnorm)


def prepare_split(config: ExperimentConfig):
    """Read, filter and split the configured data: `(PreparedData, LeaveOneOutSplit)`."""
    interactions, source = load_interactions(config.data)
    data = prepare(
        interactions,
        PrepareConfig(user_core=config.data.user_core, item_core=config.data.item_core),
        source=source,
    )
    return data, leave_one_out(data.sequences, min_length=config.data.min_length)


def _evaluator_args(config, data):
    ec = config.eval
    return dict(
        vocab_size=data.item_vocab.size,
        max_length=config.model.max_length,
        ks=ec.ks,
        exclude_history=ec.exclude_history,
        negative_sampling=ec.negative_sampling,
        item_counts=data.item_counts(),
        seed=ec.seed,
        batch_size=ec.batch_size,
    )


def evaluate_splits(config, model, data, split):
    """`{"valid": {protocol: metrics}, "test": {...}}` under every configured protocol."""
    args = _evaluator_args(config, data)
    return {
        name: SequentialEvaluator(histories, targets, protocols=config.eval.protocols, **args).evaluate(model)
        for name, histories, targets in (
            ("valid", split.valid_history, split.valid_targets),
            ("test", split.test_history, split.test_targets),
        )
    }


def load_trained_model(config, model_path=None):
    """`(model, path)`: the model `tfrec train` saved for `config` (or `model_path`).

    Importing this module registers every tfrec layer and model with Keras, so
    any saved tfrec model (ID-only or DMESR) restores.
    """
    path = Path(model_path or config.run_dir / "model.keras")
    if not path.is_file():
        raise FileNotFoundError(f"no trained model at {path}; run `tfrec train` first or pass --model")
    return keras.saving.load_model(path), path


def evaluate_saved_model(config, model):
    """Re-evaluate a trained model on the data its config names."""
    data, split = prepare_split(config)
    if model.vocab_size != data.item_vocab.size:
        raise ValueError(
            f"model has {model.vocab_size} item ids but the configured data has {data.item_vocab.size}: "
            "was it trained on another dataset or filtering?"
        )
    return {"config": config.to_dict(), "data": data.metadata, "splits": evaluate_splits(config, model, data, split)}


def train_sequential(config: ExperimentConfig, verbose=2, save=True):
    """Train, evaluate and (optionally) save one next-item model.

    Returns:
        `(results, model, data)`: the results dict (also written to
        `results.json`), the trained model with its best weights, and the
        `PreparedData`.
    """
    keras.utils.set_random_seed(config.train.seed)
    data, split = prepare_split(config)
    mc, tc = config.model, config.train

    model = build_model(mc, data.item_vocab.size, item_encoder=build_item_encoder(config, data.item_vocab), seed=tc.seed)
    # Popularity for sampled-softmax proposals: training items only (no leak of targets).
    model.set_item_counts(np.bincount(np.concatenate(split.train), minlength=data.item_vocab.size))
    model.compile(optimizer=build_optimizer(tc), jit_compile=False)
    train_ds = training_dataset(
        split.train,
        mc.max_length,
        tc.batch_size,
        objective=model.objective,
        mask_prob=mc.mask_prob,
        mask_token_id=model.mask_token_id,
        seed=tc.seed,
        bucket_batches=tc.bucket_batches,
        scheme=tc.scheme,
    )
    tracker = BestEpochTracker(
        SequentialEvaluator(
            split.valid_history, split.valid_targets, protocols=("full",), **_evaluator_args(config, data)
        ),
        monitor=tc.monitor,
        patience=tc.patience,
        max_seconds=tc.max_train_seconds,
    )
    run_dir = config.run_dir
    callbacks = [tracker]
    if save:
        run_dir.mkdir(parents=True, exist_ok=True)
        callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "logs"), write_graph=False))

    start = time.perf_counter()
    history = model.fit(train_ds, epochs=tc.epochs, callbacks=callbacks, verbose=verbose)
    train_seconds = time.perf_counter() - start
    epochs_run = len(history.history.get("loss", []))
    if model.objective == "cloze":  # every item of a window is a potential target
        positions = sum(min(len(s), mc.max_length) for s in split.train)
    else:
        positions = sum(max(len(s) - 1, 0) for s in split.train)  # every (item, next item) pair

    results = {
        "config": config.to_dict(),
        "data": data.metadata,
        "splits": evaluate_splits(config, model, data, split),
        "epochs": epochs_run,
        "best_epoch": tracker.best_epoch,
        "train_seconds": train_seconds,
        "seconds_to_best": tracker.best_seconds,
        "examples_per_second": positions * epochs_run / max(train_seconds, 1e-9),
        "examples_unit": "training target positions (next-item predictions) per second",
        "validation_curve": tracker.history,
        "loss_curve": [float(v) for v in history.history.get("loss", [])],
    }
    if save:
        model.save(run_dir / "model.keras")
        data.item_vocab.save(run_dir / "item_vocab.txt")
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results, model, data
