"""Per-image outputs: GeoPackage of instances (+ counts table), counts as CSV and JSON, written
from Parquet parts of the instances that the merge released band by band.

Every file is written under a temporary name in its final directory and renamed into place,
so a reader never sees half a file and a failed write leaves earlier results untouched.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sqlite3
import uuid
import warnings
from contextlib import ExitStack, closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
import shapely

from pipeline.detections import Detections
from pipeline.ground_area import ground_area_m2
from pipeline.label_store import move_into_place
from pipeline.sources import RasterSource

INSTANCES_LAYER = "instances"
COUNTS_LAYER = "counts"
BATCH_ROWS = 16_384  # instances streamed into the GeoPackage at a time


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary sibling of ``path``; rename it to ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.(tmp|old)(\.\w+)?$")  # atomic_path's and label_store's names


def temporaries(folder: Path, kinds: tuple[str, ...] = ("tmp", "old")) -> list[Path]:
    """The temporary files and stores a write into ``folder`` makes (``atomic_path``, a staged
    ``tmp`` or set-aside ``old`` labels.zarr): once the folder's outputs are committed, those left
    are a killed run's. ``kinds=("tmp",)``: only what was being written, never a set-aside copy."""
    return [p for p in folder.glob(".*") if (m := TEMPORARY.match(p.name)) and m.group(1) in kinds]


def remove(path: Path) -> None:
    """Delete a file or a folder tree; gone already is fine."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def to_source_crs(geometry: np.ndarray, source: RasterSource) -> np.ndarray:
    """Pixel (column, row) polygons → the source's CRS through its affine transform, once; exterior
    rings counter-clockwise, holes clockwise (the OGC and RFC 7946 rule; a north-up transform mirrors)."""
    a, b, c, d, e, f = source.transform[:6]
    matrix = np.array([[a, d], [b, e]])
    return shapely.orient_polygons(shapely.transform(geometry, lambda xy: xy @ matrix + np.array([c, f])))


def instances_table(
    detections: Detections, first_id: int, source: RasterSource, class_names: list[str]
) -> pa.Table:
    """One row per instance, ids from ``first_id``, geometry as WKB in the source CRS (pixels when
    it has none): the instances layer's columns."""
    geometry = to_source_crs(detections.geometry, source)
    ground = ground_area_m2(geometry, source.crs_wkt)
    area = shapely.area(geometry)
    n = len(detections)
    columns = {
        "instance_id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
        "image_id": pa.array([source.image_id] * n, pa.string()),
        "class_id": pa.array(detections.label.astype(np.int32)),
        "class": pa.array(np.asarray(class_names, dtype=object)[detections.label.astype(np.intp)], pa.string()),
        "score": pa.array(detections.score.astype(np.float64).round(5)),
        "area": pa.array(area),
        "area_px": pa.array(shapely.area(detections.geometry) * source.pixel_scale**2),
        **({"area_um2": pa.array(area * np.prod(source.mpp_sides))} if source.mpp else {}),  # µm per output (level-0) pixel
        **({"area_m2": pa.array(ground)} if ground is not None else {}),
        "tile_id": pa.array(detections.tile.astype(np.int32)),
        "geometry": pa.array(shapely.to_wkb(geometry), pa.binary()),
    }
    return pa.table(columns)


def write_part(detections: Detections, first_id: int, source: RasterSource, class_names: list[str], path: Path) -> Path:
    """Stage consecutive instances (ids from ``first_id``) as a Parquet part of the instances
    layer, atomically; ``write_outputs`` streams the parts into the GeoPackage."""
    with atomic_path(path) as tmp:
        pq.write_table(instances_table(detections, first_id, source, class_names), tmp)
    return path


QUPATH_IDS = uuid.UUID("5e4a11ce-5ea1-4e00-9000-000000000000")  # namespace of detections' UUIDs (QuPath drops other ids)


