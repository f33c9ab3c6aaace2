"""The `tfrec` command line: wiring above the library (`tfrec`), `export` and `tfx_pipeline`.

`tfrec_cli.main.main` is the console script (`tfrec`, also `python -m tfrec_cli`);
sub-command modules define `add_commands(subparsers)` (`tfrec_cli.sequential`,
`tfrec_cli.ctr`, and the registration functions of `tfrec.semantics`, `export`
and `tfx_pipeline`). Importing this package does not import TensorFlow, so
`tfrec.runtime.configure` runs first.
"""

from tfrec_cli.main import build_parser, main  # noqa: F401
