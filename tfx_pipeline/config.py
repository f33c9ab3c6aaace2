"""Pipeline configuration: an `ExperimentConfig` plus a `pipeline:` section.

A pipeline config file is an experiment config (`tfrec.config.ExperimentConfig`:
`name`, `output_dir`, `data`, `model`, `train`, `eval`) with one more section:

    name: sasrec-ml100k
    data: {dataset: movielens-100k}
    model: {backbone: sasrec, embedding_dim: 32}
    train: {epochs: 3}
    pipeline:
      root: runs/pipelines          # <root>/<name>/ holds everything of this pipeline
      min_value: 0.02               # NDCG@10 floor of the Evaluator
      beam_pipeline_args: [--direct_running_mode=in_memory, --direct_num_workers=1]

Overrides use the same dotted keys for both parts: `train.epochs=1`,
`pipeline.train_steps=1`. Unknown keys are errors naming the key.

Paths derived from the config (all under `pipeline_root = <root>/<name>` unless
set explicitly): the ExampleGen input `input/`, the ML Metadata store
`metadata.sqlite`, the Pusher's destination `serving/<model_name>/<version>/`.
"""

import dataclasses
import os
from pathlib import Path
from typing import Optional

from tfrec.config import ExperimentConfig, build_config, load_config_values

CURATED_SCHEMA = Path(__file__).resolve().parent / "schema" / "schema.pbtxt"
SCHEMA_INFER = "infer"
RUNNERS = ("local", "vertex")


@dataclasses.dataclass
class PipelineOptions:
    """The `pipeline:` section (empty strings mean "use the default").

    Attributes:
        root: folder holding one sub-folder per pipeline (`<root>/<name>/`).
        pipeline_name: defaults to the experiment `name`.
        model_name: served model name (`serving/<model_name>/`); defaults to `name`.
        input_dir: ExampleGen input (`train/`, `eval/`, `test/` TFRecords); default
            `<pipeline_root>/input`, written from `data` by `tfrec pipeline run`.
        metadata_path: SQLite ML Metadata store; default `<pipeline_root>/metadata.sqlite`.
        serving_dir: Pusher base directory; default `<pipeline_root>/serving/<model_name>`.
        schema: path of the curated schema (ImportSchemaGen; default: the one kept in
            `tfx_pipeline/schema/schema.pbtxt`) or `"infer"` to validate against the
            schema SchemaGen infers from the statistics (exploration only: an inferred
            schema accepts whatever the data holds).
        enable_cache: reuse executions with unchanged inputs (ML Metadata).
        beam_pipeline_args: Beam options of StatisticsGen, Transform, Evaluator, ...
        train_steps: if set, the Trainer runs exactly this many optimizer steps
            (one epoch of `train_steps` batches) instead of `train.epochs` epochs.
        top_k: items returned by the serving signature.
        gate_metric: metric the Evaluator gates on, `ndcg@K` / `hr@K` / `mrr@K`
            with K in `eval.ks`.
        min_value: value threshold: the candidate's `gate_metric` must be >= this.
        max_drop: change threshold: the candidate may be at most this much (absolute)
            below the last blessed model (0 = must not be worse).
        item_semantics: add the ItemSemantics component (item text -> semantic store);
            required by `model.item_encoder: dmesr`, whose Trainer reads that store.
        semantic_ids: add the SemanticIds component (RQ codes; needs item_semantics).
        items_path: item table for ItemSemantics (default: the dataset's items file).
        runner: `local` (LocalDagRunner) or `vertex` (compile with KubeflowV2DagRunner).
        image: container image holding tfrec, for `vertex`.
    """

    root: str = "runs/pipelines"
    pipeline_name: str = ""
    model_name: str = ""
    input_dir: str = ""
    metadata_path: str = ""
    serving_dir: str = ""
    schema: str = ""
    enable_cache: bool = True
    beam_pipeline_args: tuple = ("--direct_running_mode=in_memory", "--direct_num_workers=1")
    train_steps: Optional[int] = None
    top_k: int = 10
    gate_metric: str = "ndcg@10"
    min_value: float = 0.0
    max_drop: float = 0.0
    item_semantics: bool = False
    semantic_ids: bool = False
    items_path: str = ""
    runner: str = "local"
    image: str = "tfrec:latest"


