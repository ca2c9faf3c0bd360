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
import warnings
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
from workflows.ledger import LEDGER_NAME, Ledger, LedgerError

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


class CatalogueWarning(UserWarning):
    """An image left out of the catalogue: its outputs cannot be read (the message names the file)."""


def unwritable(path: Path, err: OSError) -> str:
    """Why ``path`` could not be written, in one line naming it."""
    blocker = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)
    return f"{path}: cannot write it ({f'{blocker} is a file, not a folder' if blocker else err.strerror or err})"


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

    @property
    def counts_json(self) -> Path:
        return self.folder / "counts.json"

    def summary(self) -> dict:
        """``counts.json``; a damaged one is named."""
        try:
            summary = json.loads(self.counts_json.read_text())
        except (OSError, ValueError) as err:  # UnicodeDecodeError, JSONDecodeError
            raise CatalogueError(f"{self.counts_json}: not readable JSON ({err}); run the image again to rewrite it") from None
        if not isinstance(summary, dict):
            raise CatalogueError(f"{self.counts_json}: not an image summary (a JSON object); run the image again to rewrite it")
        return summary

    def instances(self, start: int = 0, rows: int | None = None) -> gpd.GeoDataFrame:
        """``rows`` instances (all by default) from row ``start``; a damaged GeoPackage is named."""
        return self._reading(pyogrio.read_dataframe, skip_features=start, max_features=rows)

    def density_cell_side(self) -> float | None:
        """The side of its ``labels.zarr`` density cells in output coordinates (None without one):
        the run's cell in the pixels it segmented, which a resampled image does not share with its file."""
        store = self.folder / "labels.zarr"
        if not store.is_dir():
            return None
        try:
            attrs = zarr.open_group(store, mode="r").attrs
            return attrs["density_cell_size"] * abs(attrs["geotransform"][1]) if "density_cell_size" in attrs else None
        except (OSError, ValueError, KeyError, IndexError, TypeError) as err:  # damaged zarr.json or attributes
            raise CatalogueError(f"{store}: unreadable metadata ({type(err).__name__}: {err}); "
                                 "run the image again to rewrite it") from None

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
    try:
        ledger = Ledger(out_root)
    except LedgerError as err:  # which results it serves is unknown: none is served
        raise CatalogueError(str(err)) from None
    with ledger:
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
    try:
        schema = pq.read_schema(part)  # written with today's columns and types
    except (OSError, pa.ArrowException):  # damaged: written again
        return False
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


def _image_row(output: ImageOutput) -> dict:
    """The image's row of ``_images.parquet``, from its ``counts.json``."""
    summary = output.summary()
    counts = summary.get("counts", {})
    row = {
        "image_id": output.image_id, "image": summary.get("image"), "folder": str(output.folder.resolve()), "crs": summary.get("crs"),
        "instances": summary.get("instances"), "counts": list(counts.items()) if isinstance(counts, dict) else counts,
    }
    try:
        pa.Table.from_pylist([row], schema=IMAGES_SCHEMA)
    except (TypeError, pa.ArrowException) as err:
        raise CatalogueError(f"{output.counts_json}: not an image summary ({err}); run the image again to rewrite it") from None
    return row


def _holds(path: Path, table: pa.Table) -> bool:
    """Whether ``path`` is a readable Parquet file holding ``table``."""
    try:
        return pq.read_table(path).equals(table)
    except (OSError, pa.ArrowException):
        return False


def build_catalogue(out_root: str | Path) -> Path:
    """Create or refresh ``out_root/catalogue``: rewrite partitions whose GeoPackage changed or that
    cannot be read, remove those of images no longer present, rewrite ``_images.parquet`` when
    anything changed or it does not list the images as their summaries do. An image whose outputs
    cannot be read is left out (a warning names the file); when every image is, that is an error."""
    outputs = image_outputs(out_root)
    if not outputs and not any((Path(out_root) / name).is_file() for name in ("run.json", LEDGER_NAME)):
        raise CatalogueError(f"{out_root}: not the output directory of a run (no run.json, no image folder with "
                             "instances.gpkg and counts.json); give the --out of `seamline run`")
    catalogue = Path(out_root) / CATALOGUE
    rows, changed, problems = [], False, []
    try:
        for output in outputs:
            try:
                row = _image_row(output)
                if not _is_current(output, catalogue):
                    _write_partition(output, catalogue)
                    changed = True
            except CatalogueError as err:
                problems.append(str(err))
            else:
                rows.append(row)
        keep = {partition_path(catalogue, row["image_id"]).parent for row in rows}
        stale = [d for d in catalogue.glob("image_id=*") if d not in keep]
        for folder in stale:
            shutil.rmtree(folder)
        images = pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)
        if changed or stale or not _holds(catalogue / IMAGES, images):
            with _atomic(catalogue / IMAGES) as tmp:
                pq.write_table(images, tmp)
        (catalogue / OLD_IMAGES).unlink(missing_ok=True)
    except OSError as err:
        raise CatalogueError(f"{unwritable(Path(err.filename or catalogue), err)}; the catalogue of {out_root} cannot "
                             "be built or refreshed there: query a writable copy of the folder") from None
    if problems and not rows:
        raise CatalogueError(problems[0] + (f" (and {len(problems) - 1} more images)" if len(problems) > 1 else ""))
    for problem in problems:
        warnings.warn(f"{problem}; left out of the catalogue", CatalogueWarning, stacklevel=2)
    return catalogue


def read_images(catalogue: Path) -> list[dict]:
    """The rows of ``_images.parquet``, counts as ordered dicts."""
    rows = pq.read_table(catalogue / IMAGES).to_pylist()
    return [{**row, "counts": dict(row["counts"])} for row in rows]
