"""Keras 3 layers: item encoders, sequential backbones, DMESR and R2LED building blocks."""

from tfrec.layers.bilevel_fusion import BiLevelFusion
from tfrec.layers.contrastive import ContrastiveAligner, info_nce
from tfrec.layers.cross_attention_fusion import CrossAttentionFuser
from tfrec.layers.dmesr_encoder import DMESRItemEncoder
from tfrec.layers.gru4rec import GRU4RecBackbone
from tfrec.layers.item_encoder import IdItemEncoder
from tfrec.layers.multi_route_retrieval import MultiRouteRetrieval
from tfrec.layers.residual_quantizer import ResidualQuantizer
from tfrec.layers.target_attention import TargetAttention
from tfrec.layers.transformer import (
    BERT4RecBackbone,
    SASRecBackbone,
    TransformerBackbone,
    TransformerBlock,
)

__all__ = [
    "BiLevelFusion",
    "ContrastiveAligner",
    "CrossAttentionFuser",
    "DMESRItemEncoder",
    "MultiRouteRetrieval",
    "TargetAttention",
    "info_nce",
    "BERT4RecBackbone",
    "GRU4RecBackbone",
    "IdItemEncoder",
    "ResidualQuantizer",
    "SASRecBackbone",
    "TransformerBackbone",
    "TransformerBlock",
]
