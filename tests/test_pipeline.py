"""End to end on generated GeoTIFFs with known objects, with the shipped model."""

import sqlite3
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import dask
import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
import shapely

from models.card import load_card
from models.inference import Segmenter
from models.registry import resolve_model_dir
from models.synthetic import make_scene
from pipeline.graph import Tiling, image_graph
from pipeline.grid import Span, Tile, TileGrid
from pipeline.segment import split_seam_candidates, tile_detections
from pipeline.sources import open_raster, pixel_size_m
from pipeline.stages import BatchResult, merge_image
from pipeline.synthetic_raster import write_geotiff
from pipeline.streaming import finish_image, merge_step, start_image
from pipeline.writers import to_source_crs
from tests.helpers import label_polygons, match_f1, perfect_tile_instances, seam_errors

MODEL = resolve_model_dir()
CARD = load_card(MODEL)


def run_pipeline(path, out, tile_size=512, overlap=64, batch_size=4, scheduler="sync", **source_kwargs):
    source = open_raster(path, **source_kwargs)
    graph = image_graph(source, str(MODEL), CARD.classes, out, Tiling(tile_size, overlap, batch_size))
    (summary,) = dask.compute(graph.result, scheduler=scheduler)
    return summary, gpd.read_file(out / "instances.gpkg", layer="instances")


def pixel_geometry(frame, path):
    with rasterio.open(path) as dataset:
        inverse = ~dataset.transform
    a, b, c, d, e, f = inverse[:6]
    matrix = np.array([[a, d], [b, e]])
    return shapely.transform(frame.geometry.values, lambda xy: xy @ matrix + np.array([c, f]))


@pytest.fixture(scope="module")
def seam_scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("seams")
    scene = make_scene(2024, 1400, 1300, density=1.4, size_range=(10, 150))
    path = write_geotiff(scene.image, root / "scene.tif")
    summary, frame = run_pipeline(path, root / "out")
    return scene, path, summary, frame


def test_every_object_found_once_across_seams(seam_scene):
    scene, path, summary, frame = seam_scene
    truth = np.array(list(label_polygons(scene.labels).values()))
    grid = TileGrid(1400, 1300, 512, 64)
    seams = shapely.union_all([shapely.box(*t.bounds).exterior for t in grid.tiles])
    straddling = shapely.intersects(truth, seams).sum()
    larger_than_overlap = (shapely.bounds(truth)[:, 2:] - shapely.bounds(truth)[:, :2]).max(1) > 64
    assert straddling >= 15 and (larger_than_overlap & shapely.intersects(truth, seams)).sum() >= 3
    predicted = pixel_geometry(frame, path)
    assert seam_errors(predicted, truth) == (0, 0)
    assert match_f1(predicted, truth) >= 0.85
    assert summary["seam_candidates"] > 0


def test_tiled_output_agrees_with_whole_image_inference(seam_scene):
    scene, path, _, frame = seam_scene
    height, width = scene.labels.shape
    whole_tile = Tile(0, 0, 0, Span(0, height), Span(0, width), Span(0, height), Span(0, width), (0, 0, 0, 0))
    instances = Segmenter(MODEL, device="cpu")(scene.image[None])[0]
    whole = tile_detections(instances, whole_tile).geometry
    assert match_f1(pixel_geometry(frame, path), whole) >= 0.97


def test_polygons_land_on_their_objects_in_the_source_crs(seam_scene):
    scene, path, _, frame = seam_scene
    with rasterio.open(path) as dataset:
        assert frame.crs == dataset.crs
        pixel = abs(dataset.transform.a)
        bounds = dataset.bounds
    truth = np.array(list(label_polygons(scene.labels).values()))
    source = open_raster(path)
    truth_crs = to_source_crs(truth, source)
    tree = shapely.STRtree(truth_crs)
    found, true = tree.query(frame.geometry.values, predicate="intersects")
    iou = shapely.area(shapely.intersection(frame.geometry.values[found], truth_crs[true])) / shapely.area(
        shapely.union(frame.geometry.values[found], truth_crs[true])
    )
    good = iou >= 0.5
    offsets = shapely.distance(shapely.centroid(frame.geometry.values[found[good]]), shapely.centroid(truth_crs[true[good]]))
    assert np.median(offsets) <= pixel
    assert frame.total_bounds[0] >= bounds.left and frame.total_bounds[2] <= bounds.right
    assert frame.total_bounds[1] >= bounds.bottom and frame.total_bounds[3] <= bounds.top


