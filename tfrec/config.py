"""Experiment configuration: dataclasses that load from YAML with CLI overrides.

A config file mirrors `ExperimentConfig`:

    name: sasrec-beauty
    data: {dataset: amazon-beauty}
    model: {backbone: sasrec, embedding_dim: 64, dropout: 0.5}
    train: {batch_size: 128, learning_rate: 0.001, epochs: 200, patience: 10}
    eval: {protocols: [full, sampled100]}

Overrides use dotted keys with YAML values: `train.epochs=3`, `model.backbone=gru4rec`,
`eval.ks=[5,10]`. Unknown keys are errors that name the key and the valid ones.
"""

import dataclasses
import json
from pathlib import Path
from typing import Optional

import yaml


@dataclasses.dataclass
class DataConfig:
    """Where interactions come from and how they are filtered and split.

    `dataset` is a bundled dataset name (see `tfrec.data.readers.DATASETS`);
    `interactions_path` (TSV/CSV/Parquet with user_id, item_id, timestamp)
    replaces it for user data.
    """

    dataset: str = "amazon-beauty"
    interactions_path: Optional[str] = None
    data_root: Optional[str] = None
    user_core: int = 0
    item_core: int = 0
    min_length: int = 3


@dataclasses.dataclass
class ModelConfig:
    """Backbone, item encoder and loss.

    `backbone` in {sasrec, bert4rec, gru4rec}; `item_encoder` in {id, dmesr}:
    `id` is a plain ID embedding table, `dmesr` the DMESR multimodal encoder
    configured by the `dmesr:` section (its `store_path` names the semantic
    store written by `tfrec encode`).
    """

    backbone: str = "sasrec"
    item_encoder: str = "id"
    embedding_dim: int = 64
    max_length: int = 50
    num_layers: int = 2
    num_heads: int = 2
    ffn_dim: Optional[int] = None
    normalize_first: bool = False
    dropout: float = 0.5
    gru_hidden_dim: int = 64
    gru_input_norm: bool = False  # LayerNorm on GRU4Rec inputs (GRU4RecBackbone(input_norm=...))
    loss: str = "softmax"
    num_negatives: int = 1024
    sampling: str = "uniform"
    temperature: float = 1.0
    loss_reduction: str = "targets"  # "targets" | "rows" (NextItemRecommender(loss_reduction=...))
    label_smoothing: float = 0.0  # ours; softmax loss only (NextItemRecommender(label_smoothing=...))
    mask_prob: float = 0.2


DISTRIBUTIONS = ("none", "mirrored", "multi_worker")


