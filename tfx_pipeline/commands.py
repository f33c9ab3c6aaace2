"""`tfrec pipeline run|compile`: the TFX pipeline from the command line.

    tfrec pipeline run     --config configs/pipeline_sasrec_ml100k.yaml [key=value ...]
    tfrec pipeline compile --config configs/pipeline_sasrec_ml100k.yaml --output spec.json [key=value ...]

`run` writes the ExampleGen input from the config's `data` section (unless
`pipeline.input_dir` names existing examples), runs the pipeline with
`LocalDagRunner`, and prints each component's state, wall time and artifact
URIs, then the pushed model path or why nothing was pushed. A failed run
(e.g. data anomalies) prints the same table and ends with the error, exit 2.
`compile` writes the Kubeflow Pipelines v2 / Vertex AI spec of the same pipeline.
"""


def _load(args):
    from tfx_pipeline.config import load_pipeline_config

    return load_pipeline_config(args.config, args.overrides)


def _cmd_run(args):
    from tfx_pipeline.runner import PipelineRunError, format_report, run_pipeline

    try:
        report = run_pipeline(_load(args))
    except PipelineRunError as err:
        if err.report is not None:
            print(format_report(err.report))
        raise
    print(format_report(report))


def _cmd_compile(args):
    from tfx_pipeline.runner import compile_pipeline

    path = compile_pipeline(_load(args), args.output)
    print(f"pipeline spec written to {path}")


def add_commands(subparsers):
    """Register `tfrec pipeline run|compile` on the `tfrec` sub-parsers."""
    pipeline = subparsers.add_parser("pipeline", help="run or compile the TFX pipeline")
    actions = pipeline.add_subparsers(dest="pipeline_command", required=True)
    run = actions.add_parser("run", help="run the pipeline locally (LocalDagRunner, SQLite ML Metadata)")
    compile_ = actions.add_parser("compile", help="compile the pipeline for Kubeflow Pipelines / Vertex AI")
    compile_.add_argument("--output", required=True, help="pipeline spec file to write (JSON)")
    for parser, func in ((run, _cmd_run), (compile_, _cmd_compile)):
        parser.add_argument("--config", help="YAML pipeline config (see configs/pipeline_*.yaml)")
        parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=1 pipeline.train_steps=1")
        parser.set_defaults(func=func)
