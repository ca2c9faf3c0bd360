"""Per-image Zarr (v3) store of the instance label raster, its class raster and density grids.

Layout, on the processed-pixel grid of the image (the grid the polygons are in)::

    labels/0, labels/1, …    uint32 instance id = ``instance_id`` of the GeoPackage (0 = background)
    classes/0, classes/1, …  uint8 class index + 1 (0 = background)
    density                  uint32 (class, y, x): instances whose representative point is in each cell

Level ``k`` is level 0 taken every ``2**k`` pixels (labels are never averaged). Arrays are chunked
``chunk`` × ``chunk`` and compressed. The levels the block tasks write are sharded, a shard per
block: one file per block, level and array rather than one per chunk (a block of 4 × 4 chunks
writes 6 files, not up to 42; with the codec, 40 % less CPU per block: BENCHMARKS.md). Nothing
is stored for a block without a labelled pixel, nor for an all-background chunk of the unsharded
levels. Where instances
overlap, the one with the higher score owns the pixel (equal scores: the higher id), so an
instance can be hidden entirely: its id is then absent from the raster, its polygon still in the
GeoPackage, and it still counts.

Lifecycle, shaped for Dask: ``create_label_store`` once (a hidden temporary sibling of the final
path); ``write_label_block`` for every region of ``label_blocks``, in any order and in parallel
processes (a region is whole chunks, so no two tasks write one chunk file), each also writing the
pyramid levels at which its region is still whole chunks (from the raster in memory); then
``finalise_label_store`` once: the coarser levels, density, metadata, rename into place. A run that
never finalises leaves only the hidden temporary directory.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import shapely
import zarr
from affine import Affine
from rasterio.crs import CRS
from zarr.codecs import BloscCodec

from pipeline.detections import Detections
from pipeline.grid import Span
from pipeline.rasterise import burn_polygons

LABELS, CLASSES, DENSITY = "labels", "classes", "density"
COMPRESSORS = BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle")  # benchmarks/label_codecs.py: smaller and faster than zstd 5 + shuffle
CONFIG = {"write_empty_chunks": False}
SPATIAL = {
    "name": "spatial",
    "uuid": "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4",
    "spec_url": "https://github.com/zarr-conventions/spatial/blob/v1/README.md",
    "schema_url": "https://raw.githubusercontent.com/zarr-conventions/spatial/refs/tags/v1/schema.json",
}
PROJ = {
    "name": "proj",
    "uuid": "f17cb550-5864-4468-aeb7-f3180cfb622f",
    "spec_url": "https://github.com/zarr-conventions/geo-proj/blob/v1/README.md",
    "schema_url": "https://raw.githubusercontent.com/zarr-conventions/geo-proj/refs/tags/v1/schema.json",
}


DIMS = ("y", "x")  # every level's dimension names: OME-NGFF 0.5 requires its axes' names (xarray opens one level at a time)


def _spatial(transform: Affine, shape: tuple[int, ...], dims: tuple[str, str] = ("y", "x")) -> dict:
    """Spatial-convention attributes of a (y, x) grid whose pixel → CRS affine is ``transform``."""
    return {"spatial:dimensions": list(dims), "spatial:shape": list(shape), "spatial:transform": list(transform)[:6]}


def _create_level(
    group: zarr.Group, k: int, shape: tuple[int, int], chunk: int, dtype: np.dtype | str, transform: Affine,
    shard: int | None = None,
) -> zarr.Array:
    return group.create_array(
        str(k), shape=shape, chunks=(chunk, chunk), shards=(shard, shard) if shard and shard > chunk else None,
        dtype=dtype, fill_value=0, compressors=COMPRESSORS,
        dimension_names=DIMS, config=CONFIG, overwrite=True,
        attributes=_spatial(level_transform(transform, k), shape, DIMS),
    )


def level_transform(transform: Affine, k: int) -> Affine:
    """Pixel → CRS affine of pyramid level ``k`` (pixel corners, as GDAL's): its pixel ``i`` is level
    0's pixel ``i·2^k`` (every other pixel, level by level), so it is drawn as the ``2^k`` square
    centred on that pixel, not the block it starts (labels would drift ``(2^k − 1)/2`` pixels)."""
    shift = 0.5 - 2 ** (k - 1)
    return transform @ Affine.translation(shift, shift) @ Affine.scale(2**k)


def _open(store: Path, name: str) -> zarr.Array:
    """An existing array for writing (``open_array`` ignores ``config``, hence ``with_config``).
    All-background chunks are left out, except inside a shard: a block writes its shard whole, a
    background chunk costs it a few bytes, and checking every chunk cost a fifth of the write."""
    array = zarr.open_array(store, path=name, mode="r+")
    return array.with_config({"write_empty_chunks": array.shards is not None})


def block_levels(chunk: int, per_task: int, height: int, width: int) -> int:
    """How many pyramid levels (level 0 included) the block tasks write: those at which every
    region of ``label_blocks`` is still whole chunks."""
    levels, most = 1, len(pyramid_shapes(height, width, chunk))
    while per_task % 2**levels == 0 and levels < most:
        levels += 1
    return levels


def discard_unfinished(path: Path) -> None:
    """Remove the temporary siblings of store ``path`` that were never finalised."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def create_label_store(
    path: Path, height: int, width: int, chunk: int, class_names: list[str],
    transform: Affine, crs_wkt: str | None, mpp: tuple[float, float] | None, per_task: int = 4,
) -> Path:
    """Create the empty store as a hidden temporary sibling of ``path`` and return its path.

    ``transform`` maps label pixels (column, row) to CRS units for georeferenced rasters, to
    level-0 pixels for slides; ``mpp`` is the level-0 microns per pixel (across, down) of a slide. Blocks will
    be ``label_blocks(..., per_task)``.
    """
    if min(height, width, chunk) < 1:
        raise ValueError(f"label store of {height}×{width} pixels in chunks of {chunk}: all must be positive")
    if len(class_names) > 255:
        raise ValueError(f"{len(class_names)} classes: the uint8 class raster holds at most 255")
    path.parent.mkdir(parents=True, exist_ok=True)
    discard_unfinished(path)  # left by a run that died before finalising
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    root = zarr.open_group(tmp, mode="w-", zarr_format=3)
    root.attrs.update({
        "zarr_conventions": [SPATIAL, PROJ] if crs_wkt else [SPATIAL],
        **_spatial(transform, (height, width)),
        **({"proj:wkt2": CRS.from_wkt(crs_wkt).to_wkt(version="WKT2_2019")} if crs_wkt else {}),
        "crs_wkt": crs_wkt,
        "geotransform": list(transform.to_gdal()),
        "mpp": mpp[0] if mpp else None,
        "mpp_down": mpp[1] if mpp else None,
        "chunk": chunk,
        "block_levels": block_levels(chunk, per_task, height, width),
        "class_names": list(class_names),
        "instance_id": "labels value = instance_id of the instances layer (1-based row); 0 = background",
        "overlap": "a pixel covered by several instances belongs to the highest score, then the highest id",
    })
    shapes = pyramid_shapes(height, width, chunk)[: root.attrs["block_levels"]]
    for name, dtype in ((LABELS, "uint32"), (CLASSES, "uint8")):
        group = root.create_group(name)
        for k, shape in enumerate(shapes):
            _create_level(group, k, shape, chunk, dtype, transform, shard=(chunk * per_task) >> k)
    return tmp


