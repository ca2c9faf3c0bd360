"""One GeoParquet dataset over a run's outputs: ``OUT/catalogue/image_id=<id>/part-0.parquet``.

An image's id is its output folder's name (``OUT/<id>/``, unique within a run). Each partition
holds that image's instances as GeoParquet 1.1 (WKB geometry, the image's CRS in the ``geo``
metadata, a ``bbox`` covering column so readers skip row groups by extent) and carries its
GeoPackage's modification time, so a rebuild rewrites only images whose outputs changed and
drops partitions of images that are gone. ``_images.parquet`` lists the images: id, image file,
output folder, CRS (WKT, null for pixel space), instance count and counts per class (its ``_``
keeps it out of the dataset, as Arrow readers skip such files).

DuckDB reads it with ``read_parquet('OUT/catalogue/*/*.parquet', hive_partitioning = true)``;
pandas, geopandas and pyarrow read the folder as one partitioned dataset (``image_id`` is stored
dictionary-encoded, the type those readers give a partition key, so the two agree).
Its GEOMETRY type carries one CRS, so to read geometries of images in different CRSs in one
query, first ``SET enable_geoparquet_conversion = false`` (geometries then arrive as WKB).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
import shapely
import zarr
from pyogrio.errors import DataLayerError, DataSourceError

from pipeline.ground_area import ground_area_m2
from pipeline.writers import INSTANCES_LAYER
from workflows.ledger import LEDGER_NAME, Ledger

CATALOGUE = "catalogue"
IMAGES = "_images.parquet"
OLD_IMAGES = "images.parquet"  # before 2026-12-04: inside the dataset, where Arrow readers choke on it
PARTITION_FILE = "part-0.parquet"
IMAGE_ID_TYPE = pa.dictionary(pa.int32(), pa.string())
ROW_GROUP_ROWS = 16_384  # instances come sorted by position: row groups are strips a bbox filter can skip
COLUMNS = {
    "image_id": "category", "instance_id": "int64", "class_id": "int32", "class": "str", "score": "float64",
    "area": "float64", "area_px": "float64", "area_um2": "float64", "area_m2": "float64", "tile_id": "int32",
}
IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("image", pa.string()), ("folder", pa.string()), ("crs", pa.string()),
    ("instances", pa.int64()), ("counts", pa.map_(pa.string(), pa.int64())),
])


class CatalogueError(ValueError):
    """Outputs that cannot be catalogued; the message names the path and the problem."""


@dataclass(frozen=True)
class ImageOutput:
    """One image's output folder: ``instances.gpkg`` and its ``counts.json`` summary."""

    folder: Path

    @property
    def image_id(self) -> str:
        return self.folder.name

    @property
    def geopackage(self) -> Path:
        return self.folder / "instances.gpkg"

    def summary(self) -> dict:
        return json.loads((self.folder / "counts.json").read_text())

    def instances(self, start: int = 0, rows: int | None = None) -> gpd.GeoDataFrame:
        """``rows`` instances (all by default) from row ``start``; a damaged GeoPackage is named."""
        return self._reading(pyogrio.read_dataframe, skip_features=start, max_features=rows)

    def density_cell_side(self) -> float | None:
        """The side of its ``labels.zarr`` density cells in output coordinates (None without one):
        the run's cell in the pixels it segmented, which a resampled image does not share with its file."""
        store = self.folder / "labels.zarr"
        if not store.is_dir():
            return None
        attrs = zarr.open_group(store, mode="r").attrs
        return attrs["density_cell_size"] * abs(attrs["geotransform"][1]) if "density_cell_size" in attrs else None

    def info(self) -> dict:
        """pyogrio's description of the instances layer (feature count, bounds)."""
        return self._reading(pyogrio.read_info)

    def _reading(self, read, **options):
        try:
            return read(self.geopackage, layer=INSTANCES_LAYER, **options)
        except (DataSourceError, DataLayerError) as err:
            raise CatalogueError(
                f"{self.geopackage}: not a readable GeoPackage ({' '.join(str(err).split())}); run the image again to rewrite it"
            ) from None


def image_outputs(out_root: str | Path) -> list[ImageOutput]:
    """Every complete image output under ``out_root`` (GeoPackage and counts), by id."""
    out_root = Path(out_root)
    if not out_root.is_dir():
        raise CatalogueError(f"{out_root}: output directory not found")
    folders = sorted(p.parent for p in out_root.glob("*/instances.gpkg") if (p.parent / "counts.json").is_file())
    current = _ledger_done(out_root)
    return [ImageOutput(f) for f in folders if f.name != CATALOGUE and (current is None or f.name in current)]


def _ledger_done(out_root: Path) -> set[str] | None:
    """Output folders whose results a workflow's ledger serves (``Ledger.served_folders``; None: no
    ledger). Results of images that failed since, whose file is gone or that are no longer an
    input stay on disk but are not served."""
    if not (out_root / LEDGER_NAME).is_file():
        return None
    with Ledger(out_root) as ledger:
        return ledger.served_folders()


def find_output(out_root: str | Path, image_id: str) -> ImageOutput:
    """The output of image ``image_id``; the error lists the ids that exist."""
    outputs = {o.image_id: o for o in image_outputs(out_root)}
    if image_id not in outputs:
        known = ", ".join(sorted(outputs)[:10]) or "none"
        raise CatalogueError(f"no outputs for image {image_id!r} in {out_root} (images: {known})")
    return outputs[image_id]


def partition_path(catalogue: Path, image_id: str) -> Path:
    """Hive-style partition file of one image (the id URL-encoded, as Hive readers decode it)."""
    return catalogue / f"image_id={quote(image_id, safe='')}" / PARTITION_FILE


