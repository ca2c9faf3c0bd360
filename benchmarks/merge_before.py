"""FROZEN COPY of pipeline/merge.py at commit 2e95626 (before the performance work of 2026-11-23),
kept only so benchmarks/merge_throughput.py --before can time old and new side by side and check
that they give identical outputs. Not used by the pipeline.

The seam merge: one instance per object from per-tile detections.

Only seam candidates (instances a neighbouring tile may also have seen) take part, so the cost
grows with the instances near seams, not with the image. Two candidates from different tiles
are the same object when their IoU *inside the pixels both windows read* passes a threshold:
both tiles saw exactly those pixels, so copies and fragments of one object agree there even
when the object is far larger than the overlap. Each connected group of matches becomes one
instance: the best copy no tile edge cut, or else the union of the fragments.
"""

from __future__ import annotations

import numpy as np
import shapely
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.detections import Detections
from pipeline.grid import Tile


def match_pairs(candidates: Detections, tiles: dict[int, Tile], min_iou: float) -> np.ndarray:
    """(2, m) indices of candidate pairs from different tiles that are one object."""
    geometry = candidates.geometry
    left, right = shapely.STRtree(geometry).query(geometry, predicate="intersects")
    keep = (left < right) & (candidates.tile[left] != candidates.tile[right])
    left, right = left[keep], right[keep]
    if len(left) == 0:
        return np.empty((2, 0), np.intp)
    windows = np.array([tiles[i].bounds for i in sorted(tiles)], float)
    order = {t: k for k, t in enumerate(sorted(tiles))}
    wl = windows[[order[t] for t in candidates.tile[left]]]
    wr = windows[[order[t] for t in candidates.tile[right]]]
    common = shapely.box(
        np.maximum(wl[:, 0], wr[:, 0]), np.maximum(wl[:, 1], wr[:, 1]),
        np.minimum(wl[:, 2], wr[:, 2]), np.minimum(wl[:, 3], wr[:, 3]),
    )
    a = shapely.intersection(geometry[left], common)
    b = shapely.intersection(geometry[right], common)
    inter = shapely.area(shapely.intersection(a, b))
    union = shapely.area(a) + shapely.area(b) - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    match = iou >= min_iou
    return np.stack([left[match], right[match]])


def _single_polygon(geometry: shapely.Geometry) -> shapely.Polygon:
    """Fragments that meet only at a corner become one polygon; stray parts are dropped."""
    if geometry.geom_type == "Polygon":
        return geometry
    closed = geometry.buffer(0.5, join_style="mitre").buffer(-0.5, join_style="mitre")
    parts = getattr(closed, "geoms", [closed])
    return max(parts, key=lambda p: p.area)


def merge_seams(candidates: Detections, tiles: dict[int, Tile], min_iou: float = 0.5) -> Detections:
    """Resolve seam candidates to one instance per object (deterministic for a given input)."""
    n = len(candidates)
    if n == 0:
        return candidates
    pairs = match_pairs(candidates, tiles, min_iou)
    graph = coo_matrix((np.ones(pairs.shape[1]), (pairs[0], pairs[1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    lone = sizes[component] == 1
    kept = [np.flatnonzero(lone & (~candidates.cut | candidates.owned))]
    merged: list[Detections] = []
    groups = np.flatnonzero(sizes > 1)
    order = np.argsort(component, kind="stable")
    starts = np.searchsorted(component[order], groups)
    for group, start in zip(groups, starts):
        members = order[start : start + sizes[group]]
        whole = members[~candidates.cut[members]]
        if len(whole):
            kept.append(whole[[np.lexsort((candidates.tile[whole], -candidates.score[whole]))[0]]])
            continue
        best = members[np.lexsort((candidates.tile[members], -candidates.score[members]))[0]]
        union = candidates.take(np.array([best]))
        union.geometry[0] = _single_polygon(shapely.union_all(candidates.geometry[members]))
        union.cut[0] = False
        merged.append(union)
    return Detections.concat([candidates.take(np.sort(np.concatenate(kept)))] + merged)


def assign_order(detections: Detections) -> Detections:
    """Sort instances by position (row, then column of the box centre, then area, class, score).

    The order depends only on geometry and attributes, never on task order or worker count, so
    ``instance_id = position + 1`` is stable across runs.
    """
    if len(detections) == 0:
        return detections
    b = detections.bounds
    cy, cx = np.round((b[:, 1] + b[:, 3]) / 2, 3), np.round((b[:, 0] + b[:, 2]) / 2, 3)
    area = np.round(shapely.area(detections.geometry), 3)
    order = np.lexsort((-detections.score, detections.label, area, cx, cy))
    return detections.take(order)
