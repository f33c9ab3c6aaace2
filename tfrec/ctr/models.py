"""The CTR model factory: R2LED, its ablations, the baselines and the references, by `model.name`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from tfrec.ctr.config import REFERENCES, CTRConfig, model_names
from tfrec.ctr.semantics import ItemSemantics


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
    routes = len(mc.route_levels) or config.sids.num_levels + int(config.sids.deduplicate)  # R2LED's route count
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


def model_users(model, data):
    """`(users, user_profiles)` a ranker export of `model` maps user tokens with (`LifelongData.users` /
    `.user_profiles`), or `(None, None)` when its wide part reads neither. `data`: the `LifelongData`, or a
    function returning it (called only when needed: loading it may take a while)."""
    wide = getattr(model, "wide", None)
    if wide is None or not (wide.num_users or wide.profile_sizes):
        return None, None
    data = data() if callable(data) else data
    return data.users, data.user_profiles


def needs_semantics(name: str):
    """What model `name` reads from the store: "sids", "pooled" or None."""
    from tfrec.models.r2led import R2LED_VARIANTS

    return "sids" if name in R2LED_VARIANTS else "pooled" if name == "sim-soft" else None


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
