"""The `tfrec` command.

    tfrec prepare  --dataset amazon-beauty --out artifacts/beauty [--beam] [--user-core 5 --item-core 5]
    tfrec train    --config configs/sasrec_beauty.yaml [--resume] [key=value ...]
    tfrec evaluate --config configs/sasrec_beauty.yaml [--model runs/<name>/model.keras] [key=value ...]

`key=value` overrides use dotted config keys (`train.epochs=3`, `model.backbone=gru4rec`).
`train` shows a progress bar per epoch (one line per epoch when not on a terminal),
writes TensorBoard logs to `<output_dir>/<name>/logs` (`train.tensorboard_dir`), a
checkpoint after every epoch to `<output_dir>/<name>/backup` (`--resume` continues
from it), prints the metrics tables (one per protocol, never mixed; the model beside
the popularity baseline) and writes `results.json` beside the model.
`tfrec train --help` lists every config key with its default.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from tfrec import runtime  # before anything imports TensorFlow


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


def add_config_commands(subparsers, commands, config_help, override_example, config_class=None):
    """Sub-commands `(name, func, help)` taking `--config` plus dotted overrides
    (`evaluate` also `--model`, `train` also `--resume`); returns `{name: parser}` for
    extra arguments. With `config_class` (a config dataclass) `--help` lists its keys."""
    from tfrec.config import describe_keys

    parsers = {}
    for name, func, text in commands:
        epilog = None
        if config_class is not None:
            epilog = ("config keys (YAML sections, or dotted overrides) with their defaults; "
                      "documented in the config dataclasses' docstrings:\n" + describe_keys(config_class))
        cmd = subparsers.add_parser(name, help=text, epilog=epilog,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_argument("--config", help=config_help)
        cmd.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {override_example}")
        if name == "evaluate":
            cmd.add_argument("--model", help="path to model.keras (default: <run_dir>/model.keras)")
        if name == "train":
            cmd.add_argument("--resume", action="store_true",
                             help="continue from the run's last checkpoint (train.backup_dir, default "
                                  "<output_dir>/<name>/backup) instead of starting over")
        cmd.set_defaults(func=func)
        parsers[name] = cmd
    return parsers


def report_evaluation(results, format_tables, model_path):
    """Print an `evaluate` command's tables and write `evaluation.json` beside the model."""
    print(format_tables(results))
    out = Path(model_path).parent / "evaluation.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {out}")


def recorded_data_fingerprint(run_dir):
    """The training data fingerprint a run recorded (`results.json`, else `evaluation.json`), or None."""
    for name in ("results.json", "evaluation.json"):
        path = Path(run_dir) / name
        fingerprint = json.loads(path.read_text()).get("data", {}).get("fingerprint") if path.is_file() else None
        if fingerprint is not None:
            return fingerprint
    return None


def build_parser():
    parser = argparse.ArgumentParser(prog="tfrec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's start-up log lines and all warnings")
    sub = parser.add_subparsers(dest="command", required=True)

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
    for module_name in COMMAND_MODULES:
        _add_module_commands(sub, module_name)
    return parser


# Feature packages register their own sub-commands: each module defines
# `add_commands(subparsers)`. `export` and `tfx_pipeline` sit above `tfrec` in the
# dependency order, so the CLI is the one place that reaches up to them, and only
# to register commands; the library itself never imports them.
COMMAND_MODULES = (
    "tfrec.semantics.encode",
    "tfrec.semantics.enrich",
    "tfrec.semantics.sids",
    "tfrec.ctr.commands",
    "export.export_cli",
    "export.commands",
    "export.demo",
    "tfx_pipeline.commands",
)


def _add_module_commands(subparsers, module_name):
    import importlib
    import importlib.util

    try:
        if importlib.util.find_spec(module_name) is None:
            return
    except ModuleNotFoundError:  # parent package absent
        return
    importlib.import_module(module_name).add_commands(subparsers)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    runtime.configure(verbose="--verbose" in argv)  # before TensorFlow is imported
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"tfrec {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
