"""Training of the lifelong CTR models (R2LED and its baselines): config, item semantics, fit, evaluate.

`train_ctr(config)` is what `tfrec ctr train` runs:

1. lifelong CTR samples (`tfrec.data.lifelong`: rating >= 4 = click, global time
   split, item vocabulary from training events), optionally restricted to a random
   subset of users (`data.max_train_samples`, for quick runs);
2. item semantics (`prepare_item_semantics`): the semantic store whose rows follow
   that item vocabulary (`sids.store_path`; written by `tfrec ctr encode`: MiniLM
   over "Title (Year). Genres: A, B"), semantic IDs fitted on its pooled `view`
   (RQ-KMeans or RQ-VAE, `tfrec.semantics.sids.fit_sids`), and the pooled vectors
   (SIM-soft's frozen semantic table);
3. the model `model.name` names: `r2led` or an ablation of `R2LED_VARIANTS`, or a
   baseline of `CTR_BASELINES` (`din`, `sim-hard`, `sim-soft`, `eta`, `twin`, `full`),
   each with the wide part and feedback-carrying behaviours (`tfrec.models.ctr_wide`);
   or a reference (`popularity`, `logreg`: `fit_reference`, what `tfrec ctr train`
   runs for them: the logistic regression is scikit-learn's, fitted on training samples);
4. `model.fit` with log loss; after every epoch (one pass over the training
   samples, or `train.steps_per_epoch` batches) the validation AUC is computed and
   the best weights kept (the engine `tfrec.training.engine.fit`); training stops
   after `patience` epochs without a new best or once `max_train_seconds` are spent
   (checked after every batch), and the best weights are restored; a checkpoint
   after every epoch lets `train.resume` (`tfrec ctr train --resume`) continue;
5. validation and test AUC, GAUC (by user) and LogLoss (`evaluate_ctr`), next to
   the item-popularity reference (smoothed training click rate of the target);
6. the run directory gets `model.keras`, `item_vocab.txt`, `results.json` and the
   fitted SIDs (`sids/`).

Budget matching (ours): R2LED attends `top_k` behaviours per route; a baseline keeps
`baseline_top_k` behaviours, by default as many as R2LED attends in total
(routes x `top_k`), so both see the same number of behaviours. SIDs are fitted once
per run with `sids.seed` (not the training seed) and without the de-duplication
level by default: R2LED's routes use SID prefixes, an extra "which duplicate" level
would only add a route matching the target itself.

CLI: `tfrec ctr train --config configs/r2led_ml1m.yaml [key=value ...]`,
`tfrec ctr evaluate --config ... [--model run/model.keras]`, `tfrec ctr encode --config ...`,
`tfrec ctr export --config ... --out DIR [--version V] [--model run/model.keras]`
(the ranker SavedModel `<out>/ranker/<v>`, `export.saved_model.export_ctr`, reading
the most recent `model.max_history` items).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from tfrec.config import EngineConfig, RunConfig, build_config, load_config_values
from tfrec.data.preprocess import ITEM_VOCAB_FILE

STORE_COMMAND = "tfrec ctr encode --config CONFIG"
QUANTIZERS = ("rqkmeans", "rqvae")
MONITORS = ("auc", "gauc")
REFERENCES = ("popularity", "logreg")
WIDE_SIDE = ("auto", "required", "none")


# ------------------------------------------------------------------ config
@dataclasses.dataclass
class CTRDataConfig:
    """Lifelong CTR data (`tfrec.data.lifelong.load_lifelong_dataset` arguments).

    `max_train_samples`: keep a random subset of users (fixed by `subsample_seed`)
    whose training samples add up to at most this many; their validation and test
    samples are kept, the others dropped (the item vocabulary is unchanged).
    `click_threshold`: rating >= this is a click, for a dataset without its own
    click convention; None = the dataset's (`movielens-100k`: 4.0).

    Your own data (as `tfrec train`'s `data.interactions_path`; it replaces `dataset`):
    `interactions_path` (user_id, item_id, timestamp, label or rating; TSV/CSV/...),
    optional `items_path` (item text, genres/categories) and `users_path` (categorical
    profile columns); `tfrec.data.lifelong.load_lifelong_files`. `user_fields`: profile
    columns; None = the dataset's (gender, age, occupation) or every column of
    `users_path`; [] = no profile."""

    interactions_path: Optional[str] = None
    items_path: Optional[str] = None
    users_path: Optional[str] = None
    dataset: str = "movielens-1m-subset"
    data_root: Optional[str] = None
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    vocabulary: str = "train"
    min_history: int = 1
    max_train_samples: Optional[int] = None
    subsample_seed: int = 0
    click_threshold: Optional[float] = None
    user_fields: Optional[tuple] = None


@dataclasses.dataclass
class CTRModelConfig:
    """Model name and options. R2LED options as in `tfrec.models.r2led.R2LED`
    (`route_levels: []` = every level); a variant name's overrides win over them.
    `top_k` is R2LED's per-route budget; `baseline_top_k` the baselines' (None =
    routes x `top_k`: the same number of behaviours as R2LED attends).

    `wide*`: the wide part every model gets (`tfrec.models.ctr_wide`; ours, the
    issue's item 2): item bias from the training click prior, user-history
    scalars, and optionally a user-id bias, the user profile and the target's
    genres (`wide_profile` / `wide_genres`: "auto" = when the data has them,
    "required" = a clear error when the data lacks them, "none" = not used). `feedback`: behaviours carry their feedback and time-gap embeddings;
    `split_feedback`: separate interests over clicked / not-clicked behaviours.
    `popularity` and `logreg` are the references (`logreg_c`: inverse L2 strength).
    `wide_user_id` is off by default (ours, measured): a user bias fitted on the
    training samples memorises each user's clicks over the whole training period,
    while the history scalars see only what came before each sample; with it the
    logreg reference scores test AUC 0.776, without it 0.789 (ML-1M subset)."""

    name: str = "r2led"
    embedding_dim: int = 32
    mlp_units: tuple = (64, 32)
    dropout: float = 0.0
    max_history: int = 1024
    top_k: int = 32
    baseline_top_k: Optional[int] = None
    route_levels: tuple = ()
    mix: str = "boost"
    alpha: float = 0.5
    similarity: str = "cosine"
    candidates: Optional[int] = None
    gate: str = "vector"
    route_fusion: str = "attention"
    attention_form: str = "dot"
    num_heads: int = 2
    fuse_table: bool = True
    catalog_scoring: Optional[bool] = None  # R2LED: null = auto (see tfrec.models.r2led.R2LED)
    simhash_bits: int = 32
    wide: bool = True
    wide_user_id: bool = False
    wide_profile: str = "auto"
    wide_genres: str = "auto"
    wide_smoothing: float = 5.0
    feedback: bool = True
    split_feedback: bool = False
    logreg_c: float = 1.0


@dataclasses.dataclass
class CTRSidsConfig:
    """Item semantics: the store (`tfrec ctr encode`) and the SIDs fitted on its `view`.
    `codebook_size`: one size per level, or one for all. Other keys as `SidsConfig`."""

    store_path: str = "artifacts/semantics/movielens-1m-subset"
    view: str = "title"
    quantizer: str = "rqkmeans"
    levels: int = 3
    codebook_size: tuple = (32, 32, 32)
    deduplicate: bool = False
    seed: int = 0
    iterations: int = 20
    epochs: int = 50
    latent_dim: int = 32


@dataclasses.dataclass
class CTRTrainConfig(EngineConfig):
    """The engine keys (`tfrec.config.EngineConfig`: optimiser, early stopping on
    validation `monitor` (`auc` or `gauc`), budget, seed, distribution, resume,
    logs) with CTR defaults, plus `eval_batch_size` and `steps_per_epoch` (an epoch
    of that many batches instead of one pass over the samples)."""

    batch_size: int = 256
    epochs: int = 10
    patience: int = 2
    monitor: str = "auc"
    eval_batch_size: int = 512
    steps_per_epoch: Optional[int] = None


@dataclasses.dataclass
class CTRConfig(RunConfig):
    name: str = "r2led-ml1m"
    output_dir: str = "runs"
    data: CTRDataConfig = dataclasses.field(default_factory=CTRDataConfig)
    model: CTRModelConfig = dataclasses.field(default_factory=CTRModelConfig)
    sids: CTRSidsConfig = dataclasses.field(default_factory=CTRSidsConfig)
    train: CTRTrainConfig = dataclasses.field(default_factory=CTRTrainConfig)


def model_names():
    from tfrec.models.ctr_baselines import CTR_BASELINES
    from tfrec.models.r2led import R2LED_VARIANTS

    return (*R2LED_VARIANTS, *CTR_BASELINES, *REFERENCES)


def check_ctr_config(config: CTRConfig) -> CTRConfig:
    """Value checks that name the offending key (types are checked by `build_config`)."""
    from tfrec.data.lifelong import VOCABULARIES

    choices = {"model.name": (config.model.name, model_names()),
               "sids.quantizer": (config.sids.quantizer, QUANTIZERS),
               "train.monitor": (config.train.monitor, MONITORS),
               "data.vocabulary": (config.data.vocabulary, VOCABULARIES),
               "model.wide_profile": (config.model.wide_profile, WIDE_SIDE),
               "model.wide_genres": (config.model.wide_genres, WIDE_SIDE)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"config key {key} must be one of {', '.join(allowed)}; got {value!r}")
    positive = {"model.max_history": config.model.max_history, "model.top_k": config.model.top_k,
                "model.embedding_dim": config.model.embedding_dim, "sids.levels": config.sids.levels,
                "train.batch_size": config.train.batch_size, "train.eval_batch_size": config.train.eval_batch_size,
                "train.epochs": config.train.epochs, "train.patience": config.train.patience,
                "model.baseline_top_k": config.model.baseline_top_k,
                "train.steps_per_epoch": config.train.steps_per_epoch,
                "data.max_train_samples": config.data.max_train_samples}
    for key, value in positive.items():
        if value is not None and value < 1:
            raise ValueError(f"config key {key} must be >= 1, got {value!r}")
    if len(config.sids.codebook_size) not in (1, config.sids.levels):
        raise ValueError(f"config key sids.codebook_size must have 1 or sids.levels={config.sids.levels} entries, "
                         f"got {list(config.sids.codebook_size)}")
    return config


def load_ctr_config(path=None, overrides=()) -> CTRConfig:
    """A checked `CTRConfig` from a YAML file (or defaults) plus dotted overrides.

    >>> load_ctr_config(None, ["model.name=din", "train.epochs=3"]).model.name
    'din'
    """
    return check_ctr_config(build_config(CTRConfig, load_config_values(path, overrides)))


# -------------------------------------------------------------------- data
def subsample_users(data, max_train_samples: int, seed: int = 0):
    """`data` restricted to random users whose training samples total <= `max_train_samples`
    (at least one user); every split keeps only those users' samples."""
    from tfrec.data.lifelong import LifelongSamples

    counts = np.bincount(data.splits["train"].user, minlength=len(data.users))
    order = np.random.default_rng(seed).permutation(len(data.users))
    within = np.cumsum(counts[order]) <= max_train_samples
    within[0] = True
    keep = np.zeros(len(data.users), bool)
    keep[order[within]] = True
    splits = {}
    for name, samples in data.splits.items():
        rows = keep[samples.user]
        splits[name] = LifelongSamples(**{f.name: getattr(samples, f.name)[rows]
                                          for f in dataclasses.fields(LifelongSamples)})
    metadata = {**data.metadata, "num_samples": {n: int(len(s)) for n, s in splits.items()},
                "subsample": {"max_train_samples": int(max_train_samples), "seed": int(seed),
                              "users_kept": int(keep.sum())}}
    return dataclasses.replace(data, splits=splits, metadata=metadata)


def load_ctr_data(data_config: CTRDataConfig):
    """The `LifelongData` a `CTRDataConfig` names."""
    from tfrec.data.lifelong import load_lifelong_dataset, load_lifelong_files

    dc = data_config
    labels = {} if dc.click_threshold is None else {"click_threshold": float(dc.click_threshold)}
    fields = None if dc.user_fields is None else tuple(dc.user_fields)
    split = dict(valid_fraction=dc.valid_fraction, test_fraction=dc.test_fraction, vocabulary=dc.vocabulary,
                 min_history=dc.min_history)
    if dc.interactions_path:
        data = load_lifelong_files(dc.interactions_path, dc.items_path, dc.users_path, fields, **labels, **split)
    elif dc.items_path or dc.users_path:
        raise ValueError("config keys data.items_path / data.users_path go with data.interactions_path "
                         f"(your own data); the bundled dataset {dc.dataset!r} brings its own side files")
    else:
        data = load_lifelong_dataset(dc.dataset, dc.data_root, user_fields=fields, **split, **labels)
    if dc.max_train_samples is not None:
        data = subsample_users(data, dc.max_train_samples, dc.subsample_seed)
    return data


# --------------------------------------------------------------- semantics
@dataclasses.dataclass
class ItemSemantics:
    """What the CTR models read from item semantics, rows = item ids.

    Attributes:
        pooled: `(V, d)` float32 pooled text vectors of the store view (zeros = none).
        store_path: the store version folder; store_fingerprint: its fingerprint.
        item_sids: `(V, L)` int32 semantic IDs, -1 = none (padding, OOV, no text),
            or None when not fitted.
        codebook_sizes: list of int per SID level (None without SIDs).
        sids: the `SemanticIds`; quantizer: the fitted `ResidualQuantizer` (or None).
    """

    pooled: np.ndarray
    store_path: Path
    store_fingerprint: str
    item_sids: Optional[np.ndarray] = None
    codebook_sizes: Optional[list] = None
    sids: object = None
    quantizer: object = None

    def describe(self) -> dict:
        out = {"store": str(self.store_path), "store_fingerprint": self.store_fingerprint}
        if self.sids is not None:
            meta = self.sids.metadata
            out.update(sids_fingerprint=meta["fingerprint"], mode=meta["mode"], codebook_sizes=self.codebook_sizes,
                       deduplicated=meta["deduplicated"], diagnostics=meta["diagnostics"],
                       fit_seconds=meta["fit_seconds"])
        return out


def load_store_for(store_path, item_vocab):
    """The semantic store under `store_path` whose rows follow `item_vocab`.

    `store_path` is a store folder or a versions root; in a root, `LATEST` is tried
    first, then the newest version built for this vocabulary (one root can hold the
    stores of several vocabularies). Raises `FileNotFoundError` when there is no
    store and `VocabularyMismatchError` when none matches, both naming the command
    that builds it."""
    from tfrec.semantics.store import (
        METADATA_FILE, SemanticStore, VocabularyMismatchError, list_versions, vocabulary_fingerprint)

    root = Path(store_path)
    if not root.exists():
        raise FileNotFoundError(f"semantic store not found: {root}; build it for this data with `{STORE_COMMAND}`")
    try:
        return SemanticStore.load(root, item_vocab=item_vocab)
    except VocabularyMismatchError as err:
        wanted = vocabulary_fingerprint(item_vocab)
        for version in reversed(list_versions(root)):
            try:
                meta = json.loads((version / METADATA_FILE).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("item_vocab", {}).get("fingerprint") == wanted:
                return SemanticStore.load(version, item_vocab=item_vocab)
        raise VocabularyMismatchError(f"{err}. No version under {root} follows this item vocabulary "
                                      f"(size {item_vocab.size}); build one with `{STORE_COMMAND}`") from None


def sids_config(section: CTRSidsConfig):
    """The `tfrec.semantics.sids.SidsConfig` of a `sids:` config section."""
    from tfrec.semantics.sids import SidsConfig

    sizes = list(section.codebook_size) * (section.levels if len(section.codebook_size) == 1 else 1)
    return SidsConfig(mode=section.quantizer, num_levels=section.levels, codebook_size=[int(s) for s in sizes],
                      deduplicate=section.deduplicate, seed=section.seed, iterations=section.iterations,
                      epochs=section.epochs, latent_dim=section.latent_dim)


def prepare_item_semantics(data, store_path, section: Optional[CTRSidsConfig] = None,
                           fit: bool = True) -> ItemSemantics:
    """SIDs and pooled vectors for the item vocabulary of lifelong `data`.

    Args:
        data: `LifelongData`; its `item_vocab` must be the store's vocabulary.
        store_path: semantic store folder or versions root (see `load_store_for`).
        section: a `CTRSidsConfig` (view, quantizer, levels, codebook sizes, seed).
        fit: fit the SIDs (False: pooled vectors only, e.g. for SIM-soft).
    """
    from tfrec.semantics.sids import fit_sids

    section = section or CTRSidsConfig()
    store = load_store_for(store_path, data.item_vocab)
    if not fit:
        return item_semantics_of(store, section.view)
    view = store.view(section.view)
    sids, quantizer = fit_sids(np.asarray(view.pooled, np.float32), store.fingerprint, sids_config(section),
                               mask=np.asarray(view.mask, bool), item_vocab=data.item_vocab,
                               source={"store": str(store.path), "view": section.view})
    return item_semantics_of(store, section.view, sids, quantizer)


def item_semantics_of(store, view: str, sids=None, quantizer=None) -> ItemSemantics:
    """`ItemSemantics` of a loaded `SemanticStore` (pooled `view`) and optional fitted
    `tfrec.semantics.sids.SemanticIds` of that store (e.g. loaded with `load_sids`)."""
    pooled = np.asarray(store.view(view).pooled, np.float32)
    if sids is None:
        return ItemSemantics(pooled, store.path, store.fingerprint)
    if sids.codes.shape[0] != pooled.shape[0]:
        raise ValueError(f"semantic IDs have {sids.codes.shape[0]} rows but the store has {pooled.shape[0]}")
    sizes = list(sids.metadata["codebook_sizes"])
    if sids.metadata["deduplicated"]:
        sizes.append(int(sids.metadata["dedup_level_size"]))
    return ItemSemantics(pooled, store.path, store.fingerprint, sids.codes, sizes, sids, quantizer)


def encode_lifelong_store(data, out_dir, dataset: str = "movielens-1m-subset", data_root=None, items_path=None,
                          **encode_kwargs):
    """Encode "title + genres" of exactly `data.item_vocab` into the store root `out_dir`.

    The vocabulary is written as a prepared-data folder holding `item_vocab.txt`
    (all `tfrec.semantics.encode.encode_items` reads from one) and encoded from the
    dataset's item table, or from `items_path` (your own data); an identical
    existing version is reused."""
    from tfrec.semantics.encode import encode_items

    source = {"items_path": items_path} if items_path else {"dataset": dataset, "data_root": data_root}
    with tempfile.TemporaryDirectory(prefix="tfrec-ctr-vocab-") as folder:
        data.item_vocab.save(Path(folder) / ITEM_VOCAB_FILE)
        return encode_items(folder, out_dir=out_dir, **source, **encode_kwargs)


# ------------------------------------------------------------------- model
def build_ctr_model(config: CTRConfig, data, semantics: Optional[ItemSemantics], seed: int = 0):
    """The model `config.model.name` names, over the item tables of `data` / `semantics`."""
    from tfrec.models.ctr_baselines import CTR_BASELINES, build_ctr_baseline
    from tfrec.models.r2led import R2LED, R2LED_VARIANTS, r2led_variant

    from tfrec.models.ctr_wide import WideCTR

    mc = config.model
    wide = wide_config(config, data)
    if mc.name in REFERENCES:
        return WideCTR(wide or wide_config(config, data, force=True), name=mc.name)
    common = dict(embedding_dim=mc.embedding_dim, mlp_units=tuple(mc.mlp_units), dropout=mc.dropout,
                  wide=wide, feedback=mc.feedback, split_feedback=mc.split_feedback)
    vocab_size = data.item_vocab.size
    if mc.name in R2LED_VARIANTS:
        if semantics is None or semantics.item_sids is None:
            raise ValueError(f"model {mc.name!r} needs item semantic IDs (sids.store_path)")
        levels = semantics.item_sids.shape[1]
        options = dict(route_levels=list(mc.route_levels) or None, top_k=mc.top_k, mix=mc.mix, alpha=mc.alpha,
                       similarity=mc.similarity, candidates=mc.candidates, gate=mc.gate,
                       route_fusion=mc.route_fusion, attention_form=mc.attention_form, num_heads=mc.num_heads,
                       fuse_table=mc.fuse_table, catalog_scoring=mc.catalog_scoring)
        options.update(r2led_variant(mc.name, levels))
        return R2LED(vocab_size, semantics.item_sids, sid_codebook_sizes=semantics.codebook_sizes,
                     **common, **options, name=mc.name.replace("-", "_"))
    if mc.name not in CTR_BASELINES:
        raise ValueError(f"config key model.name must be one of {', '.join(model_names())}; got {mc.name!r}")
    routes = len(mc.route_levels) or config.sids.levels + int(config.sids.deduplicate)  # R2LED's route count
    extra = {}
    if mc.name == "sim-hard":
        if data.item_genres is None:
            raise ValueError("model sim-hard needs item genres: the dataset has no item table")
        extra["item_genres"] = data.item_genres
    if mc.name == "sim-soft":
        if semantics is None:
            raise ValueError("model sim-soft needs the semantic store's pooled vectors (sids.store_path)")
        extra["item_semantic"] = semantics.pooled
    return build_ctr_baseline(mc.name, vocab_size, **common, top_k=mc.baseline_top_k or routes * mc.top_k,
                              num_heads=mc.num_heads, simhash_bits=mc.simhash_bits, seed=seed, **extra)


def wide_config(config: CTRConfig, data, force: bool = False):
    """`WidePart` arguments of `config.model` for `data` (None when `model.wide` is off,
    unless `force`); the popularity reference has the item prior only."""
    from tfrec.models.ctr_wide import wide_options

    mc = config.model
    if not (mc.wide or force):
        return None
    if mc.name == "popularity":
        return wide_options(data, user_id=False, profile=False, genres=False, smoothing=mc.wide_smoothing)
    profile = data.user_profiles is not None if mc.wide_profile == "auto" else mc.wide_profile == "required"
    genres = data.item_genres is not None if mc.wide_genres == "auto" else mc.wide_genres == "required"
    return wide_options(data, user_id=mc.wide_user_id, profile=profile, genres=genres, smoothing=mc.wide_smoothing)


def fit_reference(config: CTRConfig, data=None, save: bool = True):
    """Build and fit a reference model (`popularity`: nothing to fit; `logreg`: the wide
    part as a scikit-learn logistic regression on the training samples) and evaluate it.
    Returns `(results, model, data)` like `train_ctr`."""
    from tfrec.data.lifelong import lifelong_dataset
    from tfrec.models.ctr_wide import fit_logistic_regression

    check_ctr_config(config)
    mc = config.model
    if mc.name not in REFERENCES:
        raise ValueError(f"{mc.name!r} is not a reference model ({', '.join(REFERENCES)})")
    data = data if data is not None else load_ctr_data(config.data)
    model = build_ctr_model(config, data, None)
    start = time.perf_counter()
    if mc.name == "logreg":
        fit_logistic_regression(model, lifelong_dataset(data, "train", batch_size=config.train.eval_batch_size,
                                                        max_history=mc.max_history, bucket=True),
                                c=mc.logreg_c)
    else:
        model(next(iter(lifelong_dataset(data, "train", batch_size=2, max_history=2)))[0])  # build
    train_seconds = time.perf_counter() - start
    results = {
        "config": config.to_dict(), "data": data.metadata, "semantics": None,
        "model": {"class": type(model).__name__, "parameters": int(model.count_params())},
        "splits": evaluate_ctr_splits(config, model, data),
        "reference": {"popularity": {s: popularity_metrics(data, s) for s in evaluated_splits(data)}},
        "epochs": 1 if mc.name == "logreg" else 0, "best_epoch": None, "train_seconds": train_seconds,
    }
    if save:
        run_dir = config.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        model.save(run_dir / "model.keras")
        data.item_vocab.save(run_dir / ITEM_VOCAB_FILE)
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results, model, data


def needs_semantics(name: str):
    """What model `name` reads from the store: "sids", "pooled" or None."""
    from tfrec.models.r2led import R2LED_VARIANTS

    return "sids" if name in R2LED_VARIANTS else "pooled" if name == "sim-soft" else None


# -------------------------------------------------------------- evaluation
class CTREvaluator:
    """`evaluate(model)` -> `{"auc", "gauc", "logloss"}` on one split (GAUC by user),
    for `BestEpochTracker(..., protocol=None)` and the final evaluation."""

    def __init__(self, data, split, batch_size=512, max_history=1024):
        from tfrec.data.lifelong import lifelong_dataset, sorted_by_history_length

        # sorted by history length, each batch trimmed to its longest history (same metrics, less padding)
        self.samples, _ = sorted_by_history_length(data.splits[split])
        self.dataset = lifelong_dataset(data, self.samples, batch_size=batch_size, max_history=max_history)

    def evaluate(self, model):
        from tfrec.models.ctr_baselines import evaluate_ctr

        result = evaluate_ctr(model, self.dataset, groups=self.samples.user)
        return {k: result[k] for k in ("auc", "gauc", "logloss")}


def popularity_metrics(data, split) -> dict:
    """AUC / GAUC / LogLoss of the item-popularity reference (training click rate of the target)."""
    from tfrec.metrics import auc, gauc, logloss

    samples = data.splits[split]
    predictions = data.item_click_prior()[samples.target_id]
    return {"auc": auc(samples.label, predictions), "gauc": gauc(samples.label, predictions, samples.user),
            "logloss": logloss(samples.label, predictions)}


def evaluated_splits(data) -> tuple:
    """The evaluation splits `data` has samples in (`valid`, `test`; the TFX Trainer has no test)."""
    return tuple(s for s in ("valid", "test") if s in data.splits and len(data.splits[s]))


def evaluate_ctr_splits(config: CTRConfig, model, data) -> dict:
    return {split: CTREvaluator(data, split, config.train.eval_batch_size, config.model.max_history).evaluate(model)
            for split in evaluated_splits(data)}


# ---------------------------------------------------------------- training
def train_ctr(config: CTRConfig, verbose=2, save=True, data=None, semantics=None, train_data=None):
    """Train, evaluate and (optionally) save one lifelong CTR model.

    Args:
        config: a `CTRConfig` (`load_ctr_config`).
        verbose: Keras `fit` verbosity.
        save: write `model.keras`, `results.json` and `sids/` under `config.run_dir`.
        data: optional `LifelongData` (default: `load_ctr_data(config.data)`).
        semantics: optional `ItemSemantics` for `data` (default: `prepare_item_semantics`
            from `config.sids` when the model needs them).
        train_data: optional `epoch -> tf.data.Dataset` of training batches in
            `lifelong_dataset`'s format (default: `data`'s train split; the TFX
            Trainer streams its TFRecords here).

    Returns:
        `(results, model, data)`.
    """
    from tfrec.data.lifelong import lifelong_dataset
    from tfrec.training import engine
    from tfrec.training.sequential import engine_dirs, run_key

    check_ctr_config(config)
    mc, tc = config.model, config.train
    tc.check()
    strategy = engine.make_strategy(tc.distribution)  # first: multi-worker collectives start before other TF work
    data = data if data is not None else load_ctr_data(config.data)
    if semantics is None and needs_semantics(mc.name):
        semantics = prepare_item_semantics(data, config.sids.store_path, config.sids,
                                           fit=needs_semantics(mc.name) == "sids")
    engine.seed_everything(tc.seed, tc.deterministic_ops)
    with strategy.scope():
        model = build_ctr_model(config, data, semantics, seed=tc.seed)
        model.compile(optimizer=engine.build_optimizer(tc), **engine.compile_options(tc))

    def epoch_data(epoch):  # epoch e's order depends only on the seed and e (exact resume)
        if train_data is not None:
            ds = train_data(epoch)
        else:
            ds = lifelong_dataset(data, "train", batch_size=tc.batch_size, max_history=mc.max_history,
                                  shuffle=True, seed=tc.seed + epoch)
        return ds.repeat() if tc.steps_per_epoch is not None else ds

    backup_dir, log_dir = engine_dirs(config, save)
    if save:
        config.run_dir.mkdir(parents=True, exist_ok=True)
    fitted = engine.fit(model, epoch_data, CTREvaluator(data, "valid", tc.eval_batch_size, mc.max_history), tc,
                        protocol=None, steps_per_epoch=tc.steps_per_epoch, backup_dir=backup_dir,
                        tensorboard_dir=log_dir, verbose=verbose, strategy=strategy, run_key=run_key(config))
    train_seconds, epochs_run = fitted.train_seconds, fitted.epochs
    steps = tc.steps_per_epoch or -(-len(data.splits["train"]) // tc.batch_size)
    results = {
        "config": config.to_dict(),
        "data": data.metadata,
        "semantics": semantics.describe() if semantics is not None else None,
        "model": {"class": type(model).__name__, "parameters": int(model.count_params())},
        "splits": evaluate_ctr_splits(config, model, data),
        "reference": {"popularity": {s: popularity_metrics(data, s) for s in evaluated_splits(data)}},
        "epochs": epochs_run,
        "best_epoch": fitted.best_epoch,
        "stopped_by": fitted.stopped_by,
        "resumed_from_epoch": fitted.resumed_from,
        "train_seconds": train_seconds,
        "seconds_to_best": fitted.seconds_to_best,
        "samples_per_second": epochs_run * steps * tc.batch_size / max(train_seconds, 1e-9),
        "validation_curve": fitted.validation_curve,
        "loss_curve": fitted.losses,
        "tensorboard_dir": str(log_dir) if log_dir else None,
    }
    if save:
        run_dir = config.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        model.save(run_dir / "model.keras")
        data.item_vocab.save(run_dir / ITEM_VOCAB_FILE)
        if semantics is not None and semantics.quantizer is not None and needs_semantics(mc.name) == "sids":
            from tfrec.semantics.sids import save_sids

            save_sids(semantics.sids, semantics.quantizer, run_dir / "sids")
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results, model, data


def load_ctr_model(config: CTRConfig, model_path=None):
    """`(model, path)`: the model `tfrec ctr train` saved for `config` (or `model_path`)."""
    import keras

    import tfrec.models.ctr_baselines  # noqa: F401  (registers the classes)
    import tfrec.models.ctr_wide  # noqa: F401
    import tfrec.models.r2led  # noqa: F401

    path = Path(model_path or config.run_dir / "model.keras")
    if not path.is_file():
        raise FileNotFoundError(f"no trained model at {path}; run `tfrec ctr train` first or pass --model")
    return keras.saving.load_model(path), path


def evaluate_saved_ctr(config: CTRConfig, model, data=None) -> dict:
    """Validation and test metrics of a saved model on the data `config` names."""
    data = data if data is not None else load_ctr_data(config.data)
    if model.vocab_size != data.item_vocab.size:
        raise ValueError(f"model has {model.vocab_size} item ids but the configured data has "
                         f"{data.item_vocab.size}: was it trained with other data settings?")
    return {"config": config.to_dict(), "data": data.metadata, "splits": evaluate_ctr_splits(config, model, data),
            "reference": {"popularity": {s: popularity_metrics(data, s) for s in ("valid", "test")}}}


# --------------------------------------------------------------------- CLI
def format_ctr_results(results) -> str:
    from tfrec.metrics import format_metrics_table

    rows = [{"split": split, "model": results["config"]["model"]["name"], **metrics}
            for split, metrics in results["splits"].items()]
    rows += [{"split": split, "model": "popularity", **metrics}
             for split, metrics in results["reference"]["popularity"].items()]
    return format_metrics_table(rows)


def _cmd_train(args):
    config = load_ctr_config(args.config, list(args.overrides) + (["train.resume=true"] if args.resume else []))
    if config.model.name in REFERENCES:
        results, _, _ = fit_reference(config)
        print(format_ctr_results(results))
        print(f"\nfitted in {results['train_seconds']:.0f}s; model and results.json in {config.run_dir}")
        return
    results, _, _ = train_ctr(config, verbose="auto" if sys.stdout.isatty() else 2)
    print()
    print(format_ctr_results(results))
    print(f"\nepochs {results['epochs']} (best {results['best_epoch']}), train {results['train_seconds']:.0f}s, "
          f"{results['samples_per_second']:.0f} samples/s")
    print(f"model, SIDs and results.json in {config.run_dir}")


def _cmd_evaluate(args):
    config = load_ctr_config(args.config, args.overrides)
    from tfrec.cli import report_evaluation

    model, path = load_ctr_model(config, args.model)
    report_evaluation(evaluate_saved_ctr(config, model), format_ctr_results, path)


def load_trained_ctr(config: CTRConfig, model_path=None):
    """`(model, model_path, item_vocab, data_fingerprint)` of a trained CTR run.

    The vocabulary is the run's `item_vocab.txt` (written by `train_ctr`), else
    rebuilt from the configured data; the fingerprint is the one the run recorded."""
    from tfrec.cli import recorded_data_fingerprint
    from tfrec.data.vocab import Vocabulary

    model, path = load_ctr_model(config, model_path)
    fingerprint = recorded_data_fingerprint(path.parent)
    if (path.parent / ITEM_VOCAB_FILE).is_file():
        item_vocab = Vocabulary.load(path.parent / ITEM_VOCAB_FILE)
    else:
        data = load_ctr_data(config.data)
        item_vocab, fingerprint = data.item_vocab, data.metadata.get("fingerprint")
    return model, path, item_vocab, fingerprint


def _cmd_export(args):
    # The CLI reaches up to `export` (as `tfrec.cli` does for `tfrec export`); the library does not.
    from export.saved_model import export_ctr, version_dir

    config = load_ctr_config(args.config, args.overrides)
    base = Path(args.out) / "ranker"
    version_dir(base, args.version)  # fail before loading anything
    model, _, item_vocab, fingerprint = load_trained_ctr(config, args.model)
    users = profiles = None
    wide = getattr(model, "wide", None)
    if wide is not None and (wide.num_users or wide.profile_sizes):  # the ranker maps user tokens in-graph
        data = load_ctr_data(config.data)
        users, profiles = data.users, data.user_profiles
    path = export_ctr(model, item_vocab, base, version=args.version, max_history=config.model.max_history,
                      data_fingerprint=fingerprint, experiment_config=config.to_dict(), users=users,
                      user_profiles=profiles)
    print(f"ranker (stock ops, max_history {config.model.max_history}): {path}")


def _cmd_encode(args):
    config = load_ctr_config(args.config, args.overrides)
    if config.data.interactions_path and not config.data.items_path:
        raise ValueError("tfrec ctr encode needs the item texts: set data.items_path (your own data)")
    data = load_ctr_data(config.data)
    store = encode_lifelong_store(data, args.out or config.sids.store_path, dataset=config.data.dataset,
                                  data_root=config.data.data_root, items_path=config.data.items_path,
                                  force=args.force)
    print(f"semantic store {store.path}: {store.item_vocab.size} rows (the lifelong item vocabulary)")


def add_commands(subparsers) -> None:
    """Register `tfrec ctr train | evaluate | encode | export`."""
    from tfrec.cli import add_config_commands

    ctr = subparsers.add_parser("ctr", help="lifelong CTR models (R2LED and baselines)")
    sub = ctr.add_subparsers(dest="ctr_command", required=True)
    parsers = add_config_commands(sub, (
        ("train", _cmd_train, "train, evaluate and save a CTR model"),
        ("evaluate", _cmd_evaluate, "evaluate a saved CTR model on the validation and test splits"),
        ("encode", _cmd_encode, "encode the semantic store for the lifelong item vocabulary (MiniLM)"),
        ("export", _cmd_export, "export a trained CTR model as a TF Serving ranker SavedModel (<out>/ranker/<v>)"),
    ), "YAML CTR config (see configs/r2led_ml1m.yaml)", "model.name=din train.epochs=3", config_class=CTRConfig)
    parsers["encode"].add_argument("--out", help="store root (default: sids.store_path)")
    parsers["encode"].add_argument("--force", action="store_true",
                                   help="re-encode even if an identical version exists")
    export = parsers["export"]
    export.add_argument("--out", required=True, help="output folder: the ranker goes to <out>/ranker/<version>")
    export.add_argument("--version", type=int, help="version number (default: next free)")
    export.add_argument("--model", help="path to model.keras (default: <run_dir>/model.keras)")
