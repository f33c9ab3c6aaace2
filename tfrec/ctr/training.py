"""CTR training: `train_ctr` (through `tfrec.training.engine.fit`), `fit_reference`, trained runs."""

from __future__ import annotations

import json
import time

from tfrec.ctr.config import REFERENCES, CTRConfig, check_ctr_config
from tfrec.ctr.data import load_ctr_data
from tfrec.ctr.evaluation import CTREvaluator, evaluate_ctr_splits, evaluated_splits, popularity_metrics
from tfrec.ctr.models import build_ctr_model, load_ctr_model, needs_semantics
from tfrec.ctr.semantics import prepare_item_semantics
from tfrec.data.preprocess import ITEM_VOCAB_FILE


def train_ctr(config: CTRConfig, verbose=2, save=True, data=None, semantics=None, train_data=None):
    """Train, evaluate and (optionally) save one lifelong CTR model.

    Args:
        config: a `CTRConfig` (`load_ctr_config`).
        verbose: Keras `fit` verbosity.
        save: write `model.keras`, `results.json` and `sids/` under `config.run_dir`.
        data: optional `LifelongData` (default: `load_ctr_data(config.data)`).
        semantics: optional `ItemSemantics` for `data` (default: `prepare_item_semantics`
            from `config.sids` when the model needs them).
        train_data: optional `epoch -> tf.data.Dataset` of training batches in
            `lifelong_dataset`'s format (default: `data`'s train split; the TFX
            Trainer streams its TFRecords here).

    Returns:
        `(results, model, data)`.
    """
    from tfrec.data.lifelong import lifelong_dataset
    from tfrec.training import engine
    from tfrec.training.sequential import engine_dirs, run_key

    check_ctr_config(config)
    mc, tc = config.model, config.train
    tc.check()
    strategy = engine.make_strategy(tc.distribution)  # first: multi-worker collectives start before other TF work
    data = data if data is not None else load_ctr_data(config.data)
    if semantics is None and needs_semantics(mc.name):
        semantics = prepare_item_semantics(data, config.sids.store_path, config.sids,
                                           fit=needs_semantics(mc.name) == "sids")
    engine.seed_everything(tc.seed, tc.deterministic_ops)
    with strategy.scope():
        model = build_ctr_model(config, data, semantics, seed=tc.seed)
        model.compile(optimizer=engine.build_optimizer(tc), **engine.compile_options(tc))

    def epoch_data(epoch):  # epoch e's order depends only on the seed and e (exact resume)
        if train_data is not None:
            ds = train_data(epoch)
        else:
            ds = lifelong_dataset(data, "train", batch_size=tc.batch_size, max_history=mc.max_history,
                                  shuffle=True, seed=tc.seed + epoch)
        return ds.repeat() if tc.steps_per_epoch is not None else ds

    backup_dir, log_dir = engine_dirs(config, save)
    if save:
        config.run_dir.mkdir(parents=True, exist_ok=True)
    fitted = engine.fit(model, epoch_data, CTREvaluator(data, "valid", tc.eval_batch_size, mc.max_history), tc,
                        protocol=None, steps_per_epoch=tc.steps_per_epoch, backup_dir=backup_dir,
                        tensorboard_dir=log_dir, verbose=verbose, strategy=strategy, run_key=run_key(config))
    train_seconds, epochs_run = fitted.train_seconds, fitted.epochs
    steps = tc.steps_per_epoch or -(-len(data.splits["train"]) // tc.batch_size)
    results = {
        "config": config.to_dict(),
        "data": data.metadata,
        "semantics": semantics.describe() if semantics is not None else None,
        "model": {"class": type(model).__name__, "parameters": int(model.count_params())},
        "splits": evaluate_ctr_splits(config, model, data),
        "reference": {"popularity": {s: popularity_metrics(data, s) for s in evaluated_splits(data)}},
        "epochs": epochs_run,
        "best_epoch": fitted.best_epoch,
        "stopped_by": fitted.stopped_by,
        "resumed_from_epoch": fitted.resumed_from,
        "train_seconds": train_seconds,
        "seconds_to_best": fitted.seconds_to_best,
        "samples_per_second": epochs_run * steps * tc.batch_size / max(train_seconds, 1e-9),
        "validation_curve": fitted.validation_curve,
        "loss_curve": fitted.losses,
        "tensorboard_dir": str(log_dir) if log_dir else None,
    }
    if save:
        run_dir = config.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        model.save(run_dir / "model.keras")
        data.item_vocab.save(run_dir / ITEM_VOCAB_FILE)
        if semantics is not None and semantics.quantizer is not None and needs_semantics(mc.name) == "sids":
            from tfrec.semantics.sids import SIDS_FOLDER, save_sids

            save_sids(semantics.sids, semantics.quantizer, run_dir / SIDS_FOLDER)
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results, model, data


def fit_reference(config: CTRConfig, data=None, save: bool = True):
    """Build and fit a reference model (`popularity`: nothing to fit; `logreg`: the wide
    part as a scikit-learn logistic regression on the training samples) and evaluate it.
    Returns `(results, model, data)` like `train_ctr`."""
    from tfrec.data.lifelong import lifelong_dataset
    from tfrec.models.ctr_wide import fit_logistic_regression

    check_ctr_config(config)
    mc = config.model
    if mc.name not in REFERENCES:
        raise ValueError(f"{mc.name!r} is not a reference model ({', '.join(REFERENCES)})")
    data = data if data is not None else load_ctr_data(config.data)
    model = build_ctr_model(config, data, None)
    start = time.perf_counter()
    if mc.name == "logreg":
        fit_logistic_regression(model, lifelong_dataset(data, "train", batch_size=config.train.eval_batch_size,
                                                        max_history=mc.max_history, bucket=True),
                                c=mc.logreg_c)
    else:
        model(next(iter(lifelong_dataset(data, "train", batch_size=2, max_history=2)))[0])  # build
    train_seconds = time.perf_counter() - start
    results = {
        "config": config.to_dict(), "data": data.metadata, "semantics": None,
        "model": {"class": type(model).__name__, "parameters": int(model.count_params())},
        "splits": evaluate_ctr_splits(config, model, data),
        "reference": {"popularity": {s: popularity_metrics(data, s) for s in evaluated_splits(data)}},
        "epochs": 1 if mc.name == "logreg" else 0, "best_epoch": None, "train_seconds": train_seconds,
    }
    if save:
        run_dir = config.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        model.save(run_dir / "model.keras")
        data.item_vocab.save(run_dir / ITEM_VOCAB_FILE)
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results, model, data


def load_trained_ctr(config: CTRConfig, model_path=None):
    """`(model, model_path, item_vocab, data_fingerprint)` of a trained CTR run.

    The vocabulary is the run's `item_vocab.txt` (written by `train_ctr`), else
    rebuilt from the configured data; the fingerprint is the one the run recorded."""
    from tfrec.runs import recorded_data_fingerprint
    from tfrec.data.vocab import Vocabulary

    model, path = load_ctr_model(config, model_path)
    fingerprint = recorded_data_fingerprint(path.parent)
    if (path.parent / ITEM_VOCAB_FILE).is_file():
        item_vocab = Vocabulary.load(path.parent / ITEM_VOCAB_FILE)
    else:
        data = load_ctr_data(config.data)
        item_vocab, fingerprint = data.item_vocab, data.metadata.get("fingerprint")
    return model, path, item_vocab, fingerprint
