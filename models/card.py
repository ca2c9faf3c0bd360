"""Model cards: the ``model.yaml`` that makes a directory a Seamline model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Architecture = Literal[
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "maskrcnn_mobilenet_v3_large_fpn",
    "maskrcnn_compact",
]

CARD_FILENAME = "model.yaml"


class ModelCardError(ValueError):
    """A model directory or its card is missing or invalid."""


class InputSpec(BaseModel):
    """How pixels become model input: uint8 values / 255, then (x - mean) / std per channel."""

    model_config = ConfigDict(extra="forbid")

    channels: int = Field(3, ge=1, le=16)
    mean: list[float] = [0.5, 0.5, 0.5]
    std: list[float] = [0.25, 0.25, 0.25]
    slide_normalisation: bool = Field(
        False, description="map each slide's tissue colour statistics (from its thumbnail) to the reference ones"
    )
    reference_mean: list[float] | None = Field(None, description="training images' per-channel mean, 0-255")
    reference_std: list[float] | None = Field(None, description="training images' per-channel std, 0-255")
    value_range: tuple[float, float] | None = Field(
        None, description="non-8-bit data: what maps to 0-255 in every band, as the model was trained "
        "(seamline train --value-range); None: each image's 0.5-99.5th percentiles per band"
    )

    @model_validator(mode="after")
    def _lengths_match(self) -> "InputSpec":
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values each (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if self.slide_normalisation and (self.reference_mean is None or self.reference_std is None):
            raise ValueError("slide_normalisation needs reference_mean and reference_std")
        for name in ("reference_mean", "reference_std"):
            values = getattr(self, name)
            if values is not None and (len(values) != self.channels or not all(0 <= v <= 255 for v in values)):
                raise ValueError(f"{name} needs {self.channels} values in 0-255")
        if self.value_range is not None and not (math.isfinite(sum(self.value_range)) and self.value_range[0] < self.value_range[1]):
            raise ValueError(f"value_range {list(self.value_range)} needs two finite numbers, low < high")
        return self


class ModelCard(BaseModel):
    """Everything needed to build, load and run a model, read from ``model.yaml``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    architecture: Architecture
    classes: list[str] = Field(min_length=1, description="class names, background excluded")
    weights: str = "weights.safetensors"
    input: InputSpec = InputSpec()
    resolution: float | None = Field(None, gt=0, description="native pixel size")
    resolution_unit: Literal["m", "um"] | None = None
    tile_size: int = Field(512, ge=64, le=4096, multiple_of=32)
    overlap: int = Field(64, ge=1)  # tiles must share pixels for the seam merge
    score_threshold: float = Field(0.5, ge=0, le=1)
    mask_threshold: float = Field(0.5, gt=0, lt=1)
    mask_nms_threshold: float | None = Field(
        None, gt=0, le=1,
        description="drop a mask whose overlap (mask_nms_metric) with a higher-scoring mask of its class in the "
        "same tile reaches this (after the model's box NMS); None: box NMS only",
    )
    mask_nms_metric: Literal["iou", "ios"] = Field(
        "iou", description="iou: intersection over union; ios: intersection over the smaller mask (nested fragments)"
    )
    mask_nms_across_classes: bool = Field(
        False, description="mask NMS compares masks of any two classes (one object, two class guesses)"
    )
    test_time_flips: bool = Field(
        False, description="segment each tile as is and under three flips, fused (models/tta.py); ~4x the model time"
    )
    max_detections: int = Field(300, ge=1, le=10000)
    roi_sampling_ratio: int = Field(
        2, ge=1, le=8,
        description="RoIAlign samples per bin side in the box and mask heads (torchvision's 2); 1 costs a quarter "
        "of the sampling, enough where objects span few feature cells (nuclei: same scores, ~15 % faster on CPU)",
    )
    anchor_sizes: list[int] = [16, 32, 64, 128, 256]
    description: str = ""

    @model_validator(mode="after")
    def _overlap_fits(self) -> "ModelCard":
        if self.overlap >= self.tile_size // 2:
            raise ValueError(f"overlap {self.overlap} must be less than half the tile size {self.tile_size}")
        if len(self.anchor_sizes) != 5:
            raise ValueError("anchor_sizes needs 5 sizes, one per FPN level")
        return self

    @property
    def num_classes(self) -> int:
        """Number of model outputs, background included."""
        return len(self.classes) + 1


def load_card(model_dir: str | Path) -> ModelCard:
    """Read and validate ``model_dir/model.yaml``."""
    path = Path(model_dir) / CARD_FILENAME
    if not path.is_file():
        raise ModelCardError(f"{path}: no model card (a model directory needs {CARD_FILENAME})")
    try:
        raw = yaml.safe_load(path.read_text())
        return ModelCard.model_validate(raw)
    except yaml.YAMLError as err:
        raise ModelCardError(f"{path}: not valid YAML: {err}") from err
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'card'}: {e['msg']}" for e in err.errors())
        raise ModelCardError(f"{path}: {problems}") from err


def save_card(card: ModelCard, model_dir: str | Path) -> Path:
    """Write ``card`` as ``model_dir/model.yaml``."""
    path = Path(model_dir) / CARD_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(card.model_dump(mode="json"), sort_keys=False))
    return path


def save_variant(model_dir: str | Path, variant_dir: str | Path, **changes) -> ModelCard:
    """A model directory at ``variant_dir``: ``model_dir``'s card with ``changes``, its weights linked."""
    card = load_card(model_dir).model_copy(update=changes)
    save_card(card, variant_dir)
    (Path(variant_dir) / card.weights).symlink_to(Path(model_dir).resolve() / card.weights)
    return card
