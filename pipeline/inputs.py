"""Open an image the way a model wants it: its resolution, its channels, its colour normalisation."""

from __future__ import annotations

import warnings
from pathlib import Path

from models.card import ModelCard
from pipeline.sources import RasterSource, open_image


def open_for_model(
    path: str | Path,
    card: ModelCard,
    bands: tuple[int, ...] | None = None,
    value_range: tuple[float, float] | None = None,
    mpp: float | None = None,
):
    """A source read at ``card``'s native resolution (µm for slides, m for projected rasters),
    non-8-bit data scaled by ``value_range``, else as the model was trained (the card's), with
    slide-level colour normalisation when the card asks for it."""
    resolution = {card.resolution_unit: card.resolution} if card.resolution else {}
    source = open_image(
        path, bands, value_range or card.input.value_range, card.input.channels,
        target_mpp=resolution.get("um"), mpp=mpp, target_m=resolution.get("m"),
    )
    if isinstance(source, RasterSource) and source.crs_wkt is None and source.mpp is None:  # nothing measures its pixels
        if card.resolution_unit == "um" and card.resolution:
            warnings.warn(f"{source.path}: pixel size unknown (no resolution metadata): read as it is, as if at the model's "
                          f"{card.resolution:g} µm per pixel; give --mpp if it is not", stacklevel=2)
        else:
            where = "pixel coordinates" if source.transform.is_identity else "the units of its transform, CRS unknown"
            warnings.warn(f"{source.path}: no CRS; polygons are in {where}", stacklevel=2)
    if card.input.slide_normalisation and hasattr(source, "with_colour_normalisation"):
        source = source.with_colour_normalisation(card.input.reference_mean, card.input.reference_std)
    return source
