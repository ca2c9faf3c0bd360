"""The seam merge on perfect per-tile detections: every object exactly once, exact geometry."""

import numpy as np
import pytest
import shapely
from hypothesis import example, given, settings
from hypothesis import strategies as st

from models.synthetic import make_scene
from pipeline.detections import Detections
from pipeline.grid import TileGrid
from pipeline.segment import split_seam_candidates, tile_detections
from pipeline.stages import BatchResult, SeamState, merge_grid_band, merge_image
from tests.helpers import four_connected, label_polygons, perfect_tile_instances


def merged_from_perfect_tiles(labels, classes, tile_size, overlap):
    grid = TileGrid(*labels.shape, tile_size, overlap)
    results = []
    for tile in grid.tiles:
        final, candidates = split_seam_candidates(tile_detections(perfect_tile_instances(labels, classes, tile), tile), tile)
        results.append(BatchResult(final, candidates, 1, 0))
    return merge_image(results, grid.tiles)


def assert_exact(result, labels, classes):
    truth = label_polygons(labels)
    found = result.detections
    assert len(found) == len(truth)
    tree = shapely.STRtree(found.geometry)
    for instance, polygon in truth.items():
        hits = tree.query(polygon.representative_point(), predicate="intersects")
        assert len(hits) == 1, f"object {instance} found {len(hits)} times"
        k = hits[0]
        assert shapely.symmetric_difference(found.geometry[k], polygon).area == 0
        assert found.label[k] == classes[instance - 1]


def test_scene_with_objects_larger_than_tiles_and_overlap():
    scene = make_scene(3, 900, 1100, density=1.5, size_range=(8, 300))
    labels = four_connected(scene.labels)
    sizes = [max(p.bounds[2] - p.bounds[0], p.bounds[3] - p.bounds[1]) for p in label_polygons(labels).values()]
    assert max(sizes) > 128  # larger than the tile window below, so only fragments exist
    result = merged_from_perfect_tiles(labels, scene.classes, 128, 16)
    assert result.seam_candidates > 0
    assert_exact(result, labels, scene.classes)


def test_object_covering_a_four_tile_corner_is_unioned():
    labels = np.zeros((300, 300), np.int32)
    labels[80:220, 90:210] = 1
    result = merged_from_perfect_tiles(labels, np.array([2], np.int16), 160, 20)
    assert_exact(result, labels, np.array([2]))


def test_interior_objects_pass_straight_through():
    labels = np.zeros((1024, 1024), np.int32)
    labels[10:20, 10:20] = 1  # inside tile (0, 0) only
    labels[500:520, 500:520] = 2  # in the overlap of four tiles
    grid = TileGrid(1024, 1024, 512, 64)
    tile = grid.tiles[0]
    final, candidates = split_seam_candidates(
        tile_detections(perfect_tile_instances(labels, np.array([0, 1], np.int16), tile), tile), tile
    )
    assert len(final) == 1 and len(candidates) == 1


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    tile=st.sampled_from([64, 96, 128, 192]),
    overlap_fraction=st.floats(0.05, 0.45),
    height=st.integers(100, 400),
    width=st.integers(100, 400),
    max_size=st.integers(12, 220),
)
@example(seed=3684, tile=96, overlap_fraction=0.25, height=177, width=177, max_size=12)  # a corner-joined pixel
def test_random_layouts_come_out_exactly_once(seed, tile, overlap_fraction, height, width, max_size):
    scene = make_scene(seed, height, width, density=2.0, size_range=(6, max_size), gap=1)
    # tiles see the shapes as drawn, pixels joined only at a corner included; what comes out is
    # each object as its polygon defines it, once
    result = merged_from_perfect_tiles(scene.labels, scene.classes, tile, int(tile * overlap_fraction))
    assert_exact(result, four_connected(scene.labels), scene.classes)


