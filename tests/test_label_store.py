"""The Zarr label store against one-shot rasterisations of a generated scene's polygons."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import shapely
import zarr
from affine import Affine
from rasterio import features
from rasterio.crs import CRS

from models.synthetic import CLASSES, make_scene
from pipeline.detections import Detections
from pipeline.grid import Span
from pipeline.label_store import (
    create_label_store,
    density_grid,
    finalise_label_store,
    label_blocks,
    stored_keys,
    write_label_block,
)
from tests.helpers import label_polygons

HEIGHT, WIDTH, CHUNK, PER_TASK, CELL = 300, 420, 32, 4, 64  # blocks write levels 0-2, finalise 3-4
NAMES = list(CLASSES)
TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0)
CRS_WKT = CRS.from_epsg(32633).to_wkt()


def scene_detections(seed: int) -> tuple[Detections, int]:
    """Exact polygons of a generated scene plus overlapping extras; returns the index of the
    one instance that lies, with the lowest score, entirely under another."""
    scene = make_scene(seed, HEIGHT, WIDTH, density=4.0, size_range=(8.0, 70.0))
    polygons = label_polygons(scene.labels)
    ids = np.array(sorted(polygons))
    geometry = [polygons[i] for i in ids]
    largest = max(geometry, key=lambda g: g.area)
    extras = [
        *(shapely.affinity.translate(g.buffer(2.0), 5.3, 3.7) for g in geometry[:6]),  # off-grid overlaps
        shapely.affinity.rotate(shapely.box(-40, 140, 460, 151.5), 17, origin=(210, 150)),  # many blocks, leaves image
        shapely.MultiPolygon([shapely.box(2.5, 280.2, 30.6, 299.9), shapely.box(390.1, 2, 420, 20.5)]),
        shapely.box(*largest.buffer(-4).representative_point().buffer(1.5).bounds),  # hidden under `largest`
    ]
    rng = np.random.default_rng(seed)
    n = len(geometry) + len(extras)
    score = rng.uniform(0.05, 1.0, n).astype(np.float32)
    score[-1] = 0.0
    label = np.concatenate([scene.classes[ids - 1], rng.integers(0, len(NAMES), len(extras))]).astype(np.int16)
    detections = Detections(
        geometry=np.array(geometry + extras, dtype=object), label=label, score=score,
        tile=np.zeros(n, np.int32), cut=np.zeros(n, bool), owned=np.ones(n, bool),
    )
    return detections, n - 1


def occupied_keys(array: zarr.Array) -> set[tuple[int, int]]:
    """(row, col) indices of the shards (of the chunks, when unsharded) that hold a label."""
    unit = (array.shards or array.chunks)[0]
    values = array[:]
    return {
        (r // unit, c // unit)
        for r in range(0, values.shape[0], unit) for c in range(0, values.shape[1], unit)
        if values[r : r + unit, c : c + unit].any()
    }


def density_of(detections: Detections, cell: int = CELL) -> np.ndarray:
    return density_grid(detections, len(NAMES), HEIGHT, WIDTH, cell)


def priority(detections: Detections) -> np.ndarray:
    """Indices from lowest to highest claim on a shared pixel: score, then id."""
    return np.lexsort((np.arange(len(detections)), detections.score))


def one_go(detections: Detections) -> np.ndarray:
    order = priority(detections)
    shapes = zip(detections.geometry[order], (order + 1).tolist())
    return features.rasterize(shapes, out_shape=(HEIGHT, WIDTH), dtype="uint32")


def footprint(geometry) -> np.ndarray:
    return features.rasterize([geometry], out_shape=(HEIGHT, WIDTH), dtype="uint8").astype(bool)


def painted(detections: Detections) -> np.ndarray:
    """Painter's algorithm, one instance at a time, in priority order."""
    out = np.zeros((HEIGHT, WIDTH), np.uint32)
    for i in priority(detections):
        out[footprint(detections.geometry[i])] = i + 1
    return out


