"""Tissue detection on a slide thumbnail, so background tiles are never read at full resolution.

The rule, on the thumbnail's valid pixels, after a 3 × 3 mean filter (so that faint staining is
told by its mean colour, not pixel by pixel through the noise):

1. Featureless: where no channel varies by more than one level (blank glass, an all-black field,
   any single colour) there is no tissue and the mask is empty.
2. Colour: stained brightfield tissue (H&E, IHC) is coloured and glass is grey-white. A thumbnail
   carries usable colour when at least ``COLOUR_FRACTION`` (0.1 %) of its valid pixels have a
   chroma (largest minus smallest channel) of at least ``FLOOR`` (0.05 of the full range); a grey
   scan has none. Tissue is then HSV saturation above Otsu's threshold on saturation (taken again
   below itself while what lies below is stained and varied: ``glass_threshold``), and above a
   floor: ``FLOOR``, or less where the glass is cleaner, ``STEP`` (0.025) above the glass's
   saturation (the most common one), so that very pale staining on clean glass is kept.
3. Intensity: a thumbnail without usable colour (a scanner in grey mode, a hematoxylin-only
   slide, a one-channel fluorescence image replicated to grey) is told by grey level (the mean of
   the channels). The background is the most common grey level (the peak of a 64-bin histogram):
   below mid-grey (0.5) the slide is a dark field (fluorescence) and tissue is brighter than Otsu's
   threshold on grey level; otherwise it is brightfield and tissue is darker. Either way tissue
   is also at least ``STEP`` away from the background's end of the range (the 1st percentile of
   grey level for a dark field, the 99th for brightfield), so that noise on blank glass or on an
   empty dark field is not tissue.

Small holes and specks are then closed and opened away, and the mask is dilated by a margin so
that tissue edges are never cut off.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.grid import Tile

FLOOR = 0.05  # the saturation that is always enough for tissue; the chroma that makes a pixel coloured
COLOUR_FRACTION = 0.001  # the share of valid pixels that must be coloured for the colour rule
STEP = 0.025  # the least step from the background (saturation or grey level) that is tissue
MID_GREY = 0.5  # a background (most common grey level) below it is a dark field: fluorescence
TISSUE_MICRONS = 4.0  # tissue is told at about this pixel size (~2.5x) or coarser: finer, nuclei and pale stroma part ways


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


def most_common(values: np.ndarray, bins: int) -> float:
    """The centre of the fullest of ``bins`` histogram bins of ``values`` in [0, 1]."""
    histogram, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    return float(edges[np.argmax(histogram)] + 0.5 / bins)


def glass_threshold(saturation: np.ndarray, rounds: int = 3) -> float:
    """Otsu's threshold on saturation, taken again below itself while what lies below is stained
    (median above ``FLOOR``) and varied (interquartile range above ``STEP``): where tissue fills
    most of the image, the first split is between deeply and palely stained tissue, not between
    tissue and glass. Glass, even glass a colour cast tints, is uniform."""
    threshold = otsu_threshold(saturation)
    for _ in range(rounds):
        below = saturation[saturation <= threshold]
        if below.size == 0 or np.median(below) <= FLOOR or np.subtract(*np.percentile(below, [75, 25])) <= STEP:
            break
        threshold = otsu_threshold(below)
    return threshold


def tissue_mask(thumbnail: np.ndarray, valid: np.ndarray | None = None, margin: int = 2) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail: by saturation where it is coloured, by grey
    level (dark on bright, or bright on dark) where it is not; see the module's docstring."""
    usable = valid if valid is not None else np.ones(thumbnail.shape[:2], bool)
    channels = [thumbnail[..., c] for c in range(3)]  # channel by channel: reductions over a last axis of 3 are slow
    if not usable.any() or all(np.ptp(c[usable]) <= 1 for c in channels):
        return np.zeros(thumbnail.shape[:2], bool)
    chroma = np.maximum(np.maximum(*channels[:2]), channels[2]) - np.minimum(np.minimum(*channels[:2]), channels[2])
    coloured = np.mean(chroma[usable] >= FLOOR * 255) >= COLOUR_FRACTION
    # 3 × 3 means of the usable neighbours only, so invalid pixels leave no trace
    weight = np.maximum(ndimage.uniform_filter(usable.astype(np.float32), 3, mode="nearest"), 1e-6)
    r, g, b = (ndimage.uniform_filter(np.where(usable, c / np.float32(255), 0), 3, mode="nearest") / weight for c in channels)
    if coloured:
        high, low = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
        saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
        values = saturation[usable]
        floor = min(FLOOR, most_common(values, 256) + STEP)
        mask = saturation > max(glass_threshold(values), floor)
    else:
        grey = (r + g + b) / 3
        values = grey[usable]
        if most_common(values, 64) < MID_GREY:  # dark field: tissue is bright
            mask = grey > max(otsu_threshold(values), np.percentile(values, 1) + STEP)
        else:  # brightfield: tissue is dark
            mask = grey < min(otsu_threshold(values), np.percentile(values, 99) - STEP)
    mask &= usable
    mask = ndimage.binary_opening(ndimage.binary_closing(mask, iterations=2), iterations=1)
    return ndimage.binary_dilation(mask, iterations=margin) if margin else mask


def tissue_mask_at_scale(thumbnail: np.ndarray, valid: np.ndarray, pixel_um: float | None) -> np.ndarray:
    """``tissue_mask`` of a thumbnail of ``pixel_um`` µm per pixel, judged on its block means at about
    ``TISSUE_MICRONS`` when it is finer (an image of 2,048 px or less is its own thumbnail: at 0.25 µm
    the rule told nuclei from pale stroma, not tissue from glass), returned at the thumbnail's size."""
    k = int(TISSUE_MICRONS // pixel_um) if pixel_um else 1
    if k < 2:
        return tissue_mask(thumbnail, valid)
    height, width = valid.shape
    pad = ((0, -height % k), (0, -width % k))
    blocks = (-(-height // k), k, -(-width // k), k)
    weight = np.pad(valid, pad).reshape(blocks).sum(axis=(1, 3))
    sums = [np.pad(np.where(valid, thumbnail[..., c], 0), pad).reshape(blocks).sum(axis=(1, 3), dtype=np.int64) for c in range(3)]
    means = np.stack([total / np.maximum(weight, 1) for total in sums], axis=-1).round().astype(np.uint8)
    coarse = tissue_mask(means, weight * 2 > k * k)
    return np.repeat(np.repeat(coarse, k, axis=0), k, axis=1)[:height, :width] & valid


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
