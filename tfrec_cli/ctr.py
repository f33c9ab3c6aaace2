"""`tfrec ctr train | evaluate | encode | export`: the CTR side of the command line (library: `tfrec.ctr`)."""

from __future__ import annotations

import sys
from pathlib import Path

from tfrec.ctr.config import REFERENCES, CTRConfig, load_ctr_config
from tfrec.ctr.data import load_ctr_data
from tfrec.ctr.evaluation import evaluate_saved_ctr, format_ctr_results
from tfrec.ctr.models import load_ctr_model, model_users
from tfrec.ctr.semantics import encode_lifelong_store
from tfrec.ctr.training import fit_reference, load_trained_ctr, train_ctr
from tfrec_cli.common import add_config_commands, report_evaluation


def _cmd_train(args):
    config = load_ctr_config(args.config, list(args.overrides) + (["train.resume=true"] if args.resume else []))
    if config.model.name in REFERENCES:
        results, _, _ = fit_reference(config)
        print(format_ctr_results(results))
        print(f"\nfitted in {results['train_seconds']:.0f}s; model and results.json in {config.run_dir}")
        return
    results, _, _ = train_ctr(config, verbose="auto" if sys.stdout.isatty() else 2)
    print()
    print(format_ctr_results(results))
    print(f"\nepochs {results['epochs']} (best {results['best_epoch']}), train {results['train_seconds']:.0f}s, "
          f"{results['samples_per_second']:.0f} samples/s")
    print(f"model, SIDs and results.json in {config.run_dir}")


def _cmd_evaluate(args):
    config = load_ctr_config(args.config, args.overrides)
    model, path = load_ctr_model(config, args.model)
    report_evaluation(evaluate_saved_ctr(config, model), format_ctr_results, path)


def _cmd_export(args):
    # The wiring layer reaches up to `export`; the library (`tfrec.ctr`) does not.
    from export.saved_model import export_ctr, version_dir

    config = load_ctr_config(args.config, args.overrides)
    base = Path(args.out) / "ranker"
    version_dir(base, args.version)  # fail before loading anything
    model, _, item_vocab, fingerprint = load_trained_ctr(config, args.model)
    users, profiles = model_users(model, lambda: load_ctr_data(config.data))  # user tokens mapped in-graph
    path = export_ctr(model, item_vocab, base, version=args.version, max_history=config.model.max_history,
                      data_fingerprint=fingerprint, experiment_config=config.to_dict(), users=users,
                      user_profiles=profiles)
    print(f"ranker (stock ops, max_history {config.model.max_history}): {path}")


def _cmd_encode(args):
    config = load_ctr_config(args.config, args.overrides)
    if config.data.interactions_path and not config.data.items_path:
        raise ValueError("tfrec ctr encode needs the item texts: set data.items_path (your own data)")
    data = load_ctr_data(config.data)
    store = encode_lifelong_store(data, args.out or config.sids.store_path, dataset=config.data.dataset,
                                  data_root=config.data.data_root, items_path=config.data.items_path,
                                  force=args.force)
    print(f"semantic store {store.path}: {store.item_vocab.size} rows (the lifelong item vocabulary)")


def add_commands(subparsers) -> None:
    """Register `tfrec ctr train | evaluate | encode | export`."""
    ctr = subparsers.add_parser("ctr", help="lifelong CTR models (R2LED and baselines)")
    sub = ctr.add_subparsers(dest="ctr_command", required=True)
    parsers = add_config_commands(sub, (
        ("train", _cmd_train, "train, evaluate and save a CTR model"),
        ("evaluate", _cmd_evaluate, "evaluate a saved CTR model on the validation and test splits"),
        ("encode", _cmd_encode, "encode the semantic store for the lifelong item vocabulary (MiniLM)"),
        ("export", _cmd_export, "export a trained CTR model as a TF Serving ranker SavedModel (<out>/ranker/<v>)"),
    ), "YAML CTR config (see configs/r2led_ml1m.yaml)", "model.name=din train.epochs=3", config_class=CTRConfig)
    parsers["encode"].add_argument("--out", help="store root (default: sids.store_path)")
    parsers["encode"].add_argument("--force", action="store_true",
                                   help="re-encode even if an identical version exists")
    export = parsers["export"]
    export.add_argument("--out", required=True, help="output folder: the ranker goes to <out>/ranker/<version>")
    export.add_argument("--version", type=int, help="version number (default: next free)")
    export.add_argument("--model", help="path to model.keras (default: <run_dir>/model.keras)")
