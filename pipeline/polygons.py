"""Mask → polygon, exactly along pixel edges, on the worker."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from affine import Affine
from rasterio import features


def mask_to_polygon(mask: np.ndarray, row: int, col: int) -> shapely.Polygon | None:
    """The largest 4-connected region of ``mask`` as a polygon; (``row``, ``col``) is its offset.

    Vertices lie on pixel corners in (x = column, y = row) pixel coordinates, so rasterising the
    polygon gives back the mask exactly. Holes are kept; stray islands are dropped.
    """
    return masks_to_polygons([(0, 0, mask)], mask.shape, row, col)[0]


def masks_to_polygons(
    crops: Sequence[tuple[int, int, np.ndarray]], shape: tuple[int, int], row: int = 0, col: int = 0
) -> list[shapely.Polygon | None]:
    """``mask_to_polygon`` of many masks of one tile in a few GDAL calls.

    ``crops`` are (row, col, mask) with each mask inside a tile of ``shape``, offset by (``row``,
    ``col``). Masks are painted as labels into as few layers as keep them from overlapping (one or
    two for instance masks after NMS) and each layer is traced once, instead of once per mask.
    """
    layers: list[np.ndarray] = []
    for label, (r, c, mask) in enumerate(crops, start=1):
        if not mask.any():
            continue
        h, w = mask.shape
        for layer in layers:
            if not layer[r : r + h, c : c + w][mask].any():
                break
        else:
            layer = np.zeros(shape, np.int32)
            layers.append(layer)
        layer[r : r + h, c : c + w][mask] = label
    largest: dict[int, shapely.Polygon] = {}
    for layer in layers:
        rows, cols = np.flatnonzero(layer.any(axis=1)), np.flatnonzero(layer.any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        window = layer[r0:r1, c0:c1]
        traced = features.shapes(
            window, mask=window > 0, connectivity=4, transform=Affine.translation(col + c0, row + r0)
        )
        for geometry, value in traced:
            polygon = shapely.geometry.shape(geometry)
            kept = largest.get(int(value))
            if kept is None or polygon.area > kept.area:
                largest[int(value)] = polygon
    polygons = np.array([largest.get(label) for label in range(1, len(crops) + 1)] + [None], dtype=object)[:-1]
    return list(shapely.simplify(polygons, 0))
