"""Running and compiling the pipeline, and reporting what each component did.

- `run_pipeline(config)`: writes the ExampleGen input from the `data` section
  (unless `pipeline.input_dir` points at existing examples), runs the pipeline
  with `LocalDagRunner` (SQLite ML Metadata at `config.metadata_path`, so
  unchanged inputs reuse cached executions) and returns a `RunReport` built
  from ML Metadata: per component its state (`complete`, `cached`, `failed`,
  `not run`), wall time and output artifact URIs, then the pushed model path
  or why nothing was pushed. A failed run raises `PipelineRunError` (a
  `ValueError`) carrying the report and the component's error.
- `compile_pipeline(config, output_path)`: the same pipeline compiled by
  `KubeflowV2DagRunner` into a Kubeflow Pipelines / Vertex AI pipeline spec
  (JSON); the image (`pipeline.image`) must contain tfrec and its pipeline.
"""

import dataclasses
import json
import os
import time
from typing import Optional

STATES = {0: "unknown", 1: "new", 2: "running", 3: "complete", 4: "failed", 5: "cached", 6: "canceled"}
NOT_RUN = "not run"


class PipelineRunError(ValueError):
    """A component failed; `report` holds what ran, the message names the failure."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class ComponentStatus:
    component: str
    state: str
    seconds: Optional[float] = None
    artifacts: dict = dataclasses.field(default_factory=dict)  # output key -> [uri]


@dataclasses.dataclass
class RunReport:
    """What one run did (see `format_report`)."""

    pipeline_name: str
    pipeline_root: str
    wall_seconds: float
    components: list
    pushed_path: Optional[str] = None
    not_pushed_reason: Optional[str] = None
    blessed: Optional[bool] = None
    metrics: dict = dataclasses.field(default_factory=dict)  # candidate's metrics on the test split
    error: Optional[str] = None

    def status(self, component):
        for item in self.components:
            if item.component == component:
                return item
        raise KeyError(f"no component {component!r} in this pipeline; have {[c.component for c in self.components]}")

    def to_dict(self):
        return dataclasses.asdict(self)


def _store(metadata_path):
    from ml_metadata import metadata_store
    from tfx import v1 as tfx

    return metadata_store.MetadataStore(tfx.orchestration.metadata.sqlite_metadata_connection_config(metadata_path))


def _executions_by_node(store, pipeline_name, since_ms):
    """`{node id: newest execution created since since_ms}` of a pipeline."""
    pipeline_context = store.get_context_by_type_and_name("pipeline", pipeline_name)
    if pipeline_context is None:
        return {}
    executions = [
        e for e in store.get_executions_by_context(pipeline_context.id) if e.create_time_since_epoch >= since_ms
    ]
    node_type = store.get_context_type("node").id
    prefix = f"{pipeline_name}."
    out = {}
    for execution in sorted(executions, key=lambda e: (e.create_time_since_epoch, e.id)):
        for context in store.get_contexts_by_execution(execution.id):
            if context.type_id == node_type and context.name.startswith(prefix):
                out[context.name[len(prefix):]] = execution
    return out


def _outputs(store, execution):
    """`{output key: [uri]}` of an execution."""
    from ml_metadata.proto import metadata_store_pb2

    events = [e for e in store.get_events_by_execution_ids([execution.id])
              if e.type in (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT,
                            metadata_store_pb2.Event.INTERNAL_OUTPUT)]  # the last: what a resolver found
    artifacts = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in events])}
    out = {}
    for event in events:
        key = event.path.steps[0].key if event.path.steps else "output"
        out.setdefault(key, []).append(artifacts[event.artifact_id].uri)
    return out


def _custom_property(store, uri, name):
    for artifact in store.get_artifacts_by_uri(uri):
        if name in artifact.custom_properties:
            value = artifact.custom_properties[name]
            return value.int_value if value.HasField("int_value") else value.string_value
    return None


def _validation_failures(evaluation_uri):
    """Human-readable threshold failures of a TFMA evaluation."""
    import tensorflow_model_analysis as tfma

    failures = []
    result = tfma.load_validation_result(evaluation_uri)
    for per_slice in result.metric_validations_per_slice:
        for failure in per_slice.failures:
            key, threshold = failure.metric_key, failure.metric_threshold
            value = failure.metric_value.double_value.value
            if key.is_diff:
                bound = threshold.change_threshold.absolute.value
                failures.append(
                    f"{key.name} changed by {value:+.4f} against the last blessed model "
                    f"(change threshold: a drop of at most {max(-bound, 0.0):.4f})"
                )
            else:
                bound = threshold.value_threshold.lower_bound.value
                failures.append(f"{key.name} = {value:.4f} is below the value threshold {bound:.4f}")
    if result.missing_thresholds:
        failures.append("a thresholded metric has no value")
    return failures


def _candidate_metrics(evaluation_uri):
    import tensorflow_model_analysis as tfma

    out = {}
    for metrics_per_slice in tfma.load_metrics(evaluation_uri):
        if metrics_per_slice.slice_key.single_slice_keys:
            continue  # overall slice only
        for kv in metrics_per_slice.metric_keys_and_values:
            if kv.key.is_diff or kv.key.model_name == "baseline":
                continue
            out[kv.key.name] = kv.value.double_value.value
    return out


def build_report(config, pipeline, since_ms, wall_seconds, error=None):
    """A `RunReport` of the executions of `pipeline` since `since_ms` (from ML Metadata)."""
    store = _store(config.metadata_path)
    executions = _executions_by_node(store, config.pipeline_name, since_ms)
    components = []
    for node in pipeline.components:
        execution = executions.get(node.id)
        if execution is None:
            components.append(ComponentStatus(node.id, NOT_RUN))
            continue
        seconds = max(execution.last_update_time_since_epoch - execution.create_time_since_epoch, 0) / 1000
        state = STATES.get(execution.last_known_state, "unknown")
        components.append(ComponentStatus(node.id, state, seconds, _outputs(store, execution)))
    report = RunReport(config.pipeline_name, config.pipeline_root, wall_seconds, components, error=error)
    by_id = {c.component: c for c in components}
    pusher, evaluator = by_id.get("Pusher"), by_id.get("Evaluator")
    if pusher and pusher.state in ("complete", "cached"):
        pushed_uri = pusher.artifacts["pushed_model"][0]
        if _custom_property(store, pushed_uri, "pushed") == 1:
            report.pushed_path = _custom_property(store, pushed_uri, "pushed_destination")
    if evaluator and evaluator.state in ("complete", "cached"):
        evaluation_uri = evaluator.artifacts["evaluation"][0]
        report.blessed = bool(_custom_property(store, evaluator.artifacts["blessing"][0], "blessed"))
        report.metrics = _candidate_metrics(evaluation_uri)
        if not report.blessed:
            report.not_pushed_reason = "the model was not blessed: " + "; ".join(
                _validation_failures(evaluation_uri) or ["see the Evaluator's validation result"]
            )
    if report.pushed_path is None and report.not_pushed_reason is None:
        failed = [c.component for c in components if c.state == "failed"]
        report.not_pushed_reason = (
            f"the run stopped at {failed[0]}: {error}" if failed else error or "the Pusher did not run"
        )
    return report


def format_report(report):
    """The text `tfrec pipeline run` prints: one line per component, then the outcome."""
    lines = [f"pipeline {report.pipeline_name} (root {report.pipeline_root}), {report.wall_seconds:.0f}s"]
    width = max(len(c.component) for c in report.components)
    for c in report.components:
        seconds = f"{c.seconds:7.1f}s" if c.seconds is not None else " " * 8
        lines.append(f"  {c.component:<{width}}  {c.state:<8} {seconds}")
        for key, uris in sorted(c.artifacts.items()):
            lines += [f"  {'':<{width}}    {key}: {uri}" for uri in uris]
    if report.metrics:
        lines.append("test split: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(report.metrics.items())))
    if report.pushed_path:
        lines.append(f"pushed model: {report.pushed_path}")
    else:
        lines.append(f"nothing pushed: {report.not_pushed_reason}")
    return "\n".join(lines)


def run_pipeline(config, log=print):
    """Prepare the input, run locally, return the `RunReport`.

    The ExampleGen input is written from the `data` section into
    `<pipeline_root>/input` unless `pipeline.input_dir` is set, in which case
    that folder must already hold `train/`, `eval/` and `test/` examples.

    Raises:
        PipelineRunError: a component failed (the report is attached).
    """
    from tfx import v1 as tfx

    from tfx_pipeline.data import write_example_gen_input
    from tfx_pipeline.pipeline import create_pipeline

    if not config.pipeline.input_dir:
        summary = write_example_gen_input(config.experiment, config.input_dir)
        state = f"rewrote {', '.join(summary['changed'])}" if summary["changed"] else "unchanged"
        log(f"input {summary['input_dir']}: {summary['examples']} examples ({state})")
    else:
        from tfx_pipeline.data import SPLITS

        local = "://" not in config.input_dir
        missing = [s for s in SPLITS if local and not os.path.isdir(os.path.join(config.input_dir, s))]
        if missing:
            raise FileNotFoundError(
                f"pipeline.input_dir {config.input_dir} has no {', '.join(missing)} folder(s); "
                f"expected {'/, '.join(SPLITS)}/ with TFRecord examples (see tfx_pipeline.data)"
            )
    pipeline = create_pipeline(config)
    log(f"running {len(pipeline.components)} components: " + " -> ".join(c.id for c in pipeline.components))
    since_ms = int(time.time() * 1000) - 1
    start = time.perf_counter()
    error = None
    try:
        tfx.orchestration.LocalDagRunner().run(pipeline)
    except Exception as err:  # a component failed: report what ran, then raise with its message
        error = f"{type(err).__name__}: {err}"
    report = build_report(config, pipeline, since_ms, time.perf_counter() - start, error)
    reports = os.path.join(config.pipeline_root, "reports")
    tfx.dsl.io.fileio.makedirs(reports)
    with tfx.dsl.io.fileio.open(os.path.join(reports, f"run-{since_ms}.json"), "w") as f:
        f.write(json.dumps(report.to_dict(), indent=2))
    if error is not None:
        failed = [c.component for c in report.components if c.state == "failed"]
        raise PipelineRunError(f"{failed[0] if failed else 'the pipeline'} failed: {error}", report)
    return report


def compile_pipeline(config, output_path):
    """Compile the pipeline into a Kubeflow Pipelines v2 / Vertex AI spec (JSON file).

    Raises:
        ValueError: the `kfp-pipeline-spec` package, which TFX's compiler needs, is missing.
    """
    try:
        from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("kfp"):
            raise
        raise ValueError(
            f"compiling for Kubeflow/Vertex needs the kfp-pipeline-spec package, which is not installed "
            f"({err.name} is missing); TFX 1.16 asks for >= 0.2.2: pip install --no-deps kfp-pipeline-spec==0.3.0 "
            f"(the pin of requirements/requirements-tfx-nodeps.txt)"
        ) from None
    from tfx_pipeline.pipeline import create_pipeline

    output_path = os.path.abspath(output_path)
    os.makedirs(os.path.dirname(output_path), exist_ok=True)
    runner = kubeflow_v2_dag_runner.KubeflowV2DagRunner(
        config=kubeflow_v2_dag_runner.KubeflowV2DagRunnerConfig(default_image=config.pipeline.image),
        output_dir=os.path.dirname(output_path),
        output_filename=os.path.basename(output_path),
    )
    runner.run(create_pipeline(config, local=False), write_out=True)
    return output_path
