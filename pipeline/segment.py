"""Per-tile stage: model output → polygons in image pixels, split into final and seam candidates."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import shapely

from pipeline.detections import Detections
from pipeline.grid import Tile
from pipeline.polygons import masks_to_polygons

if TYPE_CHECKING:  # importing torch costs a process ~0.65 GB of RSS; only workers need it
    from models.inference import TileInstances

# pixels: an instance reaching this close to an edge a neighbour shares is cut by it (models end the
# objects an edge cuts up to a pixel short: MoNuSeg's held-out tiles and the 20,000² benchmark scene)
EDGE_BAND = 2
MIN_VALID_FRACTION = 0.5  # a mask mostly over nodata, alpha or padding is the model reading black, not an object


def _valid_part(whole: np.ndarray, mask: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``mask`` (``whole`` cut to the window) on valid pixels only; empty when less than
    ``MIN_VALID_FRACTION`` of ``whole`` is valid."""
    part = mask & valid
    return part if np.count_nonzero(part) >= MIN_VALID_FRACTION * np.count_nonzero(whole) else np.zeros_like(mask)


def tile_detections(instances: TileInstances, tile: Tile, valid: np.ndarray | None = None) -> Detections:
    """Polygons of one tile's instances in whole-image pixels, flagged ``cut`` and ``owned``.

    Masks are clipped to the part of the window inside the image (a padded tile at the border
    cannot produce pixels outside it) and, given ``valid`` (the tile's valid pixels: not nodata,
    alpha, NaN nor padding), to valid pixels; an instance mostly on invalid pixels is dropped.

    An instance is ``cut`` when, at an edge a neighbouring window shares, its mask or its box
    reaches into the ``EDGE_BAND`` outermost pixel rows or columns: a model does not draw an object
    the edge cuts exactly to the edge (its box and mask often end a pixel short), and a piece it
    draws that way, taken as whole, would stand beside the copy of the tile that saw it all.
    """
    height, width = tile.rows.length, tile.cols.length
    left, top, right, bottom = tile.interior
    masks = [crop.mask[: max(height - crop.row, 0), : max(width - crop.col, 0)] for crop in instances.masks]
    if valid is not None:
        masks = [
            _valid_part(crop.mask, mask, valid[crop.row : crop.row + mask.shape[0], crop.col : crop.col + mask.shape[1]])
            for crop, mask in zip(instances.masks, masks)
        ]
    polygons = masks_to_polygons(
        [(crop.row, crop.col, mask) for crop, mask in zip(instances.masks, masks)],
        (height, width), tile.rows.start, tile.cols.start,
    )
    band = EDGE_BAND
    x0, y0, x1, y1 = np.asarray(instances.boxes, float).reshape(-1, 4).T
    box_reaches = (left & (x0 < band)) | (top & (y0 < band)) | (right & (x1 > width - band)) | (bottom & (y1 > height - band))
    geometries, keep, cut = [], [], []
    for i, (crop, mask, polygon) in enumerate(zip(instances.masks, masks, polygons)):
        if polygon is None:
            continue
        h, w = mask.shape
        touches = (
            (left and crop.col < band and mask[:, : band - crop.col].any())
            or (top and crop.row < band and mask[: band - crop.row].any())
            or (right and crop.col + w > width - band and mask[:, max(width - band - crop.col, 0) :].any())
            or (bottom and crop.row + h > height - band and mask[max(height - band - crop.row, 0) :].any())
        )
        geometries.append(polygon)
        keep.append(i)
        cut.append(bool(touches or box_reaches[i]))
    keep_index = np.asarray(keep, dtype=np.intp)
    geometry = np.asarray(geometries + [None], dtype=object)[:-1]
    bounds = shapely.bounds(geometry).reshape(-1, 4)
    cx, cy = (bounds[:, 0] + bounds[:, 2]) / 2, (bounds[:, 1] + bounds[:, 3]) / 2
    x0, y0, x1, y1 = tile.core_bounds
    return Detections(
        geometry=geometry,
        label=instances.labels[keep_index].astype(np.int16),
        score=instances.scores[keep_index].astype(np.float32),
        tile=np.full(len(keep), tile.index, np.int32),
        cut=np.asarray(cut, bool),
        owned=(cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1),
    )


def split_seam_candidates(detections: Detections, tile: Tile) -> tuple[Detections, Detections]:
    """(final, candidates): an instance inside the window part no other tile reads is final."""
    x0, y0, x1, y1 = tile.exclusive_bounds
    b = detections.bounds
    inside = (b[:, 0] >= x0) & (b[:, 1] >= y0) & (b[:, 2] <= x1) & (b[:, 3] <= y1) & ~detections.cut
    return detections.take(np.flatnonzero(inside)), detections.take(np.flatnonzero(~inside))
