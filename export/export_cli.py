"""`tfrec export`: a trained model as TF Serving SavedModels (recommender + retrieval indexes).

    tfrec export --config configs/sasrec_beauty.yaml --out servables [--k 10] [--scann] [key=value ...]

Writes `<out>/recommender/<v>` (`export.saved_model.export_sequential`) and
`<out>/retrieval_bruteforce/<v>` (+ `retrieval_scann/<v>` with `--scann`).
Kept apart from `export.saved_model` so that registering the command does not
import TensorFlow.
"""

from pathlib import Path


def _load_trained(args):
    """`(config, model, item_vocab, data_fingerprint)` as `tfrec evaluate` finds them."""
    from tfrec.runs import recorded_data_fingerprint
    from tfrec.config import load_config
    from tfrec.data.vocab import Vocabulary
    from tfrec.training import load_trained_model

    config = load_config(args.config, args.overrides)
    model, model_path = load_trained_model(config, args.model)
    vocab_path = model_path.parent / "item_vocab.txt"
    fingerprint = recorded_data_fingerprint(model_path.parent)
    if vocab_path.is_file():
        item_vocab = Vocabulary.load(vocab_path)
    else:  # rebuild it from the configured data, as `tfrec evaluate` does
        from tfrec.training import prepare_split

        data, _ = prepare_split(config)
        item_vocab, fingerprint = data.item_vocab, data.metadata.get("fingerprint")
    return config, model, item_vocab, fingerprint


def _cmd_export(args):
    from export.saved_model import catalog_table, export_index, export_sequential, version_dir, vocab_fingerprint
    from tfrec.serving import USER_EMBEDDING
    from tfrec.serving.retrieval import build_indexes

    scann_options = {
        key: value
        for key, value in (
            ("num_leaves", args.scann_num_leaves),
            ("num_leaves_to_search", args.scann_leaves_to_search),
            ("reorder", args.scann_reorder),
        )
        if value is not None
    }
    if scann_options and not args.scann:
        raise ValueError("--scann-* options need --scann")
    out = Path(args.out)
    kinds = ("bruteforce", "scann") if args.scann else ("bruteforce",)
    for name in ("recommender", *(f"retrieval_{kind}" for kind in kinds)):
        version_dir(out / name, args.version)  # fail before writing anything
    config, model, item_vocab, fingerprint = _load_trained(args)
    recommender = export_sequential(
        model, item_vocab, out / "recommender", k=args.k, version=args.version,
        data_fingerprint=fingerprint, experiment_config=config.to_dict(), jit_compile=not args.no_xla,
    )
    xla = "" if args.no_xla else ", XLA: tensorflow_model_server needs --xla_cpu_compilation_enabled=true"
    print(f"recommender (stock ops{xla}): {recommender}")
    table, tokens = catalog_table(model, item_vocab)
    source = {
        "recommender": str(recommender),
        "model_config": model.get_config(),
        "vocab_fingerprint": vocab_fingerprint(item_vocab),
        "data_fingerprint": fingerprint,
        "query": f"{USER_EMBEDDING} signature of the recommender",
    }
    for kind, index in build_indexes(table, tokens, k=args.k, kinds=kinds, scann_options=scann_options).items():
        path = export_index(index, out / f"retrieval_{kind}", version=args.version, source=source)
        note = "needs `import scann` in the server" if index.save_namespace_whitelist else "stock ops"
        print(f"retrieval_{kind} ({note}): {path}")


def add_commands(subparsers):
    """Register `tfrec export` on the `tfrec` argument parser."""
    cmd = subparsers.add_parser(
        "export",
        help="export a trained model as TF Serving SavedModels (recommender + retrieval indexes)",
    )
    cmd.add_argument("--config", help="YAML experiment config (see configs/)")
    cmd.add_argument("--model", help="path to model.keras (default: <run_dir>/model.keras)")
    cmd.add_argument("--out", required=True, help="output folder: <out>/recommender/<v>, <out>/retrieval_*/<v>")
    cmd.add_argument("--k", type=int, default=10, help="items per answer (default 10)")
    cmd.add_argument("--version", type=int, help="version number (default: next free per servable)")
    cmd.add_argument("--scann", action="store_true", help="also export a ScaNN retrieval servable")
    cmd.add_argument("--no-xla", dest="no_xla", action="store_true",
                     help="recommender without XLA compilation (plain TF ops, about 2x the CPU per request; for a "
                          "tensorflow_model_server started without --xla_cpu_compilation_enabled)")
    cmd.add_argument("--scann-num-leaves", type=int, help="ScaNN tree leaves (default sqrt(items))")
    cmd.add_argument("--scann-leaves-to-search", type=int, help="ScaNN leaves searched per query")
    cmd.add_argument("--scann-reorder", type=int, help="ScaNN candidates re-scored exactly (0 = none)")
    cmd.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. name=my-run")
    cmd.set_defaults(func=_cmd_export)
