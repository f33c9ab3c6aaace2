"""`create_pipeline(config)`: the TFX pipeline of a tfrec next-item model.

    ImportExampleGen (train/eval/test pairs, `tfx_pipeline.data`)
      -> StatisticsGen -> SchemaGen (inferred, for inspection)
                       -> ImportSchemaGen (curated schema kept in the repo)
      -> ExampleValidator -> AnomalyGate (any anomaly fails the run here)
      -> Transform (`tfx_pipeline.preprocessing`: tft item vocabulary)
      [-> ItemSemantics -> SemanticIds, when configured]
      -> Trainer (`tfx_pipeline.trainer.run_fn`: tfrec model, `model.fit`;
         with `model.item_encoder: dmesr` it also takes ItemSemantics' store)
      -> latest blessed model resolver + Evaluator (TFMA on the test split:
         NDCG/HR/MRR@K; value threshold + change threshold vs the baseline)
      -> Pusher (`<serving_dir>/<unix time version>/`, what a model server watches)

The same definition runs locally (`LocalDagRunner`, SQLite ML Metadata; see
`tfx_pipeline.runner`) and compiles for Kubeflow Pipelines / Vertex AI
(`KubeflowV2DagRunner`). Heavy components are Beam jobs: `beam_pipeline_args`
selects the runner (DirectRunner in-process here; `--runner=DataflowRunner
--project=... --region=... --temp_location=gs://...`, `--runner=FlinkRunner
--flink_master=host:port --environment_type=...` or `--runner=SparkRunner` at
scale, with the data, pipeline root and serving dir on a shared file system
such as GCS).
"""

import json

import tensorflow_model_analysis as tfma
from tfx import v1 as tfx

from tfx_pipeline.components import AnomalyGate, ItemSemantics, SemanticIds, SemanticTrainer
from tfx_pipeline.data import EVAL, SPLITS, TEST, TRAIN
from tfx_pipeline.serving import EVALUATE, RANK_OUTPUT
from tfx_pipeline.tfma_metrics import TargetRankMetric
from tfx_pipeline.trainer import CONFIG_KEY

PREPROCESSING_FN = "tfx_pipeline.preprocessing.preprocessing_fn"
RUN_FN = "tfx_pipeline.trainer.run_fn"
RESOLVER_ID = "latest_blessed_model_resolver"


def trainer_config(config):
    """The Trainer's `custom_config`: what training depends on, nothing else (keeps its cache).

    `dmesr.store_path` is left out: a DMESR model reads the ItemSemantics store
    wired into the Trainer (`run_fn` sets the path), whatever the file says.
    """
    experiment = config.experiment.to_dict()
    experiment["dmesr"]["store_path"] = None
    options = {"train_steps": config.pipeline.train_steps, "top_k": config.pipeline.top_k}
    return {CONFIG_KEY: {**experiment, "pipeline": options}}


def eval_config(config):
    """TFMA config: rank-based metrics at every K of `eval.ks`, thresholds on `pipeline.gate_metric`."""
    opts = config.pipeline
    gate, _, gate_k = opts.gate_metric.partition("@")
    metrics = []
    for k in config.experiment.eval.ks:
        for metric in ("ndcg", "hr", "mrr"):
            threshold = None
            if (metric, int(k)) == (gate, int(gate_k)):
                threshold = tfma.MetricThreshold(
                    value_threshold=tfma.GenericValueThreshold(lower_bound={"value": opts.min_value}),
                    change_threshold=tfma.GenericChangeThreshold(
                        direction=tfma.MetricDirection.HIGHER_IS_BETTER,
                        absolute={"value": -opts.max_drop - 1e-10},
                    ),
                )
            metrics.append(
                tfma.MetricConfig(
                    class_name=TargetRankMetric.__name__,
                    module=TargetRankMetric.__module__,
                    config=json.dumps({"metric": metric, "k": int(k)}),
                    threshold=threshold,
                )
            )
    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(signature_name=EVALUATE)],
        slicing_specs=[tfma.SlicingSpec()],
        metrics_specs=[tfma.MetricsSpec(output_names=[RANK_OUTPUT], metrics=metrics)],
    )


