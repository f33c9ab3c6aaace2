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

`task: ctr` (top-level key; default `sequential`) selects the lifelong CTR task:
the experiment part is then a `tfrec.ctr.CTRConfig` (`name`,
`output_dir`, `data`, `model`, `sids`, `train`, as `configs/r2led_ml1m.yaml`) and
the pipeline trains R2LED or a CTR baseline (`model.name`); see
`tfx_pipeline/README.md`, "R2LED in the pipeline".

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
CTR_SCHEMA = Path(__file__).resolve().parent / "schema" / "ctr_schema.pbtxt"
SCHEMA_INFER = "infer"
RUNNERS = ("local", "vertex")
SEQUENTIAL, CTR = "sequential", "ctr"
TASKS = (SEQUENTIAL, CTR)
CTR_GATE_METRICS = ("auc",)
DEFAULT_GATE_METRIC = {SEQUENTIAL: "ndcg@10", CTR: "auc"}


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
            with K in `eval.ks`; `auc` for `task: ctr`. Empty: the task's default
            (`ndcg@10`, `auc`).
        min_value: value threshold: the candidate's `gate_metric` must be >= this.
        max_drop: change threshold: the candidate may be at most this much (absolute)
            below the last blessed model (0 = must not be worse).
        item_semantics: add the ItemSemantics component (item text -> semantic store);
            required by `model.item_encoder: dmesr`, whose Trainer reads that store,
            and by the CTR models reading item semantics (R2LED, sim-soft).
        semantic_ids: add the SemanticIds component (RQ codes; needs item_semantics);
            required by R2LED (`task: ctr`), whose Trainer reads the codes.
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
    gate_metric: str = ""
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
    """An experiment plus its pipeline options, with the derived paths.

    `experiment` is an `ExperimentConfig` (next-item task) or, with `task: ctr`,
    a `tfrec.ctr.CTRConfig`.
    """

    experiment: object
    pipeline: PipelineOptions

    @property
    def task(self):
        from tfrec.ctr import CTRConfig

        return CTR if isinstance(self.experiment, CTRConfig) else SEQUENTIAL

    @property
    def is_ctr(self):
        return self.task == CTR

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
    def ctr_semantics(self):
        """What a CTR model reads from item semantics: `"sids"` (R2LED), `"pooled"` (sim-soft) or None."""
        from tfrec.ctr import needs_semantics

        return needs_semantics(self.experiment.model.name) if self.is_ctr else None

    @property
    def uses_semantic_store(self):
        """The Trainer reads the ItemSemantics store (`model.item_encoder: dmesr`, R2LED, sim-soft)."""
        if self.is_ctr:
            return self.ctr_semantics is not None
        return self.experiment.model.item_encoder == "dmesr"

    @property
    def uses_semantic_ids(self):
        """The Trainer reads the SemanticIds codes (R2LED and its variants)."""
        return self.ctr_semantics == "sids"

    @property
    def schema_path(self):
        """The curated schema file, or None when the schema is inferred."""
        if self.pipeline.schema == SCHEMA_INFER:
            return None
        return _absolute(self.pipeline.schema or (CTR_SCHEMA if self.is_ctr else CURATED_SCHEMA))

    def to_dict(self):
        task = {"task": CTR} if self.is_ctr else {}
        return {**task, **self.experiment.to_dict(), "pipeline": dataclasses.asdict(self.pipeline)}


def _check_ctr(config):
    """What the CTR task needs beyond `check_ctr_config` (which has run)."""
    opts, experiment = config.pipeline, config.experiment
    if opts.gate_metric not in CTR_GATE_METRICS:
        raise ValueError(f"pipeline.gate_metric {opts.gate_metric!r} must be one of {list(CTR_GATE_METRICS)} "
                         f"for task: ctr")
    if experiment.data.vocabulary != "train":
        raise ValueError("data.vocabulary must be train for task: ctr: the pipeline's item vocabulary is the "
                         "Transform vocabulary, analysed on the train split")
    if experiment.data.min_history < 1:
        raise ValueError(f"data.min_history must be >= 1 for task: ctr (every example carries a history), "
                         f"got {experiment.data.min_history}")
    name = experiment.model.name
    if config.ctr_semantics and not opts.item_semantics:
        raise ValueError(
            f"model.name: {name} needs pipeline.item_semantics: true: it reads the item semantics the "
            f"ItemSemantics component writes (sids.store_path is not used in the pipeline)"
        )
    if config.uses_semantic_ids and not opts.semantic_ids:
        raise ValueError(
            f"model.name: {name} needs pipeline.semantic_ids: true: R2LED routes over the semantic IDs the "
            f"SemanticIds component fits (sids.num_levels, sids.codebook_size)"
        )


def _check(config):
    opts = config.pipeline
    if config.is_ctr:
        _check_ctr(config)
    else:
        ks = config.experiment.eval.ks
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
    if not config.is_ctr and config.uses_semantic_store and not opts.item_semantics:
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


def ctr_experiment_from_dict(values):
    """A checked `tfrec.ctr.CTRConfig` from a dict shaped like its YAML file."""
    from tfrec.ctr.config import ctr_config_from_dict

    return ctr_config_from_dict(values)


def config_from_dict(values):
    """A `PipelineConfig` from a dict shaped like the YAML file (`task:` selects the experiment kind)."""
    if not isinstance(values, dict):
        raise ValueError(f"a pipeline config must be a mapping, got {values!r}")
    values = dict(values)
    pipeline = values.pop("pipeline", None) or {}
    task = values.pop("task", SEQUENTIAL)
    if task not in TASKS:
        raise ValueError(f"config key task must be one of {', '.join(TASKS)}, got {task!r}")
    experiment = ctr_experiment_from_dict(values) if task == CTR else experiment_from_dict(values)
    options = build_config(PipelineOptions, pipeline, "pipeline.")
    if not options.gate_metric:
        options = dataclasses.replace(options, gate_metric=DEFAULT_GATE_METRIC[task])
    return _check(PipelineConfig(experiment, options))


def load_pipeline_config(path=None, overrides=()):
    """Load a `PipelineConfig` from YAML (or defaults) plus dotted overrides.

    Example:
    >>> cfg = load_pipeline_config(None, ["data.dataset=movielens-100k", "pipeline.train_steps=1"])
    >>> cfg.experiment.data.dataset, cfg.pipeline.train_steps
    ('movielens-100k', 1)
    """
    return config_from_dict(load_config_values(path, overrides))