def build(
    path: Path, detections: Detections, pool: ProcessPoolExecutor | None = None, seed: int = 0
) -> tuple[Path, int]:
    """Create, write every block (shuffled, or through ``pool``) and return (temporary store, pixels)."""
    store = create_label_store(path, HEIGHT, WIDTH, CHUNK, NAMES, TRANSFORM, CRS_WKT, None, PER_TASK)
    blocks = label_blocks(HEIGHT, WIDTH, CHUNK, PER_TASK)
    if pool is None:
        order = np.random.default_rng(seed).permutation(len(blocks))
        return store, sum(write_label_block(store, detections, *blocks[i]) for i in order)
    futures = [pool.submit(write_label_block, store, detections, rows, cols) for rows, cols in blocks]
    return store, sum(f.result() for f in futures)


@pytest.fixture(scope="module")
def scene() -> tuple[Detections, int]:
    return scene_detections(11)


@pytest.fixture(scope="module")
def built(scene, tmp_path_factory) -> dict:
    detections, _ = scene
    root = tmp_path_factory.mktemp("stores")
    serial, serial_pixels = build(root / "serial" / "labels.zarr", detections, seed=5)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        parallel, parallel_pixels = build(root / "parallel" / "labels.zarr", detections, pool)
    summaries = [
        finalise_label_store(store, store.parent / "labels.zarr", density_of(detections), NAMES, cell_size=CELL)
        for store in (serial, parallel)
    ]
    return {"summaries": summaries, "pixels": (serial_pixels, parallel_pixels)}


def open_final(summary: dict) -> zarr.Group:
    return zarr.open_group(summary["path"], mode="r")


def test_blocks_partition_the_image_in_whole_chunks(tmp_path):
    cover = np.zeros((HEIGHT, WIDTH), int)
    for rows, cols in label_blocks(HEIGHT, WIDTH, CHUNK, PER_TASK):
        assert rows.start % CHUNK == cols.start % CHUNK == 0
        assert rows.length <= CHUNK * PER_TASK and cols.length <= CHUNK * PER_TASK
        cover[rows.start : rows.stop, cols.start : cols.stop] += 1
    assert (cover == 1).all()
    store = create_label_store(tmp_path / "labels.zarr", HEIGHT, WIDTH, CHUNK, NAMES, TRANSFORM, None, None)
    with pytest.raises(ValueError, match="not whole"):
        write_label_block(store, Detections.empty(), Span(16, 64), Span(0, 64))


def test_serial_and_parallel_writes_equal_one_rasterisation(scene, built):
    detections, hidden = scene
    reference = one_go(detections)
    assert (reference == painted(detections)).all()
    assert footprint(detections.geometry[hidden]).any() and hidden + 1 not in reference
    for summary, pixels in zip(built["summaries"], built["pixels"]):
        labels = open_final(summary)["labels/0"][:]
        assert labels.dtype == np.uint32 and (labels == reference).all()
        assert pixels == np.count_nonzero(reference)
        assert set(np.unique(labels[labels > 0]).tolist()) == set(range(1, len(detections) + 1)) - {hidden + 1}


def test_classes_follow_labels_and_background_is_not_stored(scene, built):
    detections, _ = scene
    group = open_final(built["summaries"][0])
    labels, classes = group["labels/0"][:], group["classes/0"][:]
    lookup = np.concatenate([[0], detections.label + 1])
    assert classes.dtype == np.uint8 and (classes == lookup[labels]).all()
    block = CHUNK * PER_TASK
    assert group["labels/0"].shards == (block, block)
    occupied = occupied_keys(group["labels/0"])
    assert 0 < len(occupied) < len(label_blocks(HEIGHT, WIDTH, CHUNK, PER_TASK))
    for name in ("labels", "classes"):
        assert stored_keys(Path(built["summaries"][0]["path"]) / name / "0") == occupied