def create_pipeline(config, local=True):
    """The pipeline for a `tfx_pipeline.config.PipelineConfig` (see the module doc).

    Args:
        config: the `PipelineConfig`.
        local: connect the SQLite ML Metadata store at `config.metadata_path`
            (False when compiling for Kubeflow/Vertex, whose metadata is managed).

    Returns:
        `tfx.dsl.Pipeline`.
    """
    opts = config.pipeline
    example_gen = tfx.components.ImportExampleGen(
        input_base=config.input_dir,
        input_config=tfx.proto.Input(splits=[tfx.proto.Input.Split(name=s, pattern=f"{s}/*") for s in SPLITS]),
    )
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.SchemaGen(statistics=statistics_gen.outputs["statistics"], infer_feature_shape=False)
    components = [example_gen, statistics_gen, schema_gen]
    schema = schema_gen.outputs["schema"]
    if config.schema_path:
        curated = tfx.components.ImportSchemaGen(schema_file=config.schema_path).with_id("CuratedSchemaGen")
        components.append(curated)
        schema = curated.outputs["schema"]
    example_validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema
    )
    gate = AnomalyGate(anomalies=example_validator.outputs["anomalies"])
    transform = tfx.components.Transform(
        examples=example_gen.outputs["examples"],
        schema=schema,
        preprocessing_fn=PREPROCESSING_FN,
        splits_config=tfx.proto.SplitsConfig(analyze=[TRAIN], transform=list(SPLITS)),
        disable_statistics=True,  # the raw data is validated above; saves a Beam pass per split
    )
    transform.add_upstream_node(gate)
    components += [example_validator, gate, transform]

    semantic_store = None
    if opts.item_semantics:
        semantics = ItemSemantics(
            transform_graph=transform.outputs["transform_graph"],
            dataset="" if opts.items_path or config.experiment.data.interactions_path else config.experiment.data.dataset,
            items_path=opts.items_path,
            max_tokens=config.experiment.dmesr.max_tokens,
        )
        components.append(semantics)
        if opts.semantic_ids:
            components.append(SemanticIds(semantic_store=semantics.outputs["semantic_store"]))
        if config.uses_semantic_store:
            semantic_store = semantics.outputs["semantic_store"]

    trainer = SemanticTrainer(  # the stock Trainer, plus the semantic store a DMESR model reads
        run_fn=RUN_FN,
        examples=transform.outputs["transformed_examples"],
        transform_graph=transform.outputs["transform_graph"],
        train_args=tfx.proto.TrainArgs(splits=[TRAIN], num_steps=opts.train_steps),
        eval_args=tfx.proto.EvalArgs(splits=[EVAL]),
        custom_config=trainer_config(config),
        semantic_store=semantic_store,
    )
    resolver = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
    ).with_id(RESOLVER_ID)
    evaluator = tfx.components.Evaluator(
        examples=example_gen.outputs["examples"],
        model=trainer.outputs["model"],
        baseline_model=resolver.outputs["model"],
        eval_config=eval_config(config),
        example_splits=[TEST],
    )
    pusher = tfx.components.Pusher(
        model=trainer.outputs["model"],
        model_blessing=evaluator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=config.serving_dir)
        ),
    )
    components += [trainer, resolver, evaluator, pusher]
    return tfx.dsl.Pipeline(
        pipeline_name=config.pipeline_name,
        pipeline_root=config.pipeline_root,
        components=components,
        enable_cache=opts.enable_cache,
        metadata_connection_config=(
            tfx.orchestration.metadata.sqlite_metadata_connection_config(config.metadata_path) if local else None
        ),
        beam_pipeline_args=list(opts.beam_pipeline_args),
    )
