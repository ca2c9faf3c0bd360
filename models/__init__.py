"""Seamline models: model cards, torchvision Mask R-CNN builders, safe weight loading, inference.

This layer knows torch and torchvision; it knows nothing of tiles, files of imagery or Dask.
"""

from models.card import ModelCard, load_card
from models.registry import resolve_model_dir

__all__ = ["ModelCard", "load_card", "resolve_model_dir"]
