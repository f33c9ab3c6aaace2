"""Training of next-item models: build from config, fit with early stopping, evaluate, save.

`train_sequential(config)` is what `tfrec train` runs:

1. read the interactions (bundled dataset or user file), k-core filter,
   vocabularies, chronological sequences (`tfrec.data.preprocess`);
2. leave-one-out split (last item = test, second-last = validation);
3. build `NextItemRecommender` (item encoder + backbone) from `ModelConfig`;
4. the engine's `fit` (`tfrec.training.engine`) on all positions at once; after
   every epoch the validation NDCG@10 (full ranking) is computed, logged to
   TensorBoard, and the best weights are kept; training stops after `patience`
   epochs without a new best (or when `max_train_seconds` is spent, checked after
   every batch) and the best weights are restored; a checkpoint after every epoch
   lets `train.resume=true` (`tfrec train --resume`) continue a killed run;
5. validation and test metrics under every configured protocol, beside the
   popularity reference (training-item counts as scores);
6. the run directory gets `model.keras`, `item_vocab.txt`, `results.json`,
   TensorBoard logs under `logs/` (`train.tensorboard_dir`) and the checkpoint
   under `backup/` (`train.backup_dir`).

Epoch `e` trains on `training_dataset(..., seed=train.seed + e)`: its order and
masks depend only on the seed and the epoch, so a resumed run sees the batches
an uninterrupted one does.
"""

import json
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
from tfrec.training.flops import epoch_flops
from tfrec.training.engine import build_optimizer, compile_options, fit, make_strategy, seed_everything

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
        loss_reduction=mc.loss_reduction,
        label_smoothing=mc.label_smoothing,
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
    return {"config": config.to_dict(), "data": data.metadata, "splits": evaluate_splits(config, model, data, split),
            "reference": {"popularity": popularity_reference(config, data, split)}}


def popularity_reference(config, data, split):
    """`{"valid": {protocol: metrics}, "test": ...}` of the popularity baseline: every
    user's scores are the training-item counts (no learning; the reference row of
    `tfrec train`'s tables), under the configured protocols."""
    counts = np.bincount(np.concatenate(split.train), minlength=data.item_vocab.size).astype(np.float32)
    return evaluate_splits(config, PopularityScorer(counts), data, split)


class PopularityScorer:
    """A scorer for `SequentialEvaluator`: every history gets the same item scores."""

    def __init__(self, item_scores):
        self.item_scores = np.asarray(item_scores, np.float32)
        self.vocab_size = len(self.item_scores)

    def score_items(self, history_ids):
        import tensorflow as tf

        rows = tf.shape(history_ids)[0]
        return tf.tile(tf.constant(self.item_scores)[None, :], [rows, 1])


def engine_dirs(config, save):
    """`(backup_dir, tensorboard_dir)` of a run: the configured ones, else under the run
    folder when the run is saved (`save`), else none."""
    tc = config.train
    backup = tc.backup_dir or (config.run_dir / "backup" if save or tc.resume else None)
    if tc.tensorboard_dir == "":
        logs = None
    else:
        logs = tc.tensorboard_dir or (config.run_dir / "logs" if save else None)
    return backup, logs


def run_key(config):
    """What a checkpoint must match to be resumed: the config without `train.resume`."""
    values = config.to_dict()
    values["train"].pop("resume", None)
    return values


def train_sequential(config: ExperimentConfig, verbose=2, save=True):
    """Train, evaluate and (optionally) save one next-item model.

    Returns:
        `(results, model, data)`: the results dict (also written to
        `results.json`), the trained model with its best weights, and the
        `PreparedData`.
    """
    mc, tc = config.model, config.train
    tc.check()
    strategy = make_strategy(tc.distribution)  # first: multi-worker collectives start before other TF work
    seed_everything(tc.seed, tc.deterministic_ops)
    data, split = prepare_split(config)

    with strategy.scope():
        model = build_model(mc, data.item_vocab.size, item_encoder=build_item_encoder(config, data.item_vocab),
                            seed=tc.seed)
        # Popularity for sampled-softmax proposals: training items only (no leak of targets).
        model.set_item_counts(np.bincount(np.concatenate(split.train), minlength=data.item_vocab.size))
        model.compile(optimizer=build_optimizer(tc), **compile_options(tc))

    def epoch_data(epoch):
        return training_dataset(
            split.train,
            mc.max_length,
            tc.batch_size,
            objective=model.objective,
            mask_prob=mc.mask_prob,
            mask_token_id=model.mask_token_id,
            seed=tc.seed + epoch,
            bucket_batches=tc.bucket_batches,
            shuffle_batches=tc.shuffle_batches,
            pack=tc.pack,
            scheme=tc.scheme,
        )

    evaluator = SequentialEvaluator(
        split.valid_history, split.valid_targets, protocols=("full",), **_evaluator_args(config, data)
    )
    backup_dir, log_dir = engine_dirs(config, save)
    run_dir = config.run_dir
    if save:
        run_dir.mkdir(parents=True, exist_ok=True)
    result = fit(model, epoch_data, evaluator, tc, protocol="full", backup_dir=backup_dir, tensorboard_dir=log_dir,
                 verbose=verbose, strategy=strategy, run_key=run_key(config))
    epochs_run = result.epochs
    if model.objective == "cloze":  # every item of a window is a potential target
        positions = sum(min(len(s), mc.max_length) for s in split.train)
    else:
        positions = sum(max(len(s) - 1, 0) for s in split.train)  # every (item, next item) pair

    results = {
        "config": config.to_dict(),
        "data": data.metadata,
        "splits": evaluate_splits(config, model, data, split),
        "reference": {"popularity": popularity_reference(config, data, split)},
        "epochs": epochs_run,
        "best_epoch": result.best_epoch,
        "stopped_by": result.stopped_by,
        "resumed_from_epoch": result.resumed_from,
        "train_seconds": result.train_seconds,
        "seconds_to_best": result.seconds_to_best,
        "examples_per_second": positions * epochs_run / max(result.train_seconds, 1e-9),
        "examples_unit": "training target positions (next-item predictions) per second",
        "epoch_seconds": result.train_seconds / max(epochs_run, 1),
        "epoch_flops": epoch_flops(mc, split.train, data.item_vocab.size, scheme=tc.scheme)["total"],
        "validation_curve": result.validation_curve,
        "loss_curve": result.losses,
        "tensorboard_dir": str(log_dir) if log_dir else None,
    }
    if save:
        model.save(run_dir / "model.keras")
        data.item_vocab.save(run_dir / "item_vocab.txt")
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results, model, data
