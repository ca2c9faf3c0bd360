"""Per-image outputs: GeoPackage of instances (+ counts table), counts as CSV and JSON.

Every file is written under a temporary name in its final directory and renamed into place,
so a reader never sees half a file and a failed write leaves earlier results untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely

from pipeline.detections import Detections
from pipeline.label_store import move_into_place
from pipeline.sources import RasterSource

INSTANCES_LAYER = "instances"
COUNTS_LAYER = "counts"


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


def to_source_crs(geometry: np.ndarray, source: RasterSource) -> np.ndarray:
    """Pixel (column, row) polygons → the source's CRS through its affine transform, once."""
    a, b, c, d, e, f = source.transform[:6]
    matrix = np.array([[a, d], [b, e]])
    return shapely.transform(geometry, lambda xy: xy @ matrix + np.array([c, f]))


def instances_frame(detections: Detections, source: RasterSource, class_names: list[str]) -> gpd.GeoDataFrame:
    """One row per instance, geometry in the source CRS (pixels when it has none)."""
    geometry = to_source_crs(detections.geometry, source)
    return gpd.GeoDataFrame(
        {
            "instance_id": np.arange(1, len(detections) + 1, dtype=np.int64),
            "image_id": source.image_id,
            "class_id": detections.label.astype(np.int32),
            "class": np.asarray(class_names, dtype=object)[detections.label] if len(detections) else [],
            "score": detections.score.astype(np.float64).round(5),
            "area": shapely.area(geometry),
            "area_px": shapely.area(detections.geometry) * source.pixel_scale**2,
            **({"area_um2": shapely.area(detections.geometry) * (source.pixel_scale * source.mpp) ** 2} if source.mpp else {}),
            "tile_id": detections.tile.astype(np.int32),
        },
        geometry=gpd.GeoSeries(geometry, crs=source.crs_wkt),
    )


def qupath_features(frame: gpd.GeoDataFrame, mpp: float) -> dict:
    """A GeoJSON FeatureCollection QuPath imports as detections (level-0 pixel coordinates)."""
    features = []
    for row, geometry in zip(frame.itertuples(index=False), frame.geometry.values):
        features.append({
            "type": "Feature",
            "id": f"{row.image_id}-{row.instance_id}",
            "geometry": shapely.geometry.mapping(geometry),
            "properties": {
                "objectType": "detection",
                "classification": {"name": row[frame.columns.get_loc("class")]},
                "measurements": {
                    "Area µm^2": float(row.area_um2),
                    "Perimeter µm": float(geometry.length * mpp),
                    "Score": float(row.score),
                },
            },
        })
    return {"type": "FeatureCollection", "features": features}


def counts_frame(detections: Detections, source: RasterSource, class_names: list[str]) -> pd.DataFrame:
    """Instances per class, every class listed (zero included)."""
    counts = np.bincount(detections.label.astype(np.int64), minlength=len(class_names))
    return pd.DataFrame({"image_id": source.image_id, "class": class_names, "count": counts.astype(np.int64)})


def write_outputs(
    detections: Detections, source: RasterSource, class_names: list[str], out_dir: Path, extra: dict | None = None,
    staged: dict[Path, Path] | None = None,
) -> dict:
    """Write ``instances.gpkg``, ``counts.csv``, ``counts.json`` (and ``qupath.geojson`` for slides)
    into ``out_dir``, as one commit: every file is written under a temporary name first and renamed
    only when all were written, ``counts.json`` last; ``staged`` directories (final: temporary) are
    moved in with them. A failure anywhere leaves the previous outputs as they were."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = instances_frame(detections, source, class_names)
    counts = counts_frame(detections, source, class_names)
    gpkg = out_dir / "instances.gpkg"
    outputs = {"geopackage": str(gpkg), "counts_csv": str(out_dir / "counts.csv")}
    if source.mpp:
        outputs["qupath_geojson"] = str(out_dir / "qupath.geojson")
    summary = {
        "image": source.path,
        "image_id": source.image_id,
        "crs": source.crs_wkt,
        "instances": int(len(detections)),
        "counts": dict(zip(counts["class"], counts["count"].tolist())),
        "outputs": outputs,
        **(extra or {}),
    }
    commit = ExitStack()
    for tmp in (staged or {}).values():  # a failed commit removes the staged directories too
        commit.callback(shutil.rmtree, tmp, ignore_errors=True)
    with commit:  # renames happen on a clean exit, in reverse order: counts.json last
        summary_tmp = commit.enter_context(atomic_path(out_dir / "counts.json"))
        gpkg_tmp = commit.enter_context(atomic_path(gpkg))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="'crs' was not provided")  # pixel space, documented
            pyogrio.write_dataframe(
                frame, gpkg_tmp, layer=INSTANCES_LAYER, driver="GPKG", geometry_type="Polygon", SPATIAL_INDEX="YES"
            )
            pyogrio.write_dataframe(counts, gpkg_tmp, layer=COUNTS_LAYER, driver="GPKG", append=False)
        counts.to_csv(commit.enter_context(atomic_path(out_dir / "counts.csv")), index=False)
        if source.mpp:
            commit.enter_context(atomic_path(out_dir / "qupath.geojson")).write_text(json.dumps(qupath_features(frame, source.mpp)))
        summary_tmp.write_text(json.dumps(summary, indent=2))
        for final, tmp in (staged or {}).items():
            move_into_place(tmp, final)
    return summary