def test_pyramid_levels_are_strided_level_zero(built):
    group = open_final(built["summaries"][0])
    levels = built["summaries"][0]["levels"]
    shapes = [group[f"labels/{k}"].shape for k in range(levels)]
    assert shapes == [(-(-HEIGHT // 2**k), -(-WIDTH // 2**k)) for k in range(levels)]
    assert min(shapes[-1]) <= CHUNK < min(shapes[-2])
    for name in ("labels", "classes"):
        base = group[f"{name}/0"][:]
        for k in range(1, levels):
            level = group[f"{name}/{k}"][:]
            assert (level == base[:: 2**k, :: 2**k]).all()
            stored = stored_keys(Path(built["summaries"][0]["path"]) / name / str(k))
            assert stored == occupied_keys(group[f"{name}/{k}"])


@pytest.mark.parametrize("per_task", [3, PER_TASK])
def test_block_levels_are_one_shard_per_block_and_coarser_levels_follow(scene, tmp_path, per_task):
    """Each block is one file per level it writes; finalise builds the coarser levels from the last
    of them, sharded too when a block is an odd number of chunks (3: only level 0)."""
    detections, _ = scene
    store = create_label_store(tmp_path / "labels.zarr", HEIGHT, WIDTH, CHUNK, NAMES, TRANSFORM, CRS_WKT, None, per_task)
    blocks = label_blocks(HEIGHT, WIDTH, CHUNK, per_task)
    for rows, cols in blocks:
        write_label_block(store, detections, rows, cols)
    written = zarr.open_group(store, mode="r").attrs["block_levels"]
    assert written == (1 if per_task == 3 else 3)
    summary = finalise_label_store(store, tmp_path / "labels.zarr", density_of(detections), NAMES, cell_size=CELL)
    group = zarr.open_group(tmp_path / "labels.zarr", mode="r")
    base = one_go(detections)
    for k in range(summary["levels"]):
        array = group[f"labels/{k}"]
        block = CHUNK * per_task >> k
        assert array.shards == ((block, block) if k < written and block > CHUNK else None)
        assert (array[:] == base[:: 2**k, :: 2**k]).all()
        assert stored_keys(tmp_path / "labels.zarr" / "labels" / str(k)) == occupied_keys(array)


def test_density_counts_representative_points_per_cell(scene, built):
    detections, _ = scene
    density = open_final(built["summaries"][0])["density"][:]
    points = shapely.point_on_surface(detections.geometry)
    x, y = shapely.get_x(points), shapely.get_y(points)
    assert ((x >= 0) & (x < WIDTH) & (y >= 0) & (y < HEIGHT)).all()
    expected = np.zeros((len(NAMES), -(-HEIGHT // CELL), -(-WIDTH // CELL)), int)
    for r in range(expected.shape[1]):
        for c in range(expected.shape[2]):
            inside = (x >= c * CELL) & (x < (c + 1) * CELL) & (y >= r * CELL) & (y < (r + 1) * CELL)
            expected[:, r, c] = np.bincount(detections.label[inside], minlength=len(NAMES))
    assert (density == expected).all()
    counts = np.bincount(detections.label, minlength=len(NAMES))
    assert (density.sum((1, 2)) == counts).all()


def test_attributes_describe_counts_crs_and_scales(scene, built):
    detections, _ = scene
    summary = built["summaries"][0]
    group = open_final(summary)
    attrs = group.attrs.asdict()
    counts = dict(zip(NAMES, np.bincount(detections.label, minlength=len(NAMES)).tolist()))
    assert attrs["counts"] == summary["counts"] == counts and attrs["instances"] == len(detections)
    assert attrs["crs_wkt"] == CRS_WKT and CRS.from_wkt(attrs["proj:wkt2"]) == CRS.from_epsg(32633)
    assert attrs["geotransform"] == [500000.0, 0.5, 0.0, 4100000.0, 0.0, -0.5]
    assert Affine(*attrs["spatial:transform"]) == TRANSFORM
    ome = group["labels"].attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ome["axes"]] == ["y", "x"]
    for k, dataset in enumerate(ome["datasets"]):
        assert dataset["coordinateTransformations"][0]["scale"] == [0.5 * 2**k, 0.5 * 2**k]
        # every labelled pixel of a level, its centre through the level's transform, is the level-0 pixel it came from
        level = group[f"labels/{dataset['path']}"]
        rows, cols = np.nonzero(level[:])
        x, y = Affine(*level.attrs["spatial:transform"]) @ (cols + 0.5, rows + 0.5)
        c0, r0 = ~TRANSFORM @ (x, y)
        assert (group["labels/0"][:][np.floor(r0).astype(int), np.floor(c0).astype(int)] == level[:][rows, cols]).all()
    assert len(ome["datasets"]) == summary["levels"]
    with pytest.raises(ValueError, match="read-only"):
        group["labels/0"][0, 0] = 1


def test_given_ids_label_the_pixels_and_classes_follow_them(scene, tmp_path):
    """A stream labels its instances by their final ids, not by position in what it holds."""
    detections, _ = scene
    ids = 1000 + 3 * np.arange(len(detections))[::-1]
    store = create_label_store(tmp_path / "labels.zarr", HEIGHT, WIDTH, CHUNK, NAMES, TRANSFORM, CRS_WKT, None, PER_TASK)
    for rows, cols in label_blocks(HEIGHT, WIDTH, CHUNK, PER_TASK):
        write_label_block(store, detections, rows, cols, ids)
    labels = zarr.open_array(store, path="labels/0")[:]
    classes = zarr.open_array(store, path="classes/0")[:]
    order = np.lexsort((ids, detections.score))  # equal scores: the higher id wins
    expected = features.rasterize(zip(detections.geometry[order], ids[order].tolist()), out_shape=(HEIGHT, WIDTH), dtype="uint32")
    assert (labels == expected).all() and labels.any()
    by_id = dict(zip(ids.tolist(), (detections.label + 1).tolist()))
    assert all(classes[labels == i].tolist() == [c] * int((labels == i).sum()) for i, c in by_id.items() if (labels == i).any())
    assert not classes[labels == 0].any()


def test_a_block_whose_boxes_cover_no_pixel_centre_stores_nothing(tmp_path):
    sliver = shapely.box(40.1, 10.2, 40.4, 90.0)  # between two columns of pixel centres
    detections = Detections(
        geometry=np.array([sliver], dtype=object), label=np.zeros(1, np.int16), score=np.ones(1, np.float32),
        tile=np.zeros(1, np.int32), cut=np.zeros(1, bool), owned=np.ones(1, bool),
    )
    store = create_label_store(tmp_path / "labels.zarr", HEIGHT, WIDTH, CHUNK, NAMES, TRANSFORM, CRS_WKT, None, PER_TASK)
    assert sum(write_label_block(store, detections, rows, cols) for rows, cols in label_blocks(HEIGHT, WIDTH, CHUNK, PER_TASK)) == 0
    assert not any(stored_keys(store / name / str(k)) for name in ("labels", "classes") for k in range(3))


def test_empty_slide_stores_nothing_and_uses_microns(tmp_path):
    store = create_label_store(tmp_path / "labels.zarr", HEIGHT, WIDTH, CHUNK, NAMES, Affine.scale(2.0), None, (0.25, 0.5), 2)
    for rows, cols in label_blocks(HEIGHT, WIDTH, CHUNK, 2):
        assert write_label_block(store, Detections.empty(), rows, cols) == 0
    summary = finalise_label_store(store, tmp_path / "labels.zarr", density_of(Detections.empty(), 256), NAMES)
    group = zarr.open_group(tmp_path / "labels.zarr", mode="r")
    assert summary["levels"] == 5 and not group["labels/1"][:].any() and not group["density"][:].any()
    for name in ("labels", "classes"):
        for k in range(5):
            assert not stored_keys(tmp_path / "labels.zarr" / name / str(k))
    ome = group["classes"].attrs["ome"]
    assert ome["multiscales"][0]["axes"][0]["unit"] == "micrometer"
    scales = [d["coordinateTransformations"][0]["scale"] for d in ome["multiscales"][0]["datasets"]]
    assert scales == [[1.0 * 2**k, 0.5 * 2**k] for k in range(5)]  # (y, x): pixels of 0.25 µm across, 0.5 µm down
    assert [p["class"] for p in ome["image-label"]["properties"]] == NAMES
    assert "proj:wkt2" not in group.attrs and summary["counts"] == dict.fromkeys(NAMES, 0)


def test_unfinished_run_leaves_no_final_store(scene, tmp_path):
    detections, _ = scene
    store, _ = build(tmp_path / "labels.zarr", detections)
    assert store.exists() and not (tmp_path / "labels.zarr").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []


def test_rerun_replaces_the_store_and_a_failed_swap_keeps_the_old_one(scene, tmp_path, monkeypatch):
    detections, _ = scene
    final = tmp_path / "labels.zarr"
    first = detections.take(np.arange(0, len(detections), 2))
    finalise_label_store(build(final, detections)[0], final, density_of(detections), NAMES, cell_size=CELL)
    finalise_label_store(build(final, first)[0], final, density_of(first), NAMES, cell_size=CELL)
    assert [p.name for p in tmp_path.iterdir()] == ["labels.zarr"]
    group = zarr.open_group(final, mode="r")
    assert (group["labels/0"][:] == one_go(first)).all() and group.attrs["instances"] == len(first)

    store, _ = build(final, detections)
    rename = os.rename

    def failing(src, dst):
        if Path(src) == store:
            raise OSError("disk gone")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="disk gone"):
        finalise_label_store(store, final, density_of(detections), NAMES, cell_size=CELL)
    group = zarr.open_group(final, mode="r")
    assert (group["labels/0"][:] == one_go(first)).all() and group.attrs["instances"] == len(first)


def test_levels_follow_ome_ngff_and_open_in_xarray(tmp_path):
    """OME-NGFF 0.5: each level's dimension_names are its axes' names (validators such as
    ome-zarr-models refuse others); xarray then opens one level at a time."""
    import xarray as xr

    from models.synthetic import make_scene
    from tests.helpers import label_polygons

    scene = make_scene(5, 300, 420)
    polygons = label_polygons(scene.labels)
    ids = sorted(polygons)
    detections = Detections(
        geometry=np.array([polygons[i] for i in ids]), label=scene.classes[np.array(ids) - 1].astype(np.int16),
        score=np.ones(len(ids), np.float32), tile=np.zeros(len(ids), np.int32),
        cut=np.zeros(len(ids), bool), owned=np.ones(len(ids), bool),
    )
    final = tmp_path / "labels.zarr"
    store = create_label_store(final, 300, 420, 64, ["a", "b", "c"], Affine.identity(), None, None, per_task=2)
    for rows, cols in label_blocks(300, 420, 64, 2):
        write_label_block(store, detections, rows, cols)
    finalise_label_store(store, final, density_grid(detections, 3, 300, 420, 50), ["a", "b", "c"], cell_size=50)
    group = zarr.open_group(final, mode="r")
    for name in ("labels", "classes"):
        axes = [axis["name"] for axis in group[name].attrs["ome"]["multiscales"][0]["axes"]]
        levels = [d["path"] for d in group[name].attrs["ome"]["multiscales"][0]["datasets"]]
        assert len(levels) >= 3 and all(list(group[f"{name}/{k}"].metadata.dimension_names) == axes for k in levels)
    names = [d["path"] for d in group["labels"].attrs["ome"]["multiscales"][0]["datasets"]]
    level = {k: xr.open_zarr(final, group="labels", consolidated=False, drop_variables=[o for o in names if o != k])[k] for k in "01"}
    assert level["0"].dims == level["1"].dims == ("y", "x") and level["1"].shape == (150, 210)
    assert (level["1"].values == level["0"].values[::2, ::2]).all()
    root = xr.open_zarr(final, consolidated=False)
    assert int(root["density"].sum()) == len(ids) and root.attrs["counts"] == dict(zip("abc", np.bincount(detections.label, minlength=3).tolist()))
