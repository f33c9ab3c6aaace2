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
         NDCG/HR/MRR@K, or AUC/LogLoss for `task: ctr`; value threshold +
         change threshold vs the baseline)
      -> Pusher (`<serving_dir>/<unix time version>/`, what a model server watches)

`task: ctr` (R2LED / CTR baselines) uses the same DAG: CTR samples in
ExampleGen, the CTR curated schema, the same Transform, ItemSemantics ->
SemanticIds feeding the Trainer (R2LED reads the store and the codes), and a
binary-classification Evaluator on `label` (`ctr_eval_config`).

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

from tfx_pipeline.components import (
    ITEM_SEMANTICS_ID,
    AnomalyGate,
    ItemSemanticsGen,
    SemanticIds,
    SemanticTrainer,
    sids_config_parameter,
)
from tfx_pipeline.config import CTR
from tfx_pipeline.data import EVAL, HISTORY_BUCKET, LABEL, SPLITS, TEST, TRAIN
from tfx_pipeline.serving import EVALUATE, RANK_OUTPUT
from tfx_pipeline.tfma_metrics import TargetRankMetric
from tfx_pipeline.trainer import CONFIG_KEY, TASK_KEY

PREPROCESSING_FN = "tfx_pipeline.preprocessing.preprocessing_fn"
RUN_FN = "tfx_pipeline.trainer.run_fn"
RESOLVER_ID = "latest_blessed_model_resolver"
CTR_SIGNATURE, CTR_OUTPUT = "score_examples", "probabilities"  # tfrec.serving.servables.CTRServable


def trainer_config(config):
    """The Trainer's `custom_config`: what training depends on, nothing else (keeps its cache).

    `dmesr.store_path` (`sids.store_path` for CTR) is left out: the model reads
    the ItemSemantics store wired into the Trainer, whatever the file says.
    """
    experiment = config.experiment.to_dict()
    options = {"train_steps": config.pipeline.train_steps, "top_k": config.pipeline.top_k}
    if config.is_ctr:
        experiment["sids"]["store_path"] = ""  # a str field: "" = not used
        return {CONFIG_KEY: {TASK_KEY: CTR, **experiment, "pipeline": options}}
    experiment["dmesr"]["store_path"] = None
    return {CONFIG_KEY: {**experiment, "pipeline": options}}


def _gate_threshold(opts):
    """Value threshold (`min_value`) and change threshold (`max_drop`) of a higher-is-better metric."""
    return tfma.MetricThreshold(
        value_threshold=tfma.GenericValueThreshold(lower_bound={"value": opts.min_value}),
        change_threshold=tfma.GenericChangeThreshold(
            direction=tfma.MetricDirection.HIGHER_IS_BETTER,
            absolute={"value": -opts.max_drop - 1e-10},
        ),
    )


def ctr_eval_config(config):
    """TFMA config of the CTR task: binary classification of `label` by the `score_examples` probabilities.

    Metrics: `auc` (gated on the overall slice: `pipeline.min_value`, `pipeline.max_drop`), `logloss`
    (binary cross-entropy), `example_count`, `mean_label`, `mean_prediction`;
    overall and per `history_bucket` slice.
    """
    opts = config.pipeline
    # The gate applies to the overall slice only (a `threshold` would apply to every history_bucket slice too).
    overall = tfma.PerSliceMetricThreshold(slicing_specs=[tfma.SlicingSpec()], threshold=_gate_threshold(opts))
    metrics = [
        tfma.MetricConfig(class_name="AUC", per_slice_thresholds=[overall] if opts.gate_metric == "auc" else []),
        tfma.MetricConfig(class_name="BinaryCrossEntropy", config=json.dumps({"name": "logloss"})),
        tfma.MetricConfig(class_name="ExampleCount"),
        tfma.MetricConfig(class_name="MeanLabel"),
        tfma.MetricConfig(class_name="MeanPrediction"),
    ]
    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(signature_name=CTR_SIGNATURE, label_key=LABEL)],
        slicing_specs=[tfma.SlicingSpec(), tfma.SlicingSpec(feature_keys=[HISTORY_BUCKET])],
        metrics_specs=[tfma.MetricsSpec(metrics=metrics)],
    )


def eval_config(config):
    """TFMA config: rank-based metrics at every K of `eval.ks`, thresholds on `pipeline.gate_metric`."""
    opts = config.pipeline
    gate, _, gate_k = opts.gate_metric.partition("@")
    metrics = []
    for k in config.experiment.eval.ks:
        for metric in ("ndcg", "hr", "mrr"):
            threshold = None
            if (metric, int(k)) == (gate, int(gate_k)):
                threshold = _gate_threshold(opts)
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


def _item_semantics_args(config):
    """ItemSemantics parameters: the item table of the dataset (or `pipeline.items_path`).

    CTR: the text `tfrec ctr encode` encodes (the dataset's item table, default
    `max_tokens`); next-item: `dmesr.max_tokens`.
    """
    opts, data = config.pipeline, config.experiment.data
    if config.is_ctr:
        return {"dataset": "" if opts.items_path else data.dataset, "items_path": opts.items_path,
                "data_root": data.data_root or ""}
    return {"dataset": "" if opts.items_path or data.interactions_path else data.dataset,
            "items_path": opts.items_path, "max_tokens": config.experiment.dmesr.max_tokens}


def _semantic_ids_args(config):
    """SemanticIds parameters: the CTR `sids:` section (as `tfrec ctr train` fits them), else the defaults."""
    if not config.is_ctr:
        return {}
    return {"config": sids_config_parameter(config.experiment.sids)}


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

    semantic_store = semantic_ids = None
    if opts.item_semantics:
        semantics = ItemSemanticsGen(
            transform_graph=transform.outputs["transform_graph"], **_item_semantics_args(config)
        ).with_id(ITEM_SEMANTICS_ID)
        components.append(semantics)
        if opts.semantic_ids:
            sids = SemanticIds(semantic_store=semantics.outputs["semantic_store"], **_semantic_ids_args(config))
            components.append(sids)
            if config.uses_semantic_ids:
                semantic_ids = sids.outputs["semantic_ids"]
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
        semantic_ids=semantic_ids,
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
        eval_config=ctr_eval_config(config) if config.is_ctr else eval_config(config),
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
