"""Mask → polygon, exactly along pixel edges, on the worker.

Masks are traced as label images, all instances of a tile at once, with numpy: every pixel side
between a label and anything else is a directed boundary edge (region on its right); each edge's
successor is fixed by the 2×2 pixels around its end corner: turn around its own pixel, else go
straight, else turn into the notch. Where a label's pixels meet only diagonally, the boundary
turns around its own pixel when they are separate 4-connected regions and into the notch when
they are one region, so that no ring touches itself. The edges then fall into rings, ordered by
pointer jumping. Only corners become vertices, so polygons carry no collinear points.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import shapely
from scipy import ndimage

# edge id = 4 · pixel + side; sides clockwise on screen: top, right, bottom, left
_TURN_OWN = np.array([1, 2, 3, 0])  # the same pixel's next side: turning right around it
_TURN_LEFT = np.array([3, 0, 1, 2])  # the diagonal pixel's side: turning left into a notch
_START_CORNER = np.array([[0, 0], [1, 0], [1, 1], [0, 1]])  # (dx, dy) of each side's first vertex


def mask_to_polygon(mask: np.ndarray, row: int, col: int) -> shapely.Polygon | None:
    """The largest 4-connected region of ``mask`` as a polygon; (``row``, ``col``) is its offset.

    Vertices lie on pixel corners in (x = column, y = row) pixel coordinates, so rasterising the
    polygon gives back the mask exactly. Holes are kept; stray islands are dropped.
    """
    return masks_to_polygons([(0, 0, mask)], mask.shape, row, col)[0]


def masks_to_polygons(
    crops: Sequence[tuple[int, int, np.ndarray]], shape: tuple[int, int], row: int = 0, col: int = 0
) -> list[shapely.Polygon | None]:
    """``mask_to_polygon`` of many masks of one tile together.

    ``crops`` are (row, col, mask) with each mask inside a tile of ``shape``, offset by (``row``,
    ``col``). Masks are painted as labels into as few layers as keep them from overlapping (one or
    two for instance masks after NMS); each layer is traced once.
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
    polygons = np.full(len(crops), None, dtype=object)
    for layer in layers:
        rows, cols = np.flatnonzero(layer.any(axis=1)), np.flatnonzero(layer.any(axis=0))
        r0, c0 = rows[0], cols[0]
        labels, found = trace_labels(layer[r0 : rows[-1] + 1, c0 : cols[-1] + 1], row + r0, col + c0)
        polygons[labels - 1] = found
    return list(polygons)