def test_perfect_detections_written_exactly_in_crs(tmp_path):
    scene = make_scene(5, 700, 900, density=1.5)
    path = write_geotiff(scene.image, tmp_path / "exact.tif")
    source = open_raster(path)
    grid = TileGrid(700, 900, 256, 32)
    results = {}
    for tile in grid.tiles:
        dets = tile_detections(perfect_tile_instances(scene.labels, scene.classes, tile), tile)
        results[tile.index] = BatchResult(*split_seam_candidates(dets, tile), 1, 0)
    parts = tmp_path / "out" / ".instances-parts.test"
    stream = start_image(parts, len(CARD.classes), 700, 900, None)
    for band in grid.row_bands(4):  # one tile row a band: several parts, objects pending across them
        in_band = [results[t.index] for t in grid.tiles_in_rows(band)]
        stream = merge_step(stream, in_band, grid, band, 0.5, source, CARD.classes, parts, None)
    summary = finish_image(stream, source, CARD.classes, tmp_path / "out", parts, {}, None, None)
    assert len(stream.parts) == 3 and not parts.exists()
    frame = gpd.read_file(tmp_path / "out" / "instances.gpkg", layer="instances")
    whole = merge_image(list(results.values()), grid).detections
    assert summary["instances"] == len(whole) and (frame["instance_id"] == np.arange(1, len(whole) + 1)).all()
    same = shapely.equals_exact(shapely.normalize(pixel_geometry(frame, path)), shapely.normalize(whole.geometry), 1e-6)
    assert same.all()  # same ids as in memory, same vertices (outputs turn exteriors counter-clockwise)
    truth = to_source_crs(np.array(list(label_polygons(scene.labels).values())), source)
    with rasterio.open(path) as dataset:
        cell = abs(dataset.transform.a * dataset.transform.e)
    assert len(frame) == len(truth)
    tree = shapely.STRtree(frame.geometry.values)
    for polygon in truth:
        (k,) = tree.query(polygon.representative_point(), predicate="intersects")
        assert shapely.symmetric_difference(frame.geometry.values[k], polygon).area < 1e-6 * cell
    assert np.allclose(frame["area"], frame["area_px"] * cell)


def test_counts_equal_polygons_per_class(seam_scene):
    scene, path, summary, frame = seam_scene
    out = Path(summary["outputs"]["geopackage"]).parent
    per_class = frame.groupby("class").size()
    csv = pd.read_csv(out / "counts.csv").set_index("class")["count"]
    layer = pyogrio.read_dataframe(out / "instances.gpkg", layer="counts").set_index("class")["count"]
    for name in CARD.classes:
        assert csv[name] == layer[name] == per_class.get(name, 0) == summary["counts"][name]
    assert csv.sum() == len(frame) == summary["instances"]
    assert list(frame["instance_id"]) == list(range(1, len(frame) + 1))
    assert set(frame["image_id"]) == {"scene"}
    assert (frame["score"] >= CARD.score_threshold).all()


def test_same_instances_whatever_the_batch_size_or_task_order(seam_scene, tmp_path):
    """The same GeoPackage, byte for byte: its layers are dated by the image, not by the write."""
    scene, path, summary, reference = seam_scene
    _, batched_1 = run_pipeline(path, tmp_path / "b1", batch_size=1, scheduler="threads")
    _, batched_3 = run_pipeline(path, tmp_path / "b3", batch_size=3, scheduler="threads")
    for other in (batched_1, batched_3):
        assert list(other["instance_id"]) == list(reference["instance_id"])
        assert list(other["class"]) == list(reference["class"])
        assert shapely.equals_exact(other.geometry.values, reference.geometry.values, tolerance=0).all()
    written = Path(summary["outputs"]["geopackage"]).read_bytes()
    assert (tmp_path / "b1" / "instances.gpkg").read_bytes() == (tmp_path / "b3" / "instances.gpkg").read_bytes() == written
    with closing(sqlite3.connect(tmp_path / "b1" / "instances.gpkg")) as db:
        dated = {stamp for (stamp,) in db.execute("SELECT last_change FROM gpkg_contents")}
    modified = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    assert dated == {modified.strftime("%Y-%m-%dT%H:%M:%S.") + f"{modified.microsecond // 1000:03d}Z"}


