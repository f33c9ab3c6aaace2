"""Keras 3 layers: item encoders, sequential backbones, DMESR and R2LED building blocks."""

from tfrec.layers.gru4rec import GRU4RecBackbone
from tfrec.layers.item_encoder import IdItemEncoder
from tfrec.layers.residual_quantizer import ResidualQuantizer
from tfrec.layers.transformer import (
    BERT4RecBackbone,
    SASRecBackbone,
    TransformerBackbone,
    TransformerBlock,
)

__all__ = [
    "BERT4RecBackbone",
    "GRU4RecBackbone",
    "IdItemEncoder",
    "ResidualQuantizer",
    "SASRecBackbone",
    "TransformerBackbone",
    "TransformerBlock",
]
