"""The seam merge on perfect per-tile detections: every object exactly once, exact geometry."""

import numpy as np
import shapely
from hypothesis import example, given, settings
from hypothesis import strategies as st

from models.synthetic import make_scene
from pipeline.grid import TileGrid
from pipeline.segment import split_seam_candidates, tile_detections
from pipeline.stages import BatchResult, merge_image
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