def _results_by_band(labels, classes, grid, min_tiles, batch_size=1):
    """Batch results per band as ``pipeline.graph`` forms them: batches of ``batch_size`` tiles
    in row-major order, across band boundaries, each merged with the band of its first tile."""
    bands = grid.row_bands(min_tiles)
    results = {band: [] for band in bands}
    for start in range(0, len(grid.tiles), batch_size):
        batch = grid.tiles[start : start + batch_size]
        split = [split_seam_candidates(tile_detections(perfect_tile_instances(labels, classes, t), t), t) for t in batch]
        band = next(b for b in bands if b.start <= batch[0].row < b.stop)
        results[band].append(BatchResult(*(Detections.concat(parts) for parts in zip(*split)), len(batch), 0))
    return results


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    tile=st.sampled_from([48, 64, 96]),
    overlap_fraction=st.floats(0.05, 0.45),
    height=st.integers(150, 500),
    width=st.integers(100, 300),
    max_size=st.integers(12, 260),
    min_tiles=st.integers(1, 12),
    batch_size=st.integers(1, 7),
)
@example(seed=0, tile=64, overlap_fraction=0.25, height=161, width=100, max_size=15, min_tiles=1, batch_size=7)  # a batch over 3 tile rows
def test_merging_band_by_band_releases_the_whole_image_merge_in_order(seed, tile, overlap_fraction, height, width, max_size, min_tiles, batch_size):
    """Objects taller than several bands stay pending across them, and a batch may end in the
    band after its first tile's; what is released, band by band, is exactly the in-memory merge,
    ids included, and nothing is left behind."""
    scene = make_scene(seed, height, width, density=2.0, size_range=(6, max_size), gap=1)
    grid = TileGrid(height, width, tile, int(tile * overlap_fraction))
    by_band = _results_by_band(scene.labels, scene.classes, grid, min_tiles, batch_size)
    whole = merge_image([r for results in by_band.values() for r in results], grid).detections
    state, released = SeamState.start(), []
    for band, results in by_band.items():
        state, out = merge_grid_band(state, results, grid, band)
        released.append(out)
    streamed = Detections.concat(released)
    assert len(state.pending) == len(state.held) == 0 and state.numbered == len(whole)
    assert len(streamed) == len(whole)
    assert shapely.equals_exact(streamed.geometry, whole.geometry, 0).all()
    assert (streamed.label == whole.label).all() and (streamed.tile == whole.tile).all()


def test_only_about_one_band_is_held_at_a_time():
    scene = make_scene(11, 1200, 300, density=1.5, size_range=(8, 40))
    grid = TileGrid(1200, 300, 128, 16)
    state, held = SeamState.start(), []
    for band, results in _results_by_band(scene.labels, scene.classes, grid, 3).items():
        state, _ = merge_grid_band(state, results, grid, band)
        held.append(len(state.held) + len(state.pending))
    total = len(label_polygons(four_connected(scene.labels)))
    assert len(held) == len(grid.row_bands(3)) > 8
    assert max(held) < total / 4


def _tile_instances(masks, boxes=None):
    """Instances from (row, col, mask) in window pixels, boxed by their masks unless ``boxes`` given."""
    from models.inference import MaskCrop, TileInstances

    crops = [MaskCrop(r, c, m) for r, c, m in masks]
    if boxes is None:
        boxes = [[c, r, c + m.shape[1], r + m.shape[0]] for r, c, m in masks]
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    return TileInstances(boxes, np.zeros(len(crops), np.int16), np.ones(len(crops), np.float32), crops)


def _tile_result(tile, masks, boxes=None):
    """A tile's detections from (row, col, mask) in window pixels, as a segment task returns them."""
    instances = _tile_instances(masks, boxes)
    final, candidates = split_seam_candidates(tile_detections(instances, tile), tile)
    return BatchResult(final, candidates, 1, 0)


@pytest.mark.parametrize("width", [2, 3])  # IoU with the whole one in the shared pixels: 0.4 (no match), 0.6
def test_a_sliver_stopping_short_of_the_window_edge_yields_to_the_tile_that_owns_it(width):
    """The model in the left tile sees the object reach its window edge but draws it short: an
    uncut sliver outside that tile's core. The right tile, whose core holds it, has it whole."""
    left, right = TileGrid(100, 184, 100, 16).tiles  # windows x 0-100 and 84-184, cores split at x 92
    sliver = (40, 95, np.ones((20, width), bool))  # from x 95 in the left window
    whole = (40, 11, np.ones((20, 16), bool))  # x 95-111 in the right window
    merged = merge_image([_tile_result(left, [sliver]), _tile_result(right, [whole])], [left, right]).detections
    assert len(merged) == 1 and merged.geometry[0].equals(shapely.box(95, 40, 111, 60))

    # the right tile found nothing there: the sliver is all there is, and stays
    alone = merge_image([_tile_result(left, [sliver]), _tile_result(right, [])], [left, right]).detections
    assert len(alone) == 1 and alone.geometry[0].equals(shapely.box(95, 40, 95 + width, 60))

    # a different object beside it in the right tile only touches it: both stay
    beside = (40, 14, np.ones((20, 10), bool))  # x 98-108
    both = merge_image([_tile_result(left, [sliver]), _tile_result(right, [beside])], [left, right]).detections
    assert len(both) == 2