def _absolute(path):
    """Absolute local path; URLs (`gs://...`) unchanged."""
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)


@dataclasses.dataclass
class PipelineConfig:
    """An experiment plus its pipeline options, with the derived paths."""

    experiment: ExperimentConfig
    pipeline: PipelineOptions

    @property
    def pipeline_name(self):
        return self.pipeline.pipeline_name or self.experiment.name

    @property
    def model_name(self):
        return self.pipeline.model_name or self.experiment.name

    @property
    def pipeline_root(self):
        return _absolute(os.path.join(self.pipeline.root, self.pipeline_name))

    @property
    def input_dir(self):
        return _absolute(self.pipeline.input_dir or os.path.join(self.pipeline_root, "input"))

    @property
    def metadata_path(self):
        return _absolute(self.pipeline.metadata_path or os.path.join(self.pipeline_root, "metadata.sqlite"))

    @property
    def serving_dir(self):
        return _absolute(
            self.pipeline.serving_dir or os.path.join(self.pipeline_root, "serving", self.model_name)
        )

    @property
    def uses_semantic_store(self):
        """The model's item encoder reads the ItemSemantics store (`model.item_encoder: dmesr`)."""
        return self.experiment.model.item_encoder == "dmesr"

    @property
    def schema_path(self):
        """The curated schema file, or None when the schema is inferred."""
        if self.pipeline.schema == SCHEMA_INFER:
            return None
        return _absolute(self.pipeline.schema or CURATED_SCHEMA)

    def to_dict(self):
        return {**self.experiment.to_dict(), "pipeline": dataclasses.asdict(self.pipeline)}


def _check(config):
    opts, ks = config.pipeline, config.experiment.eval.ks
    metric, _, k = opts.gate_metric.partition("@")
    if metric not in ("ndcg", "hr", "mrr") or not k.isdigit() or int(k) not in ks:
        raise ValueError(
            f"pipeline.gate_metric {opts.gate_metric!r} must be ndcg@K, hr@K or mrr@K with K in eval.ks {list(ks)}"
        )
    if opts.runner not in RUNNERS:
        raise ValueError(f"pipeline.runner must be one of {RUNNERS}, got {opts.runner!r}")
    if opts.train_steps is not None and opts.train_steps < 1:
        raise ValueError(f"pipeline.train_steps must be >= 1 (or null), got {opts.train_steps}")
    if opts.top_k < 1:
        raise ValueError(f"pipeline.top_k must be >= 1, got {opts.top_k}")
    if opts.max_drop < 0:
        raise ValueError(f"pipeline.max_drop must be >= 0, got {opts.max_drop}")
    if opts.semantic_ids and not opts.item_semantics:
        raise ValueError("pipeline.semantic_ids needs pipeline.item_semantics: the codes are fitted on item embeddings")
    if config.uses_semantic_store and not opts.item_semantics:
        raise ValueError(
            "model.item_encoder: dmesr needs pipeline.item_semantics: true: the DMESR item encoder reads the "
            "semantic store the ItemSemantics component writes (dmesr.store_path is not used in the pipeline)"
        )
    schema = config.schema_path
    if schema is not None and "://" not in schema and not os.path.isfile(schema):
        raise FileNotFoundError(f"pipeline.schema: schema file not found: {schema}")
    return config


def experiment_from_dict(values):
    """An `ExperimentConfig` from a dict shaped like its YAML file (unknown keys are errors)."""
    return build_config(ExperimentConfig, values)


def config_from_dict(values):
    """A `PipelineConfig` from a dict shaped like the YAML file."""
    if not isinstance(values, dict):
        raise ValueError(f"a pipeline config must be a mapping, got {values!r}")
    values = dict(values)
    pipeline = values.pop("pipeline", None) or {}
    return _check(PipelineConfig(experiment_from_dict(values), build_config(PipelineOptions, pipeline, "pipeline.")))


def load_pipeline_config(path=None, overrides=()):
    """Load a `PipelineConfig` from YAML (or defaults) plus dotted overrides.

    Example:
    >>> cfg = load_pipeline_config(None, ["data.dataset=movielens-100k", "pipeline.train_steps=1"])
    >>> cfg.experiment.data.dataset, cfg.pipeline.train_steps
    ('movielens-100k', 1)
    """
    return config_from_dict(load_config_values(path, overrides))