def partition_frame(output: ImageOutput, start: int = 0, rows: int | None = None) -> gpd.GeoDataFrame:
    """An image's instances (``rows`` of them from row ``start``; all by default) with the
    catalogue's columns and types (``area_um2`` null for rasters, ``area_m2`` null without a CRS)."""
    frame = output.instances(start, rows)
    frame["image_id"] = output.image_id
    if "area_um2" not in frame:
        frame["area_um2"] = np.nan
    if "area_m2" not in frame:  # not georeferenced, or written before outputs had ground areas and oriented rings
        ground = ground_area_m2(frame.geometry.values, frame.crs.to_wkt() if frame.crs else None)
        frame["area_m2"] = np.nan if ground is None else ground
        if ground is not None:
            frame.geometry = shapely.orient_polygons(frame.geometry.values)
    return frame[[*COLUMNS, "geometry"]].astype(COLUMNS)


def _geoparquet_table(frame: gpd.GeoDataFrame, bounds: list[float] | None) -> pa.Table:
    """``frame`` as GeoParquet 1.1 (WKB, ``bbox`` covering column) as geopandas writes it; the
    ``geo`` metadata's extent is ``bounds``, the whole image's, when given."""
    from geopandas.io.arrow import _geopandas_to_arrow  # what GeoDataFrame.to_parquet writes, a table at a time

    table = _geopandas_to_arrow(frame, index=False, schema_version="1.1.0", write_covering_bbox=True)
    column = table.schema.get_field_index("image_id")  # the type Arrow readers give the partition key
    table = table.set_column(column, "image_id", table["image_id"].cast(IMAGE_ID_TYPE))
    geo = json.loads(table.schema.metadata[b"geo"])
    geo["columns"]["geometry"]["orientation"] = "counterclockwise"  # partition_frame orients every polygon
    if bounds is not None:
        geo["columns"]["geometry"]["bbox"] = bounds
    return table.replace_schema_metadata({**table.schema.metadata, b"geo": json.dumps(geo).encode()})


@contextmanager
def _atomic(path: Path):
    """Yield a temporary sibling that no ``*.parquet`` glob matches; rename it on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _is_current(output: ImageOutput, catalogue: Path) -> bool:
    part = partition_path(catalogue, output.image_id)
    if not part.is_file() or part.stat().st_mtime_ns != output.geopackage.stat().st_mtime_ns:
        return False
    schema = pq.read_schema(part)  # written with today's columns and types
    return set(COLUMNS) <= set(schema.names) and schema.field("image_id").type == IMAGE_ID_TYPE


def _write_partition(output: ImageOutput, catalogue: Path) -> None:
    """The image's instances as GeoParquet, read and written one row group at a time, so the
    memory it takes does not grow with the image's instances (a slide can have millions)."""
    stamp = output.geopackage.stat().st_mtime_ns  # taken before reading: a later change shows as a mismatch
    info = output.info()
    count = info["features"]
    bounds = [float(b) for b in info["total_bounds"]] if count else None
    with _atomic(partition_path(catalogue, output.image_id)) as tmp:
        writer = None
        try:
            for start in range(0, max(count, 1), ROW_GROUP_ROWS):
                table = _geoparquet_table(partition_frame(output, start, ROW_GROUP_ROWS), bounds)
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                # every row group under the first one's `geo` metadata (whole-image extent, same encoding)
                writer.write_table(table.replace_schema_metadata(writer.schema.metadata), row_group_size=ROW_GROUP_ROWS)
        finally:
            if writer is not None:
                writer.close()
        os.utime(tmp, ns=(stamp, stamp))


def _images_table(outputs: list[ImageOutput]) -> pa.Table:
    summaries = [o.summary() for o in outputs]
    return pa.Table.from_pylist(
        [
            {
                "image_id": o.image_id, "image": s.get("image"), "folder": str(o.folder.resolve()), "crs": s.get("crs"),
                "instances": s.get("instances"), "counts": list(s.get("counts", {}).items()),
            }
            for o, s in zip(outputs, summaries)
        ],
        schema=IMAGES_SCHEMA,
    )


def build_catalogue(out_root: str | Path) -> Path:
    """Create or refresh ``out_root/catalogue``: rewrite partitions whose GeoPackage changed,
    remove those of images no longer present, rewrite ``_images.parquet`` when anything changed."""
    outputs = image_outputs(out_root)
    if not outputs and not any((Path(out_root) / name).is_file() for name in ("run.json", LEDGER_NAME)):
        raise CatalogueError(f"{out_root}: not the output directory of a run (no run.json, no image folder with "
                             "instances.gpkg and counts.json); give the --out of `seamline run`")
    catalogue = Path(out_root) / CATALOGUE
    changed = [o for o in outputs if not _is_current(o, catalogue)]
    for output in changed:
        _write_partition(output, catalogue)
    keep = {partition_path(catalogue, o.image_id).parent for o in outputs}
    stale = [d for d in catalogue.glob("image_id=*") if d not in keep]
    for folder in stale:
        shutil.rmtree(folder)
    if changed or stale or not (catalogue / IMAGES).is_file():
        with _atomic(catalogue / IMAGES) as tmp:
            pq.write_table(_images_table(outputs), tmp)
    (catalogue / OLD_IMAGES).unlink(missing_ok=True)
    return catalogue


def read_images(catalogue: Path) -> list[dict]:
    """The rows of ``_images.parquet``, counts as ordered dicts."""
    rows = pq.read_table(catalogue / IMAGES).to_pylist()
    return [{**row, "counts": dict(row["counts"])} for row in rows]
