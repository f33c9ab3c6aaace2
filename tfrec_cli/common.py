"""Helpers of the sub-command modules: config sub-commands (`--config` plus dotted overrides), evaluation reports."""

import argparse
import json
from pathlib import Path


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