def test_batch_size_defaults_to_the_workers_device(seam_scene):
    """Unset, a batch is 4 tiles for CPU workers and 16 for GPU workers; a given size stays."""
    path = seam_scene[1]
    source = open_raster(path)
    tiles = len(TileGrid(source.height, source.width, 256, 32).tiles)
    for tiling, gpu, batch in [(Tiling(256, 32), False, 4), (Tiling(256, 32), True, 16), (Tiling(256, 32, 3), True, 3)]:
        assert tiling.for_workers(gpu).batch_size == batch
        graph = image_graph(source, str(MODEL), CARD.classes, "unused", tiling, gpu=gpu)
        assert len(graph.batches) == -(-tiles // batch)


def test_band_by_band_outputs_equal_one_band_labels_included(seam_scene, tmp_path, monkeypatch):
    """A band per tile row (objects pending across bands, label rows written as they settle,
    batches of 4 of 6 tiles a row running on into the next band) gives the GeoPackage and
    labels.zarr of a single band; labels agree with the polygons. They are the same written in
    the side process and in the merge's thread."""
    import rasterio.features
    import zarr

    import pipeline.graph
    from pipeline import side_process

    scene, path, _, _ = seam_scene
    outputs = {}
    for name, band_tiles, side in (("one-band", 10_000, True), ("row-bands", 1, True), ("in-thread", 1, False)):
        monkeypatch.setattr(pipeline.graph, "MIN_BAND_TILES", band_tiles)
        monkeypatch.setattr(side_process, "can_start", lambda side=side: side)
        side_process.shutdown()
        graph = image_graph(open_raster(path), str(MODEL), CARD.classes, tmp_path / name, Tiling(256, 32, 4), labels=True)
        (summary,) = dask.compute(graph.result, scheduler="threads")
        assert (side_process.pid() is not None) == side
        frame = gpd.read_file(tmp_path / name / "instances.gpkg", layer="instances")
        outputs[name] = summary, frame, zarr.open_group(tmp_path / name / "labels.zarr", mode="r")
        assert not list((tmp_path / name).glob(".*"))  # no parts or staging left
    side_process.shutdown()
    (one, one_frame, one_store), (rows, rows_frame, rows_store) = outputs["one-band"], outputs["row-bands"]
    in_thread = outputs["in-thread"][2]
    for array in ("labels/0", "labels/1", "classes/0", "classes/2", "density"):
        assert (in_thread[array][:] == rows_store[array][:]).all()
    assert len(rows_frame) == len(one_frame) > 20 and list(rows_frame["instance_id"]) == list(one_frame["instance_id"])
    assert shapely.equals_exact(rows_frame.geometry.values, one_frame.geometry.values, tolerance=0).all()
    assert rows["counts"] == one["counts"]
    assert {**rows["labels_zarr"], "path": None} == {**one["labels_zarr"], "path": None}
    labels = rows_store["labels/0"][:]
    assert (labels == one_store["labels/0"][:]).all() and (rows_store["density"][:] == one_store["density"][:]).all()
    with rasterio.open(path) as dataset:
        transform, shape = dataset.transform, dataset.shape
    order = np.lexsort((rows_frame["instance_id"], rows_frame["score"]))
    burned = rasterio.features.rasterize(
        ((rows_frame.geometry.values[i], int(rows_frame["instance_id"].iloc[i])) for i in order),
        out_shape=shape, transform=transform, dtype="uint32",
    )
    assert (labels == burned).all()
    assert (rows_store["labels/2"][:] == labels[::4, ::4]).all()


def test_image_smaller_than_a_tile_and_nodata_tiles(tmp_path):
    scene = make_scene(11, 200, 300)
    image = scene.image.copy()
    path = write_geotiff(image, tmp_path / "small.tif")
    summary, frame = run_pipeline(path, tmp_path / "small")
    assert summary["tiles"] == 1
    with rasterio.open(path) as dataset:
        assert shapely.box(*dataset.bounds).buffer(1e-6).contains(frame.geometry.values).all()
    blank = write_geotiff(np.zeros((700, 700, 3), np.uint8), tmp_path / "blank.tif", nodata=0)
    summary, frame = run_pipeline(blank, tmp_path / "blank", tile_size=256, overlap=32)
    assert summary["tiles_skipped"] == summary["tiles"] == 9 and len(frame) == 0


def test_instances_on_invalid_pixels_are_clipped_or_dropped():
    labels = np.zeros((64, 64), np.int32)
    labels[5:25, 5:25] = 1  # 3/4 on invalid pixels
    labels[30:50, 20:40] = 2  # 1/4 on invalid pixels
    labels[40:60, 45:60] = 3  # all valid
    tile = Tile(0, 0, 0, Span(0, 64), Span(0, 64), Span(0, 64), Span(0, 64), (0, 0, 0, 0))
    instances = perfect_tile_instances(labels, np.zeros(3, np.int16), tile)
    valid = np.ones((64, 64), bool)
    valid[:, :20] = False
    valid[:15] = False
    geometry = tile_detections(instances, tile, valid).geometry
    truth = label_polygons(np.where(valid, labels, 0))
    assert len(geometry) == 2
    assert shapely.equals(geometry[0], truth[2]) and shapely.equals(geometry[1], truth[3])
    assert len(tile_detections(instances, tile).geometry) == 3


def test_nothing_is_found_on_a_nodata_collar(tmp_path):
    scene = make_scene(2, 600, 600)
    image = scene.image.copy()
    collar = np.ones((600, 600), bool)
    collar[80:-80, 80:-80] = False
    image[collar] = 0
    path = write_geotiff(image, tmp_path / "collar.tif", nodata=0)
    _, frame = run_pipeline(path, tmp_path / "out", tile_size=256, overlap=32)
    polygons = pixel_geometry(frame, path)
    inner = shapely.box(80, 80, 520, 520)
    assert (shapely.area(shapely.intersection(polygons, inner)) >= 0.999 * shapely.area(polygons)).all()
    visible = np.asarray(list(label_polygons(np.where(collar, 0, scene.labels)).values()), dtype=object)
    assert match_f1(polygons, visible) >= 0.9


@pytest.mark.parametrize(
    "relative",
    [
        "geotiff-rasterio-rgb-byte/RGB.byte.tif",
        "aerial-deepforest-samples/OSBS_029.tif",
        "aerial-deepforest-samples/australia.tif",
        "aerial-deepforest-samples/test_tiled.tif",
    ],
)
def test_real_geotiffs_round_trip_crs_and_bounds(shared_data, tmp_path, relative):
    path = shared_data / relative
    tile_size = 128 if relative.endswith("RGB.byte.tif") else 256  # small tiles: some are all nodata
    summary, frame = run_pipeline(path, tmp_path / "out", tile_size=tile_size, overlap=tile_size // 8)
    info = pyogrio.read_info(tmp_path / "out" / "instances.gpkg", layer="instances")
    with sqlite3.connect(tmp_path / "out" / "instances.gpkg") as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master where type='table'")}
    assert "rtree_instances_geom" in tables  # spatial index
    with rasterio.open(path) as dataset:
        assert frame.crs == dataset.crs
        assert info["geometry_type"] == "Polygon"
        assert shapely.box(*dataset.bounds).buffer(1e-6).contains(frame.geometry.values).all()
    assert summary["tiles"] >= 4
    if relative.endswith("RGB.byte.tif"):
        assert summary["tiles_skipped"] >= 1  # the rotated scene's corners are all nodata


def test_lon_lat_image_is_read_at_the_model_resolution(tmp_path):
    """A lon/lat scene, and the same scene with every pixel repeated 2 × 2 at half the pixel size: read
    at the model's resolution (the first one's geodesic pixel size), both give the same objects, in
    degrees, at the same places."""
    scene = make_scene(2031, 700, 600)
    degree = 1e-5  # ≈ 1.11 m at the equator
    native = write_geotiff(scene.image, tmp_path / "native.tif", crs="EPSG:4326",
                           transform=rasterio.Affine(degree, 0, 10, 0, -degree, 0.01))
    repeated = np.repeat(np.repeat(scene.image, 2, 0), 2, 1)
    fine = write_geotiff(repeated, tmp_path / "fine.tif", crs="EPSG:4326",
                         transform=rasterio.Affine(degree / 2, 0, 10, 0, -degree / 2, 0.01))
    with rasterio.open(native) as dataset:
        metres = pixel_size_m(dataset.crs.to_wkt(), dataset.transform, dataset.width, dataset.height)
    assert open_raster(fine, target_m=metres).factor == pytest.approx(2.0, rel=1e-3)
    _, at_native = run_pipeline(native, tmp_path / "out-native", target_m=metres)
    _, at_fine = run_pipeline(fine, tmp_path / "out-fine", target_m=metres)
    assert at_fine.crs.to_epsg() == 4326 and len(at_native) > 20
    assert match_f1(at_fine.geometry.values, at_native.geometry.values) >= 0.95
    tree = shapely.STRtree(shapely.centroid(at_native.geometry.values))
    _, shift = tree.query_nearest(shapely.centroid(at_fine.geometry.values), return_distance=True)
    assert np.median(shift) <= degree / 2  # measured: 0.17 of a pixel