@dataclasses.dataclass
class EngineConfig:
    """What every training run shares (`tfrec.training.engine.fit`): the `train:` keys
    common to `TrainConfig` (next-item) and `CTRTrainConfig` (CTR).

    - `batch_size`, `learning_rate`, `weight_decay` (AdamW when > 0), `clipnorm`:
      the optimiser (`tfrec.training.build_optimizer`).
    - `epochs`, `patience`, `monitor`: early stopping on the validation metric
      `monitor` (higher is better); the best epoch's weights are restored.
    - `max_train_seconds`: wall-time budget of training plus validation, checked
      after every batch (null = none).
    - `seed`: `keras.utils.set_random_seed`, data order and masks; `deterministic_ops`
      also turns on `tf.config.experimental.enable_op_determinism` (slower).
    - `distribution`: `none` | `mirrored` (all local devices) | `multi_worker`
      (`MultiWorkerMirroredStrategy`, cluster from `TF_CONFIG`).
    - `resume`: continue from the checkpoint in `backup_dir` (null = `<run_dir>/backup`);
      one is written after every epoch (weights, optimiser, early-stopping state).
    - `tensorboard_dir`: TensorBoard logs (null = `<run_dir>/logs`, "" = none).
    - `steps_per_execution`, `jit_compile`: passed to `model.compile` (speed).
    - `ema_momentum` (ours; null = off): validate, keep and return an exponential
      moving average of the weights (`tfrec.training.engine.WeightAverage`), e.g. 0.998.
    - `lr_decay_factor` (ours; null = off), `lr_decay_patience`, `min_learning_rate`: the
      learning rate times the factor after every `lr_decay_patience` epochs without a new
      best validation metric (`tfrec.training.engine.PlateauDecay`), never below the minimum.
    """

    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    clipnorm: Optional[float] = None
    epochs: int = 200
    patience: int = 10
    monitor: str = "ndcg@10"
    seed: int = 42
    max_train_seconds: Optional[float] = None
    deterministic_ops: bool = False
    distribution: str = "none"
    resume: bool = False
    backup_dir: Optional[str] = None
    tensorboard_dir: Optional[str] = None
    steps_per_execution: int = 1
    jit_compile: bool = False
    ema_momentum: Optional[float] = None
    lr_decay_factor: Optional[float] = None
    lr_decay_patience: int = 2
    min_learning_rate: float = 0.0

    def check(self, where="train."):
        """Value checks naming the offending key."""
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"config key {where}distribution must be one of {', '.join(DISTRIBUTIONS)}; "
                             f"got {self.distribution!r}")
        for key in ("batch_size", "epochs", "patience", "steps_per_execution"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {where}{key} must be >= 1, got {getattr(self, key)!r}")
        if self.max_train_seconds is not None and self.max_train_seconds <= 0:
            raise ValueError(f"config key {where}max_train_seconds must be > 0, got {self.max_train_seconds!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"config key {where}learning_rate must be > 0, got {self.learning_rate!r}")
        if self.ema_momentum is not None and not 0.0 < self.ema_momentum < 1.0:
            raise ValueError(f"config key {where}ema_momentum must be in (0, 1) or null, got {self.ema_momentum!r}")
        if self.lr_decay_factor is not None and not 0.0 < self.lr_decay_factor < 1.0:
            raise ValueError(f"config key {where}lr_decay_factor must be in (0, 1) or null, "
                             f"got {self.lr_decay_factor!r}")
        if self.lr_decay_patience < 1:
            raise ValueError(f"config key {where}lr_decay_patience must be >= 1, got {self.lr_decay_patience!r}")
        if not 0.0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError(f"config key {where}min_learning_rate must be in [0, learning_rate], "
                             f"got {self.min_learning_rate!r}")
        return self


@dataclasses.dataclass
class TrainConfig(EngineConfig):
    """Next-item training: the engine keys (`EngineConfig`) plus the data pipeline's
    `bucket_batches` (batches per length-sorted group, 1 = none), `shuffle_batches`
    (`epoch`: all of an epoch's batches shuffled; `group`: within two groups), `pack`
    (several sequences per row of `max_length` slots, `batch_size` then counts rows) and `scheme`
    (`positions`: every position of a sequence at once; `prefixes`: one row per target)."""

    bucket_batches: int = 32
    shuffle_batches: str = "epoch"
    pack: bool = False
    scheme: str = "positions"


@dataclasses.dataclass
class EvalConfig:
    """Evaluation protocols. History items are NOT excluded by default (as RecBole)."""

    ks: tuple = (5, 10, 20)
    protocols: tuple = ("full", "sampled100")
    num_negatives: int = 100
    negative_sampling: str = "uniform"
    exclude_history: bool = False
    batch_size: int = 1024
    seed: int = 2024


DMESR_VARIANTS = {
    "dmesr": {},
    "dmesr-no-align": {"align": False},
    "dmesr-no-fusion": {"fuse": False},
    "dmesr-no-text-tokens": {"use_tokens": False},
    "dmesr-no-generated-view": {"use_generated_view": False},
    "dmesr-no-semantic-init": {"semantic_init": False},
}


@dataclasses.dataclass
class DMESRConfig:
    """Every DMESR option (YAML section `dmesr:`), passed as is to `DMESRItemEncoder`;
    defaults and their origins (paper / ours) are tabled in `tfrec.semantics.dmesr`.
    Used when `model.item_encoder=dmesr`. `encoder`: `"fast"` (a catalogue pass of a
    few matmuls) or `"full"` (the Phase A encoder)."""

    store_path: Optional[str] = None
    encoder: str = "fast"
    views: tuple = ()
    token_view: str = "title"
    generated_view: str = "generated"
    use_generated_view: bool = True
    use_attributes: bool = True
    use_tokens: bool = True
    max_tokens: int = 32
    token_clusters: int = 4
    token_pca_dim: Optional[int] = 64
    view_pca_dim: Optional[int] = None
    adapter_init_scale: float = 0.02
    align: bool = True
    alignment_weight: float = 0.1
    temperature: float = 0.1
    learnable_temperature: bool = False
    align_anchor: str = "generated"
    align_pairs: tuple = ()
    exclude_duplicates: bool = True
    align_max_items: int = 512
    projection_dim: Optional[int] = None
    head_layers: int = 0
    fuse: bool = True
    fuse_token_view_pooled: bool = False
    fusion_heads: Optional[int] = None
    fusion_key_dim: Optional[int] = None
    fusion_dropout: float = 0.0
    combine: str = "gate"
    dropout: float = 0.1
    semantic_init: bool = True
    semantic_init_view: str = ""

    @classmethod
    def variant(cls, name, **overrides):
        """The config of a benchmark variant (`DMESR_VARIANTS`), plus overrides."""
        if name not in DMESR_VARIANTS:
            raise ValueError(f"unknown DMESR variant {name!r}; choose one of {sorted(DMESR_VARIANTS)}")
        return cls(**{**DMESR_VARIANTS[name], **overrides})


class RunConfig:
    """What every top-level run config (dataclass with `name`, `output_dir`) offers."""

    @property
    def run_dir(self):
        return Path(self.output_dir) / self.name

    def to_dict(self):
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass
class ExperimentConfig(RunConfig):
    name: str = "experiment"
    output_dir: str = "runs"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    dmesr: DMESRConfig = dataclasses.field(default_factory=DMESRConfig)


def _coerce(value, default, field_type, key):
    """`value` converted to the type of the field (named `key` in errors)."""
    optional = "Optional" in str(field_type)
    if value is None and optional:
        return None
    type_name = str(field_type)
    if "float" in type_name:
        kind = float
    elif default is not None:
        kind = type(default)
    elif "tuple" in type_name:  # Optional[tuple] defaulting to None
        kind = tuple
    else:
        kind = int if "int" in type_name else str
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, (int, str)) or int(value) != float(value):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError
            return float(value)
        if kind is tuple:
            return tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {key} expects {kind.__name__}, got {value!r}") from None
    return value


def _resolve_aliases(cls, values, where):
    """`values` with a dataclass's older key names (`cls.KEY_ALIASES`: old -> new) renamed."""
    aliases = getattr(cls, "KEY_ALIASES", {})
    if not any(old in values for old in aliases):
        return values
    values = dict(values)
    for old, new in aliases.items():
        if old in values:
            if new in values:
                raise ValueError(f"config keys {where}{old} and {where}{new} name the same setting "
                                 f"({old} is the older name of {new}); keep only {where}{new}")
            values[new] = values.pop(old)
    return values


def _build(cls, values, where, defaults=None):
    if not isinstance(values, dict):
        raise ValueError(f"config section {where.rstrip('.') or '<root>'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = _resolve_aliases(cls, values, where)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        aliases = getattr(cls, "KEY_ALIASES", {})
        also = f" (older names: {', '.join(f'{old} = {new}' for old, new in aliases.items())})" if aliases else ""
        raise ValueError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; valid: {', '.join(sorted(fields))}{also}"
        )
    kwargs = {}
    defaults = cls() if defaults is None else defaults  # a section's defaults are those of its parent's field
    for key, value in values.items():
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value, f"{where}{key}.", default)
        else:
            kwargs[key] = _coerce(value, default, fields[key].type, where + key)
    return dataclasses.replace(defaults, **kwargs)