def _qupath_features(batch: pa.RecordBatch, mpp_sides: tuple[float, float]) -> str:
    """GeoJSON features QuPath imports as detections (level-0 pixel coordinates), comma-joined;
    perimeters in µm from both sides of a pixel (across, down), which may differ."""
    columns = batch.to_pydict()
    geometry = shapely.from_wkb(batch.column("geometry").to_numpy(zero_copy_only=False))
    perimeters = shapely.length(shapely.transform(geometry, lambda xy: xy * np.asarray(mpp_sides)))
    features = []
    for k, polygon in enumerate(geometry):
        features.append(json.dumps({
            "type": "Feature",
            "id": str(uuid.uuid5(QUPATH_IDS, f"{columns['image_id'][k]}/{columns['instance_id'][k]}")),
            "geometry": shapely.geometry.mapping(polygon),
            "properties": {
                "objectType": "detection",
                "classification": {"name": columns["class"][k]},
                "measurements": {
                    "Area µm^2": float(columns["area_um2"][k]),
                    "Perimeter µm": float(perimeters[k]),
                    "Score": float(columns["score"][k]),
                    "Instance id": float(columns["instance_id"][k]),  # the GeoPackage row: QuPath keeps numbers
                },
            },
        }))
    return ",".join(features)


def counts_frame(counts: np.ndarray, source: RasterSource, class_names: list[str]) -> pd.DataFrame:
    """Instances per class, every class listed (zero included)."""
    return pd.DataFrame({"image_id": source.image_id, "class": class_names, "count": np.asarray(counts, np.int64)})


def write_outputs(
    parts: list[Path], counts: np.ndarray, source: RasterSource, class_names: list[str], out_dir: Path,
    extra: dict | None = None, staged: dict[Path, Path] | None = None,
) -> dict:
    """Write ``instances.gpkg``, ``counts.csv``, ``counts.json`` (and ``qupath.geojson`` for slides)
    into ``out_dir`` from the instance ``parts`` (``write_part``, in id order) and the ``counts`` per
    class, streaming one record batch at a time. It is one commit: every file is written under a
    temporary name first and renamed only when all were written, ``counts.json`` last; ``staged``
    directories (final: temporary) are moved in with them. A failure anywhere leaves the previous
    outputs as they were."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts_table = counts_frame(counts, source, class_names)
    gpkg = out_dir / "instances.gpkg"
    outputs = {"geopackage": str(gpkg), "counts_csv": str(out_dir / "counts.csv")}
    if source.mpp:
        outputs["qupath_geojson"] = str(out_dir / "qupath.geojson")
    summary = {
        "image": source.path,
        "image_id": source.image_id,
        "crs": source.crs_wkt,
        "instances": int(np.sum(counts)),
        "counts": dict(zip(counts_table["class"], counts_table["count"].tolist())),
        "outputs": outputs,
        "read": {  # how the image was read, so a preview shows what the model saw
            "bands": list(source.bands), "value_range": [list(r) for r in source.value_range] if source.value_range else None,
            "mpp": source.mpp,
        },
        **(extra or {}),
    }
    try:
        _commit_outputs(parts, counts_table, summary, source, class_names, out_dir, staged)
    except Exception as err:
        free = shutil.disk_usage(out_dir).free
        if free < LOW_DISK_BYTES and not (isinstance(err, OSError) and err.errno == errno.ENOSPC):
            # GDAL and SQLite report a full disk as whatever failed next ("no such table: gpkg_contents")
            raise OSError(errno.ENOSPC, f"{out_dir}: disk full ({free / 2**20:.1f} MiB free) while writing the outputs "
                          f"({type(err).__name__}: {err}); the previous outputs are kept") from err
        raise
    return summary


LOW_DISK_BYTES = 64 * 2**20  # a failed write with less free space than this is reported as a full disk


def _commit_outputs(parts, counts_table, summary: dict, source: RasterSource, class_names: list[str], out_dir: Path,
                    staged: dict[Path, Path] | None) -> None:
    """``write_outputs``' files, under temporary names, renamed together (``counts.json`` last)."""
    gpkg = out_dir / "instances.gpkg"
    commit = ExitStack()
    for tmp in (staged or {}).values():  # a failed commit removes the staged directories too
        commit.callback(shutil.rmtree, tmp, ignore_errors=True)
    with commit:  # renames happen on a clean exit, in reverse order: counts.json last
        summary_tmp = commit.enter_context(atomic_path(out_dir / "counts.json"))
        gpkg_tmp = commit.enter_context(atomic_path(gpkg))
        qupath = commit.enter_context(atomic_path(out_dir / "qupath.geojson")).open("w") if source.mpp else None
        if qupath:
            commit.callback(qupath.close)  # before its rename: callbacks run last in, first out
        schema = instances_table(Detections.empty(), 1, source, class_names).schema

        def batches():
            if qupath:
                qupath.write('{"type": "FeatureCollection", "features": [')
            written = 0
            for part in parts:
                for batch in pq.ParquetFile(part).iter_batches(batch_size=BATCH_ROWS):
                    if qupath and batch.num_rows:
                        qupath.write(("," if written else "") + _qupath_features(batch, source.mpp_sides))
                    written += batch.num_rows
                    yield batch
            if qupath:
                qupath.write("]}")

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="'crs' was not provided")  # pixel space, documented
            pyogrio.write_arrow(
                pa.RecordBatchReader.from_batches(schema, batches()), gpkg_tmp, layer=INSTANCES_LAYER, driver="GPKG",
                geometry_name="geometry", geometry_type="Polygon", crs=source.crs_wkt, layer_options={"SPATIAL_INDEX": "YES"},
            )
            pyogrio.write_dataframe(counts_table, gpkg_tmp, layer=COUNTS_LAYER, driver="GPKG", append=False)
        stamp_last_change(gpkg_tmp, source.path)
        counts_table.to_csv(commit.enter_context(atomic_path(out_dir / "counts.csv")), index=False)
        summary_tmp.write_text(json.dumps(summary, indent=2))
        for final, tmp in (staged or {}).items():
            move_into_place(tmp, final)


