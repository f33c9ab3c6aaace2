"""Keras 3 layers: item encoders and sequential backbones."""

from tfrec.layers.gru4rec import GRU4RecBackbone
from tfrec.layers.item_encoder import IdItemEncoder
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
    "SASRecBackbone",
    "TransformerBackbone",
    "TransformerBlock",
]