def label_blocks(height: int, width: int, chunk: int, per_task: int) -> list[tuple[Span, Span]]:
    """Regions of ``per_task`` × ``per_task`` whole chunks (fewer at the right and bottom), row-major."""
    step = chunk * per_task
    return [
        (Span(r, min(r + step, height)), Span(c, min(c + step, width)))
        for r in range(0, height, step)
        for c in range(0, width, step)
    ]


def _check_region(shape: tuple[int, ...], chunk: int, rows: Span, cols: Span) -> None:
    for span, size in ((rows, shape[0]), (cols, shape[1])):
        if not 0 <= span.start < span.stop <= size or span.start % chunk or (span.stop % chunk and span.stop != size):
            raise ValueError(
                f"region rows {rows.start}:{rows.stop}, cols {cols.start}:{cols.stop} is not whole "
                f"{chunk}-pixel chunks of a {shape[0]}×{shape[1]} raster"
            )


def write_label_block(store: Path, detections: Detections, rows: Span, cols: Span, ids: np.ndarray | None = None) -> int:
    """Rasterise every instance over one region of whole chunks into ``labels/0`` and
    ``classes/0`` (pixel centres inside the polygon), and the levels the store's blocks write;
    return the number of labelled pixels. ``ids`` are the instances' ids (default 1, 2, …)."""
    labels = _open(store, f"{LABELS}/0")
    chunk = labels.chunks[0]
    _check_region(labels.shape, chunk, rows, cols)
    levels = zarr.open_group(store, mode="r").attrs["block_levels"]
    for k, shape in enumerate(pyramid_shapes(*labels.shape, chunk)[1:levels], start=1):
        try:
            _check_region(shape, chunk, Span(rows.start >> k, -(-rows.stop >> k)), Span(cols.start >> k, -(-cols.stop >> k)))
        except ValueError as err:
            raise ValueError(f"pyramid level {k}: {err} (blocks come from label_blocks with create_label_store's per_task)") from None
    xmin, ymin, xmax, ymax = detections.bounds.T
    hit = np.flatnonzero((xmax > cols.start) & (xmin < cols.stop) & (ymax > rows.start) & (ymin < rows.stop))
    if len(hit) == 0:
        return 0
    ids = np.arange(1, len(detections) + 1) if ids is None else np.asarray(ids, np.int64)
    hit = hit[np.lexsort((ids[hit], detections.score[hit]))]  # burnt in this order: the last one wins
    block = burn_polygons(detections.geometry[hit], ids[hit], rows, cols)
    pixels = int(np.count_nonzero(block))
    if not pixels:  # boxes overlap the region, no pixel centre is inside: store nothing
        return 0
    lookup = np.zeros(int(ids[hit].max()) + 1, np.uint8)
    lookup[ids[hit]] = detections.label[hit] + 1
    for k in range(levels):
        level = block[:: 2**k, :: 2**k]
        r, c = rows.start >> k, cols.start >> k
        window = (slice(r, r + level.shape[0]), slice(c, c + level.shape[1]))
        (labels if k == 0 else _open(store, f"{LABELS}/{k}"))[window] = level
        _open(store, f"{CLASSES}/{k}")[window] = lookup[level]
    return pixels


