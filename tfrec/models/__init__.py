"""Keras models composed from `tfrec.layers`.

Importing this package registers every model class with Keras serialisation, so
`keras.saving.load_model` can restore them.
"""

from tfrec.models.ctr_baselines import CTR_BASELINES, CTRModel, TargetAttentionCTR, build_ctr_baseline, evaluate_ctr
from tfrec.models.next_item import NextItemRecommender
from tfrec.models.r2led import R2LED, r2led_variant

__all__ = [
    "CTR_BASELINES",
    "CTRModel",
    "NextItemRecommender",
    "R2LED",
    "TargetAttentionCTR",
    "build_ctr_baseline",
    "evaluate_ctr",
    "r2led_variant",
]
