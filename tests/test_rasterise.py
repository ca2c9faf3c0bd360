import numpy as np
import pytest
import shapely
from affine import Affine
from rasterio import features

from models.synthetic import make_scene
from pipeline.grid import Span
from pipeline.polygons import trace_labels
from pipeline.rasterise import burn_polygons


def gdal(geometry, values, rows: Span, cols: Span) -> np.ndarray:
    """rasterio's (GDAL's) rasterize, pixel centres, the later polygon over the earlier."""
    return features.rasterize(
        zip(geometry, values.tolist()), out_shape=(rows.length, cols.length),
        transform=Affine.translation(cols.start, rows.start), fill=0, all_touched=False, dtype="uint32",
    )


def random_polygons(rng, n: int) -> np.ndarray:
    """Star-shaped polygons with float vertices, some with holes, some MultiPolygons, overlapping
    each other and the window's edges."""
    out = []
    while len(out) < n:
        cx, cy, radius = *rng.uniform(-20, 220, 2), rng.uniform(0.4, 30)
        angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 12)))
        reach = radius * rng.uniform(0.3, 1, len(angles))
        polygon = shapely.make_valid(shapely.Polygon(np.column_stack([cx + reach * np.cos(angles), cy + reach * np.sin(angles)])))
        if rng.random() < 0.3:
            polygon = polygon.difference(shapely.Point(cx, cy).buffer(radius * 0.25))
        if rng.random() < 0.1:
            polygon = shapely.union(polygon, shapely.box(cx + 40, cy, cx + 45.5, cy + 7.2))
        if polygon.geom_type in ("Polygon", "MultiPolygon") and not polygon.is_empty:
            out.append(polygon)
    return np.array(out, object)


@pytest.mark.parametrize("seed", range(6))
def test_float_polygons_burn_as_gdal_burns_them(seed):
    rng = np.random.default_rng(seed)
    geometry = random_polygons(rng, 150)
    values = rng.permutation(len(geometry)) + 1
    rows, cols = Span(13, 190), Span(7, 203)
    expected = gdal(geometry, values, rows, cols)
    assert len(np.unique(expected)) > 50  # many polygons, overlapping, holes: a real comparison
    assert (burn_polygons(geometry, values, rows, cols) == expected).all()


def test_pixel_edge_polygons_give_back_their_label_image():
    """Polygons traced from a label image (as the pipeline's are) burn back to it exactly: a hole,
    an object inside the hole, objects touching at a corner, a window cutting objects."""
    labels = np.zeros((60, 80), np.int32)
    labels[10:40, 10:50] = 1
    labels[18:30, 20:35] = 0
    labels[20:25, 22:30] = 2
    labels[45:50, 60:79] = 3
    labels[50:55, 55:60] = 4  # meets 3 at a corner only
    values, polygons = trace_labels(labels)
    polygons = np.asarray(polygons, object)
    assert sum(len(p.interiors) for p in polygons) == 1
    assert (burn_polygons(polygons, values, Span(0, 60), Span(0, 80)) == labels).all()
    assert (burn_polygons(polygons, values, Span(15, 52), Span(21, 58)) == labels[15:52, 21:58]).all()


def test_many_pixel_edge_polygons_burn_as_gdal_burns_them():
    scene = make_scene(3, 700, 900, density=30, size_range=(6, 30), gap=0)
    values, polygons = trace_labels(scene.labels)
    polygons = np.asarray(polygons, object)
    values = np.random.default_rng(0).permutation(values)
    for rows, cols in ((Span(0, 700), Span(0, 900)), (Span(300, 450), Span(512, 900))):
        assert (burn_polygons(polygons, values, rows, cols) == gdal(polygons, values, rows, cols)).all()


def test_overlaps_go_to_the_later_polygon_and_other_types_burn_nothing():
    geometry = np.array([shapely.box(0, 0, 6, 6), shapely.box(3, 3, 9, 9), shapely.LineString([(0, 9.5), (9, 9.5)]), shapely.Point(1, 9.5), None], object)
    burnt = burn_polygons(geometry, np.array([7, 9, 5, 4, 3]), Span(0, 10), Span(0, 10), dtype="uint8")
    assert burnt.dtype == np.uint8
    assert (burnt[:3, :6] == 7).all() and (burnt[3:9, 3:9] == 9).all() and burnt[9:].sum() == 0 and burnt[3:6, :3].min() == 7
    assert burn_polygons(geometry[:0], np.array([], int), Span(0, 4), Span(0, 5)).shape == (4, 5)