def test_a_blob_over_two_objects_near_a_window_edge_yields_to_the_tile_that_tells_them_apart():
    """Seen on MoNuSeg at 256² tiles: near its window's edge a tile drew one blob over two nuclei
    (uncut, outside its core); the tile whose core holds it drew both. The blob holds each whole,
    each holds under half of it, no pair matches (IoU 0.45): it stood as a duplicate over both."""
    left, right = TileGrid(100, 184, 100, 16).tiles  # windows x 0-100 and 84-184, cores split at x 92
    blob = (30, 93, np.ones((40, 4), bool))  # x 93-97, rows 30-70 in the left window: 3 px short of its edge
    pair = [(30, 9, np.ones((18, 4), bool)), (52, 9, np.ones((18, 4), bool))]  # the same columns, rows 30-48 and 52-70
    merged = merge_image([_tile_result(left, [blob]), _tile_result(right, pair)], [left, right]).detections
    assert sorted(g.bounds for g in merged.geometry) == [(93, 30, 97, 48), (93, 52, 97, 70)]


def test_a_fragment_whose_box_reaches_the_window_edge_is_cut_though_its_mask_stops_short():
    """Found at 20,000² and on MoNuSeg: the model drew an object its window's edge cut up to 0.4–1 px
    short of the edge (box and mask). Taken as uncut, such a piece outlived the merge beside the
    next tile's whole copy."""
    left, right = TileGrid(100, 184, 100, 16).tiles  # windows x 0-100 and 84-184, cores split at x 92
    sliver = (40, 95, np.ones((20, 4), bool))  # x 95-99, one column short of the window edge
    box = [[95.2, 40, 99.6, 60]]
    assert tile_detections(_tile_instances([sliver], box), left).cut.tolist() == [True]
    short = (40, 94, np.ones((20, 4), bool))  # x 94-98: two columns short
    assert tile_detections(_tile_instances([short], [[94.2, 40, 97.99, 60]]), left).cut.tolist() == [False]
    assert tile_detections(_tile_instances([short], [[94.2, 40, 98.01, 60]]), left).cut.tolist() == [True]  # box
    assert tile_detections(_tile_instances([sliver], [[95.2, 40, 97.9, 60]]), left).cut.tolist() == [True]  # mask
    top = (1, 30, np.ones((5, 5), bool))  # rows 1-6 of the right window; its top is the image border
    assert tile_detections(_tile_instances([top], [[30, 1.2, 35, 6]]), right).cut.tolist() == [False]
    assert tile_detections(_tile_instances([(1, 1, np.ones((5, 5), bool))]), right).cut.tolist() == [True]  # left edge
    # at the image border no neighbour sees on: the same reach is no cut
    at_border = (40, 95, np.ones((20, 4), bool))  # x 179-183 of the right window, which ends the image
    assert tile_detections(_tile_instances([at_border], box), right).cut.tolist() == [False]

    whole = (40, 14, np.ones((20, 30), bool))  # x 98-128: covers a quarter of the sliver, IoU 0.2 in x 84-100
    merged = merge_image([_tile_result(left, [sliver], box), _tile_result(right, [whole])], [left, right]).detections
    assert len(merged) == 1 and merged.geometry[0].equals(shapely.box(98, 40, 128, 60))


def test_a_clip_that_leaves_a_line_along_the_window_edge_does_not_break_the_merge(monkeypatch):
    """Found at 20,000²: a candidate whose outline runs along the shared window's edge from outside
    clips to a polygon plus a line, and GEOS refused to intersect that with an empty clip."""
    from pipeline import merge
    from pipeline.detections import Detections

    tiles = {t.index: t for t in TileGrid(184, 184, 100, 16).tiles}  # windows 0-100 and 84-184; shared corner 84-100
    a = shapely.union(shapely.box(50, 50, 100, 90), shapely.box(50, 90, 84, 95))  # tile 0; runs along x = 84
    b = shapely.union(shapely.box(101, 84, 150, 150), shapely.box(84, 101, 150, 150))  # tile 3; misses the corner
    assert shapely.intersection(a, shapely.box(84, 84, 100, 100)).geom_type == "GeometryCollection"
    candidates = Detections(
        geometry=np.array([a, b], object), label=np.zeros(2, np.int16), score=np.ones(2, np.float32),
        tile=np.array([0, 3], np.int32), cut=np.ones(2, bool), owned=np.ones(2, bool),
    )
    monkeypatch.setattr(merge, "MAX_TERMS_PER_PAIR", 0)  # every pair through GEOS
    assert merge.match_pairs(candidates, tiles, 0.5).shape == (2, 0)
