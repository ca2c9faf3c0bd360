"""The seam merge: one instance per object from per-tile detections.

Only seam candidates (instances a neighbouring tile may also have seen) take part, so the cost
grows with the instances near seams, not with the image. Two candidates from different tiles
are the same object when their IoU *inside the pixels both windows read* passes a threshold:
both tiles saw exactly those pixels, so copies and fragments of one object agree there even
when the object is far larger than the overlap. Each connected group of matches becomes one
instance: the best copy no tile edge cut, or else the union of the fragments.

Pixel-edge polygons are rectilinear, so those IoUs are computed exactly from the polygons'
vertical edges, vectorised over all pairs (GEOS overlays cost ~0.15 ms a pair; see
BENCHMARKS.md); other geometries go through GEOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.detections import Detections
from pipeline.grid import Tile


MAX_TERMS_PER_PAIR = 4096  # larger pairs of outlines go through GEOS (cost ~ n log n, not n²)


@dataclass
class _Edges:
    """The vertical edges of the rectilinear polygons among some geometries, grouped by polygon.

    Polygon ``k``'s edges are ``first[k]:first[k] + count[k]`` (count 0: not rectilinear, not a
    polygon or empty — GEOS handles those). Each edge runs at ``x`` over ``[y0, y1)`` with
    ``weight`` ±1, so that inside row band ``y`` the polygon's indicator is
    ``Σ weight · H(x' - x)`` over the edges spanning ``y`` (shell +1, holes −1).
    """

    x: np.ndarray
    y0: np.ndarray
    y1: np.ndarray
    weight: np.ndarray
    first: np.ndarray
    count: np.ndarray


def _rectilinear_edges(geometry: np.ndarray) -> _Edges:
    n = len(geometry)
    polygon = (shapely.get_type_id(geometry) == 3) & (shapely.get_num_coordinates(geometry) > 0)
    holed = polygon & (shapely.get_num_interior_rings(geometry) > 0)
    simple = np.flatnonzero(polygon & ~holed)  # one ring each: no ring geometries to build
    rings, of_holed = shapely.get_rings(geometry[holed], return_index=True)
    ring_polygon = np.concatenate([simple, np.flatnonzero(holed)[of_holed]])
    is_shell = np.concatenate([np.ones(len(simple), bool), np.diff(of_holed, prepend=-1) != 0])
    parts = np.concatenate([geometry[simple], rings])
    coords = shapely.get_coordinates(parts)
    ring_of_coord = np.repeat(np.arange(len(parts)), shapely.get_num_coordinates(parts))
    start = np.flatnonzero(np.diff(ring_of_coord, append=-1) == 0)  # segment start: next coord in the same ring
    ring = ring_of_coord[start]
    x, y = coords[start, 0], coords[start, 1]
    dx, dy = coords[start + 1, 0] - x, coords[start + 1, 1] - y
    skew = np.bincount(ring_polygon[ring], weights=(dx != 0) & (dy != 0), minlength=n) > 0
    vertical = (dx == 0) & (dy != 0) & ~skew[ring_polygon[ring]]
    x, y, dy, ring = x[vertical], y[vertical], dy[vertical], ring[vertical]
    # ∮ x dy is the ring's signed area; shells count +1 inside, holes −1, whatever their orientation
    orientation = np.sign(np.bincount(ring, weights=x * dy, minlength=len(parts)))
    weight = -np.sign(dy) * orientation[ring] * np.where(is_shell[ring], 1.0, -1.0)
    owner = ring_polygon[ring]  # each polygon's edges are contiguous
    count = np.bincount(owner, minlength=n)
    first = np.zeros(n, np.int64)
    starts = np.flatnonzero(np.diff(owner, prepend=-1) != 0)
    first[owner[starts]] = starts
    y0 = np.minimum(y, y + dy)
    return _Edges(x, y0, y0 + np.abs(dy), weight, first, count)


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, k): for each owner i, ``counts[i]`` rows numbered k = 0 … counts[i] − 1."""
    owner = np.repeat(np.arange(len(counts)), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return owner, np.arange(len(owner)) - starts[owner]


def _chunks(terms: np.ndarray, chunk: int):
    """Consecutive index ranges whose ``terms`` add up to about ``chunk`` (bounded memory)."""
    bounds = np.concatenate([[0], np.cumsum(terms)])
    start = 0
    while start < len(terms):
        stop = int(np.searchsorted(bounds, bounds[start] + chunk, side="right")) - 1
        stop = min(max(stop, start + 1), len(terms))
        yield np.arange(start, stop)
        start = stop


def _clipped_areas(edges: _Edges, k: np.ndarray, box: np.ndarray, chunk: int = 1_000_000) -> np.ndarray:
    """Area of polygon ``k[i]`` inside ``box[i]`` (x0, y0, x1, y1), from its vertical edges."""
    out = np.zeros(len(k))
    for index in _chunks(edges.count[k], chunk):
        pair, local = _expand(edges.count[k[index]])
        e = edges.first[k[index]][pair] + local
        b = box[index][pair]
        rows = np.clip(np.minimum(edges.y1[e], b[:, 3]) - np.maximum(edges.y0[e], b[:, 1]), 0, None)
        width = np.clip(b[:, 2] - np.maximum(edges.x[e], b[:, 0]), 0, None)
        out[index] = np.bincount(pair, weights=edges.weight[e] * rows * width, minlength=len(index))
    return out


def _clipped_intersections(edges: _Edges, a: np.ndarray, b: np.ndarray, box: np.ndarray, chunk: int = 1_000_000) -> np.ndarray:
    """Area of (polygon ``a[i]`` ∩ polygon ``b[i]`` ∩ ``box[i]``), exactly, for rectilinear polygons.

    In each row band both indicators are sums of steps at their vertical edges, so the area is
    Σ over edge pairs (e, f) of w_e w_f · (rows both span inside the box) · (box right − the
    rightmost of x_e, x_f and box left).
    """
    out = np.zeros(len(a))
    for index in _chunks(edges.count[a] * edges.count[b], chunk):
        pair, local = _expand(edges.count[a[index]] * edges.count[b[index]])
        nb = edges.count[b[index]][pair]
        e = edges.first[a[index]][pair] + local // nb
        f = edges.first[b[index]][pair] + local % nb
        pair_box = box[index][pair]
        rows = np.clip(
            np.minimum(np.minimum(edges.y1[e], edges.y1[f]), pair_box[:, 3])
            - np.maximum(np.maximum(edges.y0[e], edges.y0[f]), pair_box[:, 1]),
            0, None,
        )
        width = np.clip(pair_box[:, 2] - np.maximum(np.maximum(edges.x[e], edges.x[f]), pair_box[:, 0]), 0, None)
        out[index] = np.bincount(pair, weights=edges.weight[e] * edges.weight[f] * rows * width, minlength=len(index))
    return out


def match_pairs(candidates: Detections, tiles: dict[int, Tile], min_iou: float) -> np.ndarray:
    """(2, m) indices of candidate pairs from different tiles that are one object.

    Their IoU is measured inside the pixels both windows read. Pixel-edge polygons (what
    ``mask_to_polygon`` returns) are rectilinear, so areas come exactly from their vertical edges,
    vectorised over all pairs; other geometries (and very large outlines) go through GEOS.
    """
    geometry = candidates.geometry
    # envelopes only: pairs that merely touch have IoU 0 and never pass a positive threshold
    left, right = shapely.STRtree(geometry).query(geometry, predicate="intersects" if min_iou <= 0 else None)
    keep = (left < right) & (candidates.tile[left] != candidates.tile[right])
    left, right = left[keep], right[keep]
    if len(left) == 0:
        return np.empty((2, 0), np.intp)
    ids = np.array(sorted(tiles))
    windows = np.array([tiles[i].bounds for i in ids], float)
    wl = windows[np.searchsorted(ids, candidates.tile[left])]
    wr = windows[np.searchsorted(ids, candidates.tile[right])]
    common = np.concatenate([np.maximum(wl[:, :2], wr[:, :2]), np.minimum(wl[:, 2:], wr[:, 2:])], axis=1)
    used, index = np.unique(np.concatenate([left, right]), return_inverse=True)
    a, b = index[: len(left)], index[len(left) :]
    edges = _rectilinear_edges(geometry[used])
    fast = (edges.count[a] > 0) & (edges.count[b] > 0) & (edges.count[a] * edges.count[b] <= MAX_TERMS_PER_PAIR)
    area_a, area_b, inter = np.zeros(len(a)), np.zeros(len(a)), np.zeros(len(a))
    if fast.any():
        area_a[fast] = _clipped_areas(edges, a[fast], common[fast])
        area_b[fast] = _clipped_areas(edges, b[fast], common[fast])
        # an upper bound first: the clipped boxes' overlap over the larger clipped area
        bl, br = shapely.bounds(geometry[left[fast]]), shapely.bounds(geometry[right[fast]])
        lo = np.maximum(np.maximum(bl[:, :2], br[:, :2]), common[fast, :2])
        hi = np.minimum(np.minimum(bl[:, 2:], br[:, 2:]), common[fast, 2:])
        box_overlap = np.prod(np.clip(hi - lo, 0, None), axis=1)
        larger = np.maximum(area_a[fast], area_b[fast])
        bound = np.divide(box_overlap, larger, out=np.zeros_like(larger), where=larger > 0)
        exact = np.flatnonzero(fast)[(box_overlap > 0) & ((bound >= min_iou - 1e-9) | (min_iou <= 0))]
        inter[exact] = _clipped_intersections(edges, a[exact], b[exact], common[exact])
    slow = np.flatnonzero(~fast)
    if len(slow):
        box = shapely.box(*common[slow].T)
        ga = _polygonal(shapely.intersection(geometry[left[slow]], box))
        gb = _polygonal(shapely.intersection(geometry[right[slow]], box))
        inter[slow] = shapely.area(shapely.intersection(ga, gb))
        area_a[slow], area_b[slow] = shapely.area(ga), shapely.area(gb)
    union = area_a + area_b - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    match = iou >= min_iou
    return np.stack([left[match], right[match]])


def _polygonal(geometry: np.ndarray) -> np.ndarray:
    """Each geometry's polygonal part, replaced in ``geometry`` (a fresh array of clips). A polygon
    clipped to a window whose edge it runs along outside becomes a collection with a line, which
    GEOS cannot intersect with an empty polygon."""
    mixed = shapely.get_type_id(geometry) == shapely.GeometryType.GEOMETRYCOLLECTION
    geometry[mixed] = shapely.buffer(geometry[mixed], 0)
    return geometry


def _single_polygon(geometry: shapely.Geometry) -> shapely.Polygon:
    """Fragments that meet only at a corner become one polygon; stray parts are dropped."""
    if geometry.geom_type == "Polygon":
        return geometry
    closed = geometry.buffer(0.5, join_style="mitre").buffer(-0.5, join_style="mitre")
    parts = getattr(closed, "geoms", [closed])
    return max(parts, key=lambda p: p.area)


def seen_whole_elsewhere(bounds: np.ndarray, member_tiles: np.ndarray, tiles: dict[int, Tile]) -> np.ndarray:
    """Per group of fragments: did a tile none of them came from hold all of it in its window,
    clear of the window's interior edges? That tile saw the place whole; its detections speak for it.

    ``bounds`` (g, 4) are each group's extent; ``member_tiles`` pairs (group index, tile index).
    """
    ids = np.array(sorted(tiles))
    windows = np.array([tiles[i].bounds for i in ids], float)
    interior = np.array([tiles[i].interior for i in ids], bool)
    inside, window = shapely.STRtree(shapely.box(*windows.T)).query(shapely.box(*bounds.T), predicate="within")
    b, w, edge = bounds[inside], windows[window], interior[window]
    clear = (
        (~edge[:, 0] | (b[:, 0] > w[:, 0]))
        & (~edge[:, 1] | (b[:, 1] > w[:, 1]))
        & (~edge[:, 2] | (b[:, 2] < w[:, 2]))
        & (~edge[:, 3] | (b[:, 3] < w[:, 3]))
    )
    width = max(int(ids.max()), int(member_tiles[1].max(initial=0))) + 1
    clear &= ~np.isin(inside * width + ids[window], member_tiles[0] * width + member_tiles[1])
    seen = np.zeros(len(bounds), bool)
    seen[inside[clear]] = True
    return seen


def overruled_by_core_owner(candidates: Detections, index: np.ndarray, tiles: dict[int, Tile]) -> np.ndarray:
    """Per candidate ``index[i]``: does a detection of the tile whose core holds its box centre
    cover at least half of it, or lie at least half inside it? That tile saw the place further from
    its window's edges (a model that stops a few pixels short of a window edge leaves an uncut
    sliver of an object there, or a blob across two nuclei that the core's tile tells apart)."""
    if len(index) == 0:
        return np.zeros(0, bool)
    ids = np.array(sorted(tiles))
    cores = np.array([tiles[i].core_bounds for i in ids], float)
    b = candidates.bounds[index]
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    at, core = shapely.STRtree(shapely.box(*cores.T)).query(shapely.points(cx, cy), predicate="intersects")
    x0, y0, x1, y1 = cores[core].T
    inside = (cx[at] >= x0) & (cx[at] < x1) & (cy[at] >= y0) & (cy[at] < y1)  # cores are half-open, as ``owned``
    owner = np.full(len(index), -1)
    owner[at[inside]] = ids[core[inside]]
    k, other = shapely.STRtree(candidates.geometry).query(candidates.geometry[index], predicate="intersects")
    keep = (candidates.tile[other] == owner[k]) & (candidates.tile[other] != candidates.tile[index[k]])
    k, other = k[keep], other[keep]
    shared = shapely.area(shapely.intersection(candidates.geometry[index[k]], candidates.geometry[other]))
    covered = (shared >= 0.5 * shapely.area(candidates.geometry[index[k]])) | (shared >= 0.5 * shapely.area(candidates.geometry[other]))
    overruled = np.zeros(len(index), bool)
    overruled[k[covered]] = True
    return overruled


def merge_seams(
    candidates: Detections, tiles: dict[int, Tile], min_iou: float = 0.5, horizon: float = np.inf
) -> tuple[Detections, Detections]:
    """(merged, pending): seam candidates resolved to one instance per object (deterministic for a
    given input), and those whose group a window still to come may join.

    ``horizon`` is the top row of every window still to come (none: ``inf``). A group with a member
    reaching below it stays pending: a later candidate can overlap it, or its tile's core owner
    may not have been seen. Every other group is complete, whatever comes later.

    Matching candidates form groups. A group keeps its best copy that no tile edge cut (one in its
    tile's core before a higher score); a lone one outside its tile's core goes when the tile whose
    core holds it has it half covered, or holds half of one of that tile's detections. When every
    member is cut, the union of its fragments is kept,
    unless another tile saw that place whole (then the piece is an arm cut off an object, or a
    pixel joined to one at a corner, that the whole view already decided on); a fragment matching
    nothing must also lie in its tile's core.
    """
    n = len(candidates)
    if n == 0:
        return candidates, candidates
    pairs = match_pairs(candidates, tiles, min_iou)
    graph = coo_matrix((np.ones(pairs.shape[1]), (pairs[0], pairs[1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    open_group = np.zeros(len(sizes), bool)
    open_group[component[candidates.bounds[:, 3] > horizon]] = True
    pending = candidates.take(np.flatnonzero(open_group[component]))
    # per group, members ranked: uncut first, then those their tile's core holds (seen furthest
    # from the window's edges), then higher score, lower tile, lower index
    ranked = np.lexsort((candidates.tile, -candidates.score, ~candidates.owned, candidates.cut, component))
    first = ranked[np.flatnonzero(np.diff(component[ranked], prepend=-1))]
    first = first[~open_group[component[first]]]
    whole = first[~candidates.cut[first]]  # the best copy no tile edge cut
    stray = (sizes[component[whole]] == 1) & ~candidates.owned[whole]
    whole = np.setdiff1d(whole, whole[stray][overruled_by_core_owner(candidates, whole[stray], tiles)])
    fragments = first[candidates.cut[first]]  # every member cut
    fragments = fragments[(sizes[component[fragments]] > 1) | candidates.owned[fragments]]
    groups = component[fragments]  # ascending, as ``first`` is
    members = starts = np.empty(0, np.intp)
    if len(fragments):
        members = np.flatnonzero(np.isin(component, groups))
        members = members[np.argsort(component[members], kind="stable")]
        starts = np.searchsorted(component[members], groups)
        member_bounds = shapely.bounds(candidates.geometry[members])
        extent = np.concatenate(
            [np.minimum.reduceat(member_bounds[:, :2], starts), np.maximum.reduceat(member_bounds[:, 2:], starts)], axis=1
        )
        member_tiles = np.stack([np.searchsorted(groups, component[members]), candidates.tile[members]])
        keep = ~seen_whole_elsewhere(extent, member_tiles, tiles)
        fragments, groups, starts = fragments[keep], groups[keep], starts[keep]
    lone = sizes[component[fragments]] == 1
    merged = [candidates.take(np.sort(np.concatenate([whole, fragments[lone]])))]
    for best, group, start in zip(fragments[~lone], groups[~lone], starts[~lone]):  # union the fragments
        union = candidates.take(np.array([best]))
        union.geometry[0] = _single_polygon(shapely.union_all(candidates.geometry[members[start : start + sizes[group]]]))
        union.cut[0] = False
        merged.append(union)
    return Detections.concat(merged), pending


def box_centres(detections: Detections) -> tuple[np.ndarray, np.ndarray]:
    """(column, row) of each box centre, rounded as ``assign_order`` ranks them."""
    b = detections.bounds
    return np.round((b[:, 0] + b[:, 2]) / 2, 3), np.round((b[:, 1] + b[:, 3]) / 2, 3)


def assign_order(detections: Detections) -> Detections:
    """Sort instances by position (row, then column of the box centre, then area, class, score).

    The order depends only on geometry and attributes, never on task order or worker count, so
    ``instance_id = position + 1`` is stable across runs.
    """
    if len(detections) == 0:
        return detections
    cx, cy = box_centres(detections)
    area = np.round(shapely.area(detections.geometry), 3)
    order = np.lexsort((-detections.score, detections.label, area, cx, cy))
    return detections.take(order)