def _apply_override(values, override):
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like section.key=value")
    key, raw = override.split("=", 1)
    node = values
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config_values(path=None, overrides=()):
    """The raw mapping of a YAML config file (or `{}`) with dotted overrides applied.

    The one YAML reader for every config kind (`load_config`, the TFX pipeline's
    config); build typed dataclasses from it with `build_config`.
    """
    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a config file must hold a mapping, got {type(values).__name__}")
    for override in overrides:
        _apply_override(values, override)
    return values


def build_config(cls, values, where=""):
    """A config dataclass `cls` from a mapping, typed and checked (unknown keys are errors).

    `where` prefixes key names in error messages (e.g. `"pipeline."`).
    """
    return _build(cls, values, where)


def load_config(path=None, overrides=()):
    """Load an `ExperimentConfig` from a YAML file (or defaults) plus overrides.

    Example:
    >>> cfg = load_config(None, ["train.epochs=3", "model.backbone=gru4rec"])
    >>> cfg.train.epochs, cfg.model.backbone
    (3, 'gru4rec')
    """
    return build_config(ExperimentConfig, load_config_values(path, overrides))


def describe_keys(cls, where="", defaults=None):
    """Every config key of dataclass `cls` with its default, one per line (for `--help`).

    Generated from the dataclasses, so it lists exactly what `build_config` accepts
    (older key names a section still reads are listed after it).

    >>> print(describe_keys(EvalConfig).splitlines()[0])
      ks = [5, 10, 20]
    """
    lines = []
    defaults = cls() if defaults is None else defaults
    for field in dataclasses.fields(cls):
        default = getattr(defaults, field.name)
        if dataclasses.is_dataclass(default):
            lines.append(f"{where}{field.name}:  ({type(default).__name__})")
            lines.append(describe_keys(type(default), where + field.name + ".", default))
        else:
            value = list(default) if isinstance(default, tuple) else default
            lines.append(f"  {where}{field.name} = {json.dumps(value)}")
    aliases = getattr(cls, "KEY_ALIASES", {})
    if aliases:
        names = ", ".join(f"{where}{old} = {where}{new}" for old, new in aliases.items())
        lines.append(f"  older key names read: {names}")
    return "\n".join(lines)