def trace_labels(labels: np.ndarray, row: int = 0, col: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(label values, polygons): the largest 4-connected region of each nonzero label, holes kept."""
    padded = np.pad(labels, 1)
    width = padded.shape[1]
    flat = padded.ravel()
    inside = flat > 0
    neighbours = (np.roll(flat, width), np.roll(flat, -1), np.roll(flat, -width), np.roll(flat, 1))
    exists = np.stack([inside & (flat != n) for n in neighbours], axis=1).ravel()  # (pixel, side)
    edge = np.flatnonzero(exists)
    pixel, side = edge // 4, edge % 4
    forward = np.array([1, width, -1, -width])[side]  # the pixel ahead along the edge
    outward = np.array([-width, 1, width, -1])[side]  # the pixel across the edge
    own = 4 * pixel + _TURN_OWN[side]
    straight = 4 * (pixel + forward) + side
    notch = 4 * (pixel + forward + outward) + _TURN_LEFT[side]
    successor = np.where(exists[own], own, np.where(exists[straight], straight, notch))
    regions = partial(_regions, padded)  # needed only where a label meets itself diagonally, or has islands
    pinch = exists[own] & (flat[pixel + forward + outward] == flat[pixel])
    if pinch.any():
        region = regions(flat[pixel[pinch]])
        joined = pinch & (region[pixel] == region[pixel + forward + outward])
        successor[joined] = notch[joined]
    nxt = np.searchsorted(edge, successor)

    # rings: each edge's ring head is the smallest edge id in its cycle; rank = steps from the head
    head = np.arange(len(edge))
    jump = nxt.copy()
    span = 1
    while span < len(edge):
        head = np.minimum(head, head[jump])
        jump = jump[jump]
        span *= 2
    previous = np.empty_like(nxt)
    previous[nxt] = np.arange(len(edge))
    is_head = head == np.arange(len(edge))
    rank = np.where(is_head, 0, 1)
    back = np.where(is_head, np.arange(len(edge)), previous)
    while True:
        further = back[back]
        if np.array_equal(further, back):
            break
        rank = rank + np.where(back == np.arange(len(edge)), 0, rank[back])
        back = further
    # a corner: an edge whose predecessor runs in another direction
    corner = side != side[previous]
    order = np.lexsort((rank, head))
    order = order[corner[order]]
    ring_of = np.unique(head[order], return_inverse=True)[1]
    x = pixel[order] % width + _START_CORNER[side[order], 0] + col - 1
    y = pixel[order] // width + _START_CORNER[side[order], 1] + row - 1
    rings = shapely.linearrings(np.column_stack([x, y]).astype(float), indices=ring_of)
    ring_head = np.unique(head[order])
    ring_label = flat[pixel[ring_head]]
    following = np.arange(1, len(x) + 1)  # each vertex's successor in its ring (shoelace formula)
    last = np.flatnonzero(np.diff(ring_of, append=-1) != 0)
    following[last] = np.concatenate([[0], last[:-1] + 1])
    area = np.bincount(ring_of, weights=x * y[following] - x[following] * y) / 2  # shells > 0, holes < 0
    return _largest_regions(rings, ring_label, pixel[ring_head], area, regions)


def _regions(padded: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The 4-connected regions of each label in ``values`` (distinct ids; 0 for every other pixel),
    flattened like ``padded``: each labelled inside its own bounding box."""
    regions = np.zeros(padded.size, np.int64)
    values = np.unique(values)
    boxes = ndimage.find_objects(padded, max_label=int(values[-1]))
    first = 1
    for value in values:
        box = boxes[value - 1]
        found, count = ndimage.label(padded[box] == value)  # the default structure: 4-connectivity
        rows, cols = np.nonzero(found)
        pixels = np.ravel_multi_index((rows + box[0].start, cols + box[1].start), padded.shape)
        regions[pixels] = found[rows, cols] + first - 1
        first += count
    return regions


def _largest_regions(
    rings: np.ndarray, ring_label: np.ndarray, ring_pixel: np.ndarray, area: np.ndarray,
    regions: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Per label: its largest shell (by pixels, holes subtracted) with that shell's holes.

    ``ring_pixel`` is a pixel of the region each ring bounds; ``regions(values)`` labels the regions
    of those labels."""
    shell = area > 0
    values = np.unique(ring_label)
    shells_per_label = np.bincount(np.searchsorted(values, ring_label[shell]), minlength=len(values))
    owner = np.arange(len(rings))  # the shell ring each ring belongs to
    shell_index = np.flatnonzero(shell)
    first_shell = shell_index[np.unique(ring_label[shell], return_index=True)[1]]
    owner[~shell] = first_shell[np.searchsorted(values, ring_label[~shell])]
    several = np.isin(ring_label, values[shells_per_label > 1])
    if (several & ~shell).any():  # islands and holes: a hole belongs to the shell of its region
        region = regions(ring_label[several])[ring_pixel]
        by_region = dict(zip(region[shell & several], shell_index[several[shell_index]]))
        for hole in np.flatnonzero(several & ~shell):
            owner[hole] = by_region[region[hole]]
    pixels = np.bincount(owner, weights=area, minlength=len(rings))[shell_index]  # shell + its holes
    order = np.lexsort((shell_index, -pixels, ring_label[shell_index]))
    best = shell_index[order[np.unique(ring_label[shell_index][order], return_index=True)[1]]]
    keep = np.isin(owner, best)
    members = np.flatnonzero(keep)
    members = members[np.lexsort((~shell[members], owner[members]))]  # shell first, then its holes
    polygon_of = np.unique(owner[members], return_inverse=True)[1]
    polygons = shapely.polygons(rings[members], indices=polygon_of)
    return ring_label[best[np.argsort(best)]], polygons
