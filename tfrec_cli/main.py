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

This is the wiring layer above `tfrec`, `export` and `tfx_pipeline`.
Sub-commands: `prepare`, `train`, `evaluate` (`tfrec_cli.sequential`), `ctr`
(`tfrec_cli.ctr`), `encode`, `enrich`, `sids` (`tfrec.semantics`), `export`
(`export.export_cli`), `serve`, `query`, `events` (`export.commands`), `ask`
(`export.demo`), `pipeline` (`tfx_pipeline.commands`); `tfrec --help` lists them.
Run as `tfrec ...` or `python -m tfrec_cli ...`.
"""

import argparse
import os
import sys

from tfrec import runtime  # before anything imports TensorFlow


def build_parser():
    parser = argparse.ArgumentParser(prog="tfrec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's start-up log lines and all warnings")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        _add_module_commands(sub, module_name)
    return parser


# Each module defines `add_commands(subparsers)`, imported when the parser is built
# (by name, so a package that is not installed, e.g. without TFX, leaves its commands
# out). This wiring layer sits above `tfrec`, `export` and `tfx_pipeline`; none of
# them imports it.
COMMAND_MODULES = (
    "tfrec_cli.sequential",
    "tfrec.semantics.encode",
    "tfrec.semantics.enrich",
    "tfrec.semantics.sids",
    "tfrec_cli.ctr",
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