def write_label_blocks(store: Path, detections: Detections, ids: np.ndarray, blocks: list[tuple[Span, Span]]) -> int:
    """``write_label_block`` for each of ``blocks`` (regions of ``label_blocks``); the labelled pixels."""
    return sum(write_label_block(store, detections, rows, cols, ids) for rows, cols in blocks)


def pyramid_shapes(height: int, width: int, chunk: int) -> list[tuple[int, int]]:
    """Shapes of levels 0, 1, …, halving until a side is ≤ ``chunk``."""
    shapes = [(height, width)]
    while min(shapes[-1]) > chunk:
        shapes.append((-(-shapes[-1][0] // 2), -(-shapes[-1][1] // 2)))
    return shapes


def stored_keys(array_dir: Path) -> set[tuple[int, int]]:
    """(row, col) indices of the chunks, or of the shards of a sharded array, that are stored
    (default v3 chunk keys ``c/<row>/<col>``)."""
    root = array_dir / "c"
    if not root.is_dir():
        return set()
    return {(int(r.name), int(c.name)) for r in root.iterdir() for c in r.iterdir()}


def _downsample(store: Path, name: str, k: int, shape: tuple[int, int], transform: Affine) -> None:
    """Level ``k`` = level ``k - 1`` every other pixel, one output chunk at a time, skipping
    output chunks whose source chunks (or shards) are none of them stored."""
    source = _open(store, f"{name}/{k - 1}")
    chunk = source.chunks[0]
    unit = (source.shards or source.chunks)[0]  # pixels per side of one stored key
    target = _create_level(zarr.open_group(store / name, mode="r+"), k, shape, chunk, source.dtype, transform)

    def below(key: int, n: int) -> range:  # output chunk indices (of n) under source key ``key``
        return range(key * unit // (2 * chunk), min(((key + 1) * unit - 1) // (2 * chunk) + 1, n))

    n_rows, n_cols = -(-shape[0] // chunk), -(-shape[1] // chunk)
    keys = stored_keys(store / name / str(k - 1))
    for i, j in sorted({(i, j) for r, c in keys for i in below(r, n_rows) for j in below(c, n_cols)}):
        r, c = i * chunk, j * chunk
        part = source[2 * r : 2 * (r + chunk), 2 * c : 2 * (c + chunk)][::2, ::2]
        target[r : r + part.shape[0], c : c + part.shape[1]] = part


def density_grid(detections: Detections, n_classes: int, height: int, width: int, cell_size: int) -> np.ndarray:
    """(class, rows, cols) counts of instances whose representative point (``point_on_surface``)
    lies in each ``cell_size`` cell; a point off the image counts in the nearest edge cell."""
    shape = (n_classes, -(-height // cell_size), -(-width // cell_size))
    points = shapely.point_on_surface(detections.geometry)
    x, y = shapely.get_x(points), shapely.get_y(points)
    keep = np.isfinite(x) & np.isfinite(y)
    row = np.clip(np.floor(y[keep] / cell_size).astype(np.int64), 0, shape[1] - 1)
    col = np.clip(np.floor(x[keep] / cell_size).astype(np.int64), 0, shape[2] - 1)
    flat = np.ravel_multi_index((detections.label[keep].astype(np.int64), row, col), shape)
    return np.bincount(flat, minlength=math.prod(shape)).reshape(shape).astype(np.uint32)


def _multiscales(
    name: str, n_levels: int, transform: Affine, mpp: tuple[float, float] | None, class_names: list[str] | None
) -> dict:
    """OME-NGFF 0.5 label-image metadata; scales in µm when ``mpp`` (across, down) is known, else in
    the units of ``transform`` (level-0 pixels for slides and plain images, CRS units for rasters)."""
    dy, dx = math.hypot(transform.b, transform.e), math.hypot(transform.a, transform.d)
    across, down = mpp or (1.0, 1.0)
    axes = [{"name": axis, "type": "space", **({"unit": "micrometer"} if mpp else {})} for axis in ("y", "x")]
    scales = [[dy * down * 2**k, dx * across * 2**k] for k in range(n_levels)]
    datasets = [
        {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        for k, scale in enumerate(scales)
    ]
    properties = [{"label-value": i + 1, "class": c} for i, c in enumerate(class_names or [])]
    return {
        "ome": {
            "version": "0.5",
            "multiscales": [{"name": name, "axes": axes, "datasets": datasets, "type": "subsample"}],
            "image-label": {"properties": properties} if properties else {},
        }
    }


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an older ``final`` is set aside first, put back if the rename
    fails, and deleted only once the new store is in place."""
    old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
    replacing = final.exists()
    if replacing:
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if replacing:
            os.rename(old, final)
        raise
    if replacing:
        shutil.rmtree(old)


def finalise_label_store(
    store: Path, final_path: Path, density: np.ndarray, class_names: list[str], cell_size: int = 256, move: bool = True
) -> dict:
    """Build the rest of the pyramid, store ``density`` (``density_grid`` of every instance, summed
    over parts if need be) and the metadata, then rename ``store`` to ``final_path`` (with
    ``move=False`` the caller renames it, e.g. with an image's other outputs)."""
    root = zarr.open_group(store, mode="r+")
    transform = Affine(*root.attrs["spatial:transform"])
    mpp = (root.attrs["mpp"], root.attrs["mpp_down"]) if root.attrs["mpp"] else None
    chunk = root.attrs["chunk"]
    height, width = root[f"{LABELS}/0"].shape
    shapes = pyramid_shapes(height, width, chunk)
    for name, names in ((LABELS, None), (CLASSES, class_names)):
        for k in range(root.attrs["block_levels"], len(shapes)):
            _downsample(store, name, k, shapes[k], transform)
        root[name].attrs.update(_multiscales(name, len(shapes), transform, mpp, names))
    root.create_array(
        DENSITY, data=density, chunks=(1, *(min(n, 1024) for n in density.shape[1:])), fill_value=0,
        compressors=COMPRESSORS, dimension_names=("class", "y", "x"), config=CONFIG, overwrite=True,
        attributes={
            "cell_size": cell_size,
            "class_names": list(class_names),
            **_spatial(transform @ Affine.scale(cell_size), density.shape[1:]),
        },
    )
    counts = density.sum(axis=(1, 2), dtype=np.int64)
    summary = {
        "shape": [height, width],
        "levels": len(shapes),
        "instances": int(counts.sum()),
        "counts": dict(zip(class_names, counts.tolist())),
    }
    root.attrs.update({**summary, "density_cell_size": cell_size})
    if move:
        move_into_place(store, final_path)
    return {"path": str(final_path), **summary}
