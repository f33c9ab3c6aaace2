"""`tfrec prepare | train | evaluate`: the sequential (next-item) side."""

import json
import sys
from pathlib import Path

from tfrec_cli.common import add_config_commands, report_evaluation


def _tables(results):
    from tfrec.metrics import format_metrics_table

    protocols = []
    for split in results["splits"].values():
        protocols += [p for p in split if p not in protocols]
    reference = results.get("reference", {}).get("popularity", {})
    label = results.get("config", {}).get("model", {}).get("backbone", "model")
    out = []
    for protocol in protocols:
        rows = [
            {"split": name, "model": model, "protocol": protocol, **metrics[protocol]}
            for model, splits in ((label, results["splits"]), ("popularity", reference))
            for name, metrics in splits.items()
            if protocol in metrics
        ]
        out.append(f"protocol: {protocol}\n{format_metrics_table(rows)}")
    return "\n\n".join(out)


def _cmd_prepare(args):
    from tfrec.data.preprocess import PrepareConfig, check_output_dir, prepare, save_prepared
    from tfrec.data.readers import DATASETS, load_dataset, read_interactions

    check_output_dir(args.out)  # before any work: a bad --out is a clean error
    config = PrepareConfig(user_core=args.user_core, item_core=args.item_core, dedupe=args.drop_duplicates)
    if args.input:
        path, read_kwargs = args.input, {}
    elif args.dataset in DATASETS:
        dataset = load_dataset(args.dataset, args.data_root)
        path = dataset.source_files[0]
        spec = DATASETS[args.dataset]
        read_kwargs = {"encoding": spec.encoding}
        if spec.columns:
            read_kwargs["columns"] = dict(spec.columns)
    else:
        raise ValueError(f"unknown dataset {args.dataset!r}; known: {', '.join(DATASETS)} (or pass --input FILE)")
    if args.beam:
        from tfrec.data.beam_preprocess import run_prepare_beam

        run_prepare_beam(path, args.out, config, beam_args=args.beam_args or None, read_kwargs=read_kwargs)
    else:
        data = prepare(read_interactions(path, **read_kwargs), config, source=str(path))
        if data.duplicate_rows:
            action = "dropped" if config.dedupe else "kept (pass --drop-duplicates to drop them)"
            print(f"tfrec prepare: {data.duplicate_rows} duplicate interaction rows "
                  f"(same user, item and timestamp) {action}", file=sys.stderr)
        try:
            save_prepared(data, args.out)
        except Exception as err:  # noqa: BLE001 - OSError, tf.errors.OpError: a clean error naming --out
            raise ValueError(f"--out {args.out}: cannot write: {getattr(err, 'message', None) or err}") from None
    meta = json.loads((Path(args.out) / "metadata.json").read_text())
    print(
        f"prepared {meta['num_interactions']} interactions, {meta['num_users']} users, "
        f"{meta['num_items']} items -> {args.out} (fingerprint {meta['fingerprint'][:12]})"
    )


def _cmd_train(args):
    from tfrec.config import load_config
    from tfrec.training import train_sequential

    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    config = load_config(args.config, overrides)
    results, _, _ = train_sequential(config, verbose="auto" if sys.stdout.isatty() else 2)
    print()
    print(_tables(results))
    print(
        f"\nepochs {results['epochs']} (best {results['best_epoch']}), "
        f"train {results['train_seconds']:.0f}s, {results['examples_per_second']:.0f} examples/s"
    )
    print(f"model, vocabulary and results.json in {config.run_dir}")
    if results.get("tensorboard_dir"):
        print(f"TensorBoard: tensorboard --logdir {results['tensorboard_dir']}")


def _cmd_evaluate(args):
    from tfrec.config import load_config
    from tfrec.training import evaluate_saved_model, load_trained_model

    config = load_config(args.config, args.overrides)
    model, model_path = load_trained_model(config, args.model)
    report_evaluation(evaluate_saved_model(config, model), _tables, model_path)


def add_commands(sub):
    """Register `tfrec prepare | train | evaluate`."""
    prep = sub.add_parser("prepare", help="filter, build vocabularies and sequences, save them")
    prep.add_argument("--dataset", default="amazon-beauty", help="bundled dataset name")
    prep.add_argument("--input", help="a user interactions file (TSV/CSV/Parquet) instead of --dataset")
    prep.add_argument("--data-root", help="folder of the bundled datasets (default: ../shared/data)")
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--user-core", type=int, default=0)
    prep.add_argument("--item-core", type=int, default=0)
    prep.add_argument("--drop-duplicates", action="store_true",
                      help="drop exact repeats of (user, item, timestamp), keeping the first (default: keep, report)")
    prep.add_argument("--beam", action="store_true", help="run as an Apache Beam pipeline")
    prep.add_argument("--beam-args", nargs="*", help="Beam pipeline options, e.g. --runner=DirectRunner")
    prep.set_defaults(func=_cmd_prepare)

    from tfrec.config import ExperimentConfig

    add_config_commands(sub, (
        ("train", _cmd_train, "train, evaluate and save a next-item model"),
        ("evaluate", _cmd_evaluate, "evaluate a saved model on the validation and test splits"),
    ), "YAML experiment config (see configs/)", "train.epochs=3", config_class=ExperimentConfig)
