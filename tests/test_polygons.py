"""Mask → polygon tracing: exact pixel edges, largest 4-connected part, masks traced together."""

import numpy as np
import pytest
import shapely
from affine import Affine
from rasterio import features
from scipy import ndimage

from pipeline.polygons import mask_to_polygon, masks_to_polygons


def largest_4_connected(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)  # default structure: 4-connectivity
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return labels == 1 + int(np.argmax(sizes))


def burn(polygon: shapely.Polygon, shape: tuple[int, int], row: int, col: int) -> np.ndarray:
    return features.rasterize([polygon], out_shape=shape, transform=Affine.translation(col, row)).astype(bool)


def random_crops(seed: int, count: int, size: int, noise: float = 0.08) -> list[tuple[int, int, np.ndarray]]:
    """Blobs with pepper holes and stray islands, many overlapping their neighbours."""
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        yy, xx = np.mgrid[:h, :w]
        mask = ((yy - h / 2) / (h / 2 + 0.1)) ** 2 + ((xx - w / 2) / (w / 2 + 0.1)) ** 2 < 1
        mask &= rng.random((h, w)) > noise
        crops.append((int(rng.integers(0, size - h)), int(rng.integers(0, size - w)), mask))
    return crops


@pytest.mark.parametrize("seed, noise", [(0, 0.0), (1, 0.08), (2, 0.08), (3, 0.4)])
def test_each_polygon_burns_back_to_its_mask_largest_part(seed, noise):
    size, row, col = 160, 300, 700
    crops = random_crops(seed, 50, size, noise)
    polygons = masks_to_polygons(crops, (size, size), row, col)
    assert len(polygons) == len(crops)
    for (r, c, mask), polygon in zip(crops, polygons):
        if not mask.any():
            assert polygon is None
            continue
        assert polygon.is_valid
        expected = np.zeros((size, size), bool)
        expected[r : r + mask.shape[0], c : c + mask.shape[1]] = largest_4_connected(mask)
        np.testing.assert_array_equal(burn(polygon, (size, size), row, col), expected)
        assert polygon.area == expected.sum()


def test_tracing_together_equals_tracing_alone():
    crops = random_crops(5, 40, 120)
    together = masks_to_polygons(crops, (120, 120), 10, 20)
    alone = [mask_to_polygon(mask, 10 + r, 20 + c) for r, c, mask in crops]
    for a, b in zip(together, alone):
        assert (a is None and b is None) or shapely.equals_exact(shapely.normalize(a), shapely.normalize(b), 0)


def test_holes_kept_and_collinear_vertices_dropped():
    mask = np.ones((5, 6), bool)
    mask[2, 2:4] = False
    polygon = mask_to_polygon(mask, 0, 0)
    assert len(polygon.interiors) == 1 and polygon.area == 28
    assert len(polygon.exterior.coords) == 5  # a rectangle: four corners, closed


def test_empty_masks_give_none():
    assert masks_to_polygons([(0, 0, np.zeros((3, 3), bool)), (1, 1, np.zeros((0, 0), bool))], (8, 8)) == [None, None]


def test_diagonal_pixels_are_separate_regions_and_pinched_holes_stay_valid():
    # two 4-connected regions meeting at a corner: the larger one is kept, alone
    mask = np.zeros((4, 5), bool)
    mask[:2, :2] = True
    mask[2:, 2:] = True
    assert mask_to_polygon(mask, 0, 0).area == 6
    # one ring of pixels around two holes that meet at a corner: valid, holes kept
    ring = np.ones((6, 6), bool)
    ring[2, 2] = ring[3, 3] = False
    polygon = mask_to_polygon(ring, 0, 0)
    assert polygon.is_valid and polygon.area == 34 and len(polygon.interiors) == 2
