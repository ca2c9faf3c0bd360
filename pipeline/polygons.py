"""Mask → polygon, exactly along pixel edges, on the worker."""

from __future__ import annotations

import numpy as np
import shapely
from affine import Affine
from rasterio import features


def mask_to_polygon(mask: np.ndarray, row: int, col: int) -> shapely.Polygon | None:
    """The largest 4-connected region of ``mask`` as a polygon; (``row``, ``col``) is its offset.

    Vertices lie on pixel corners in (x = column, y = row) pixel coordinates, so rasterising the
    polygon gives back the mask exactly. Holes are kept; stray islands are dropped.
    """
    if not mask.any():
        return None
    shapes = features.shapes(
        mask.astype(np.uint8), mask=mask, connectivity=4, transform=Affine.translation(col, row)
    )
    polygons = [shapely.geometry.shape(geom) for geom, _ in shapes]
    return shapely.simplify(max(polygons, key=lambda p: p.area), 0)
