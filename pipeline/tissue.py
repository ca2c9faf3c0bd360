"""Tissue detection on a slide thumbnail, so background tiles are never read at full resolution.

Stained tissue is coloured and glass is grey-white: Otsu's threshold on HSV saturation of a
thumbnail separates them, slide by slide; small holes and specks are closed and opened away and
the mask is dilated by a margin so tissue edges are never cut off.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.grid import Tile


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold maximising between-class variance of ``values`` in [0, 1]."""
    histogram, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(histogram)
    total = weight[-1]
    if total == 0:
        return 1.0
    mean = np.cumsum(histogram * centres)
    between = (mean[-1] * weight - mean * total) ** 2 / np.maximum(weight * (total - weight), 1e-12)
    return float(centres[np.argmax(between[:-1])])


def tissue_mask(thumbnail: np.ndarray, valid: np.ndarray | None = None, margin: int = 2) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail (Otsu on saturation, then cleaned)."""
    rgb = thumbnail.astype(np.float32) / 255
    high, low = rgb.max(2), rgb.min(2)
    saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
    usable = valid if valid is not None else np.ones(saturation.shape, bool)
    if not usable.any():
        return np.zeros(saturation.shape, bool)
    mask = (saturation > max(otsu_threshold(saturation[usable]), 0.05)) & usable
    mask = ndimage.binary_opening(ndimage.binary_closing(mask, iterations=2), iterations=1)
    return ndimage.binary_dilation(mask, iterations=margin) if margin else mask


def tiles_with_tissue(tiles: list[Tile], mask: np.ndarray, scale: float) -> np.ndarray:
    """Whether each tile's window (in processed pixels) covers any tissue pixel of ``mask``;
    ``scale`` is processed pixels per mask pixel."""
    keep = np.zeros(len(tiles), bool)
    for i, tile in enumerate(tiles):
        r0, r1 = int(tile.rows.start // scale), int(np.ceil(tile.rows.stop / scale))
        c0, c1 = int(tile.cols.start // scale), int(np.ceil(tile.cols.stop / scale))
        keep[i] = mask[r0:r1, c0:c1].any()
    return keep


def tissue_area_mm2(mask: np.ndarray, mask_pixel_um: float) -> float:
    return float(mask.sum()) * mask_pixel_um**2 / 1e6