def stamp_last_change(gpkg: Path, image: str | Path) -> None:
    """Date every layer of ``gpkg`` (``gpkg_contents.last_change``) by the image file's modification
    time instead of the moment GDAL wrote it: identical runs over one image then write
    byte-identical GeoPackages (checksums, deduplicating archives). Left as GDAL wrote it when the
    image cannot be stat'ed."""
    try:
        modified = datetime.fromtimestamp(os.stat(image).st_mtime, timezone.utc)
    except (OSError, TypeError, ValueError):
        return
    stamp = modified.strftime("%Y-%m-%dT%H:%M:%S.") + f"{modified.microsecond // 1000:03d}Z"  # the GeoPackage format
    with closing(sqlite3.connect(gpkg)) as db, db:
        db.execute("UPDATE gpkg_contents SET last_change = ?", (stamp,))


SQLITE_MAGIC = b"SQLite format 3\x00"


def _sqlite_whole(path: Path) -> bool:
    """Whether ``path`` is an SQLite file (a GeoPackage) of the length its header declares (page
    size × page count): a truncated copy or another file is not."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(100)
        size = path.stat().st_size
    except OSError:
        return False
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        return False
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    return size == page_size * int.from_bytes(header[28:32], "big")


def outputs_damage(out_dir: Path) -> str | None:
    """What is missing or damaged among the outputs ``write_outputs`` committed to ``out_dir``
    (``counts.json`` unreadable, a file it lists gone, the GeoPackage truncated, ``labels.zarr``
    without its metadata); None when they are whole. Cheap: headers and names only."""
    try:
        summary = json.loads((out_dir / "counts.json").read_text())
        listed = [Path(p).name for p in summary["outputs"].values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{out_dir / 'counts.json'} unreadable ({type(err).__name__})"
    if "labels_zarr" in summary:
        listed.append("labels.zarr/zarr.json")
    for name in listed:
        if not (out_dir / name).is_file():
            return f"{out_dir / name} missing"
    if not _sqlite_whole(out_dir / "instances.gpkg"):
        return f"{out_dir / 'instances.gpkg'} truncated or not a GeoPackage"
    return None
