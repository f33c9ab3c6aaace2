"""Keras models composed from `tfrec.layers`."""

from tfrec.models.next_item import NextItemRecommender

__all__ = ["NextItemRecommender"]
