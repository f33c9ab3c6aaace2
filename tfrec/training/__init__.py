"""Training: the one engine (`tfrec.training.engine.fit`) and next-item training.

- `engine`: `fit` (early stopping, budget, checkpoints/resume, TensorBoard,
  distribution), `BestEpochTracker`, `make_strategy`, `build_optimizer`;
- `sequential`: `train_sequential` (what `tfrec train` runs), model builders,
  data preparation and evaluation helpers.

CTR training (`tfrec.ctr.train_ctr`) and the TFX Trainer
(`tfx_pipeline.trainer`) use the same engine.
"""

from tfrec.training.engine import (
    BestEpochTracker,
    FitResult,
    build_optimizer,
    compile_options,
    fit,
    make_strategy,
    seed_everything,
)
from tfrec.training.sequential import (
    BACKBONES,
    ITEM_ENCODERS,
    PopularityScorer,
    _evaluator_args,
    build_backbone,
    build_item_encoder,
    build_model,
    engine_dirs,
    evaluate_saved_model,
    evaluate_splits,
    load_interactions,
    load_trained_model,
    popularity_reference,
    prepare_split,
    run_key,
    train_sequential,
)

__all__ = [
    "BACKBONES", "ITEM_ENCODERS", "BestEpochTracker", "FitResult", "PopularityScorer", "build_backbone",
    "build_item_encoder", "build_model", "build_optimizer", "compile_options", "engine_dirs",
    "evaluate_saved_model", "evaluate_splits", "fit", "load_interactions", "load_trained_model",
    "make_strategy", "popularity_reference", "prepare_split", "run_key", "seed_everything", "train_sequential",
]
