"""Query a run's instances through its catalogue, and counts per region.

DuckDB prefilters the catalogue with parameterised SQL (``?`` placeholders only): attributes
(class, score, area) and the bbox covering columns against the search extent; shapely then
decides exact intersections. Images are handled in groups sharing a CRS: a bbox or regions in a
CRS apply to georeferenced images (reprojected to each image's CRS), ``"pixels"`` (or regions
without a CRS) to pixel-space images (slides, unreferenced rasters); a bbox without ``bbox_crs``
is taken in every image's own coordinates. Area filters and region statistics use ground areas:
m² (``area_m2``) for georeferenced images, px² in pixel space. An instance belongs to a region when
its representative point lies within it.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import duckdb
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
import shapely
from pyogrio.errors import DataSourceError
from pyproj import CRS
from pyproj.exceptions import CRSError, ProjError

from pipeline.writers import atomic_path
from workflows.catalogue import CATALOGUE, COLUMNS, build_catalogue, partition_path, read_images, unwritable

PIXELS = "pixels"
DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON"}
GROUND_AREA = "coalesce(area_m2, area)"  # m² for georeferenced images, px² in pixel space
SELECTED = ", ".join(f'"{c}"' for c in [*COLUMNS, "geometry"])
Bbox = tuple[float, float, float, float]


class QueryError(ValueError):
    """A query that cannot run as asked; the message names the offending value."""


class _Damaged(Exception):
    """Catalogue partitions that cannot be read past their footer (which ``build_catalogue`` checks)."""

    def __init__(self, files: list[str], err: Exception):
        super().__init__(f"{files[0] if len(files) == 1 else Path(files[0]).parent.parent}: not readable "
                         f"({' '.join(str(err).split())})")
        self.files = files


@contextmanager
def _reading(files: list[str]):
    """Failures to read these partitions raised as ``_Damaged``."""
    try:
        yield
    except (duckdb.Error, pa.ArrowException, OSError) as err:
        raise _Damaged(files, err) from None


def _check_crs(crs: str | None) -> None:
    if crs not in (None, PIXELS):
        try:
            CRS.from_user_input(crs)
        except CRSError as err:
            raise QueryError(f"unknown CRS {crs!r}") from err


def _check_bbox(bbox: Bbox | None) -> None:
    if bbox is not None and not (len(bbox) == 4 and bbox[0] < bbox[2] and bbox[1] < bbox[3] and all(map(math.isfinite, bbox))):
        raise QueryError(f"bbox {tuple(bbox)} must be x0,y0,x1,y1 (finite) with x0 < x1 and y0 < y1")


def _check_finite(name: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise QueryError(f"{name} {value} must be a finite number")


def _check_known(kind: str, wanted: list[str] | None, known: list[str]) -> None:
    for name in wanted or []:
        if name not in known:
            raise QueryError(f"unknown {kind} {name!r}; known: {', '.join(known[:20]) or 'none'}")


def known_classes(images: list[dict]) -> list[str]:
    """Every class named in the images' counts, in model order."""
    return list(dict.fromkeys(c for row in images for c in row["counts"]))


def bbox_in(bbox: Bbox, bbox_crs: str | None, crs: CRS | None, extent: Bbox | None = None) -> shapely.Geometry:
    """The bbox as a polygon in ``crs`` (for images it applies to: see ``_applies``). With the
    images' ``extent`` (in ``crs``), the bbox is first cut to it, in ``bbox_crs``: a box far larger
    than the images (the world, in lon/lat) does not reproject into a UTM zone."""
    box = shapely.box(*bbox)
    if bbox_crs is None or crs is None:
        return box
    dense = shapely.segmentize(box, max(bbox[2] - bbox[0], bbox[3] - bbox[1]) / 100)
    if extent is None:
        return gpd.GeoSeries([dense], crs=bbox_crs).to_crs(crs).iloc[0]
    dense = shapely.intersection(_with_turns(dense, bbox_crs), _footprint(extent, crs, bbox_crs))
    return _unwrapped(gpd.GeoSeries([dense], crs=bbox_crs).to_crs(crs).values, crs, extent)[0]


def regions_in(regions: gpd.GeoDataFrame, crs: CRS | None, extent: Bbox | None = None) -> gpd.GeoDataFrame | None:
    """Regions in ``crs``; None when they do not apply (a CRS on one side only). With the images'
    ``extent``, each region is first cut to it (as ``bbox_in``); rows stay in order."""
    if (regions.crs is None) != (crs is None):
        return None
    if crs is None:
        return regions
    if extent is None:
        return regions.to_crs(crs)
    footprint = _footprint(extent, crs, regions.crs)
    local = regions.set_geometry(shapely.intersection(_with_turns(regions.geometry.values, regions.crs), footprint)).to_crs(crs)
    return local.set_geometry(_unwrapped(local.geometry.values, crs, extent), crs=crs)


def _footprint(extent: Bbox, crs: CRS, into) -> shapely.Geometry:
    """``extent`` (in ``crs``), grown by 1 %, as a polygon in ``into`` (in lon/lat, unbroken across
    the antimeridian: a UTM 60S image's footprint reaches past 180°)."""
    x0, y0, x1, y1 = extent
    pad = 0.01 * max(x1 - x0, y1 - y0) + 1e-9
    box = shapely.segmentize(shapely.box(x0 - pad, y0 - pad, x1 + pad, y1 + pad), 25 * pad)
    moved = gpd.GeoSeries([box], crs=crs).to_crs(into)
    return (continuous_longitudes(moved.values) if moved.crs.is_geographic else moved.values)[0]


def continuous_longitudes(geometry: np.ndarray) -> np.ndarray:
    """Lon/lat shapes with each vertex's longitude moved by whole turns next to its shape's first
    vertex: reprojection wraps longitudes into ±180, which makes an object on the antimeridian span the globe."""
    coords, index = shapely.get_coordinates(geometry, return_index=True)
    if not len(coords):
        return geometry
    reference = coords[np.searchsorted(index, np.arange(len(geometry))), 0][index]
    coords[:, 0] = reference + (coords[:, 0] - reference + 180) % 360 - 180
    return shapely.set_coordinates(np.array(geometry, dtype=object, copy=True), coords)


def _with_turns(geometry, crs) -> np.ndarray:
    """In a lon/lat ``crs``, each shape with its copies a turn east and west: a footprint across the
    antimeridian (longitudes past 180, or below -180) meets a box given on the other side of it."""
    if not CRS.from_user_input(crs).is_geographic:
        return geometry
    return shapely.union_all([geometry, *(shapely.transform(geometry, lambda xy, t=turn: xy + [t, 0]) for turn in (-360, 360))], axis=0)


def _unwrapped(geometry: np.ndarray, crs: CRS, extent: Bbox) -> np.ndarray:
    """In a lon/lat ``crs``, longitudes moved by whole turns next to ``extent``: reprojection wraps
    them into ±180, which splits a shape around an image on the antimeridian across the globe."""
    if not crs.is_geographic:
        return geometry
    centre = (extent[0] + extent[2]) / 2
    return shapely.transform(geometry, lambda xy: np.column_stack([xy[:, 0] + 360 * np.round((centre - xy[:, 0]) / 360), xy[:, 1]]))


def _extent(files: list[str]) -> Bbox | None:
    """Bounds of the instances of these catalogue partitions (their GeoParquet ``bbox``); None when
    none has any."""
    with _reading(files):
        boxes = [json.loads(pq.read_metadata(f).metadata[b"geo"])["columns"]["geometry"].get("bbox") for f in files]
    boxes = np.array([b for b in boxes if b], dtype=float).reshape(-1, 4)
    return (*boxes[:, :2].min(axis=0), *boxes[:, 2:].max(axis=0)) if len(boxes) else None


def _fetch(files: list[str], classes, min_score, area_range, extent: tuple | None) -> gpd.GeoDataFrame:
    """Rows of the given partitions passing the attribute and bbox-covering prefilter."""
    clauses, params = [], [files]
    if classes:
        clauses.append(f"class IN ({', '.join('?' * len(classes))})")
        params += list(classes)
    if min_score is not None:
        clauses.append("score >= ?")
        params.append(float(min_score))
    lo, hi = area_range or (None, None)
    for clause, value in ((f"{GROUND_AREA} >= ?", lo), (f"{GROUND_AREA} <= ?", hi)):
        if value is not None:
            clauses.append(clause)
            params.append(float(value))
    if extent is not None:
        clauses.append("bbox.xmax >= ? AND bbox.xmin <= ? AND bbox.ymax >= ? AND bbox.ymin <= ?")
        params += [float(extent[0]), float(extent[2]), float(extent[1]), float(extent[3])]
    sql = (
        f"SELECT {SELECTED} FROM read_parquet(?, hive_partitioning = false) "
        f"WHERE {' AND '.join(clauses) or 'true'} ORDER BY image_id, instance_id"
    )
    with duckdb.connect() as con, _reading(files):
        con.execute("SET enable_geoparquet_conversion = false")  # WKB, whatever each file's CRS
        table = con.sql(sql, params=params).to_arrow_table()
    geometry = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
    return gpd.GeoDataFrame(table.drop_columns("geometry").to_pandas(), geometry=geometry)


def _envelope(*shapes: shapely.Geometry | None) -> tuple | None:
    """Bounds of the intersection of the given extents' bounding boxes (None: unbounded)."""
    boxes = [shapely.box(*shapely.bounds(s)) for s in shapes if s is not None]
    return tuple(shapely.bounds(shapely.intersection_all(boxes))) if boxes else None


def select(
    out_root: str | Path,
    bbox: Bbox | None = None,
    bbox_crs: str | None = None,
    classes: list[str] | None = None,
    min_score: float | None = None,
    area_range: tuple[float | None, float | None] | None = None,
    images: list[str] | None = None,
    regions: gpd.GeoDataFrame | None = None,
) -> list[gpd.GeoDataFrame]:
    """Matching instances, one frame per CRS, and per image in a lon/lat CRS (geometry as in the
    outputs). ``regions`` only restricts the search to the images they apply to and to their extent."""
    _check_bbox(bbox)
    _check_crs(bbox_crs)
    for name, value in zip(("min_score", "minimum area", "maximum area"), (min_score, *(area_range or (None, None)))):
        _check_finite(name, value)
    if area_range and None not in area_range and area_range[0] > area_range[1]:
        raise QueryError(f"area range {tuple(area_range)} is empty")
    filters = (bbox, bbox_crs, classes, min_score, area_range, images, regions)
    try:
        return _search(build_catalogue(out_root), *filters)
    except _Damaged as damaged:  # derived data: the partitions are written again from the outputs, once
        try:
            for file in damaged.files:
                Path(file).unlink(missing_ok=True)
            return _search(build_catalogue(out_root), *filters)
        except (_Damaged, OSError) as err:
            raise QueryError(f"{damaged}; not rebuilt ({err}): delete {Path(out_root) / CATALOGUE} to rebuild it") from None


def _search(catalogue: Path, bbox, bbox_crs, classes, min_score, area_range, images, regions) -> list[gpd.GeoDataFrame]:
    """``select`` in a refreshed catalogue."""
    rows = read_images(catalogue)
    _check_known("image", images, [r["image_id"] for r in rows])
    _check_known("class", classes, known_classes(rows))
    groups: dict[tuple[str | None, str | None], list[str]] = {}
    crs_of = {wkt: CRS.from_wkt(wkt) if wkt else None for wkt in {row["crs"] for row in rows}}
    for row in rows:
        if images is None or row["image_id"] in images:
            # lon/lat images one by one: their extents are unwrapped around each image (see _unwrapped)
            alone = crs_of[row["crs"]] is not None and crs_of[row["crs"]].is_geographic
            groups.setdefault((row["crs"], row["image_id"] if alone else None), []).append(row["image_id"])
    frames, skipped, applied, extents = [], [], 0, []
    for (wkt, _), ids in groups.items():
        crs = crs_of[wkt]
        if not _applies(crs, bbox_crs if bbox is not None else None, regions):
            skipped.append(crs)
            continue
        applied += 1
        files = [str(partition_path(catalogue, i)) for i in ids]
        extent = _extent(files)
        extents.append((crs, extent))
        extent = extent if crs is not None else None
        try:
            area = bbox_in(bbox, bbox_crs, crs, extent) if bbox is not None else None
            local = regions_in(regions, crs, extent) if regions is not None else None
        except ProjError as err:  # a site grid (engineering CRS) has no way to lon/lat
            given = bbox_crs if bbox is not None else crs_label(regions.crs)
            raise QueryError(f"cannot relate {given} to the images in {crs_label(crs)}: {err}") from None
        if (area is not None and area.is_empty) or (local is not None and local.geometry.is_empty.all()):
            continue  # away from every instance of these images
        shape = None if local is None else shapely.box(*local.total_bounds)
        frame = _fetch(files, classes, min_score, area_range, _envelope(area, shape)).set_crs(crs)
        if area is not None:
            frame = frame[shapely.intersects(frame.geometry.values, area)].reset_index(drop=True)
        frames.append(frame)
    if skipped and not applied:
        raise QueryError(_nothing_applies(skipped, bbox_crs if bbox is not None else None, regions))
    spans = [(c, e) for c, e in extents if e is not None]
    if bbox is not None and bbox_crs is None and spans and not any(shapely.box(*bbox).intersects(shapely.box(*e)) for _, e in spans):
        where = "; ".join(f"{crs_label(c)}: x {e[0]:.10g} to {e[2]:.10g}, y {e[1]:.10g} to {e[3]:.10g}" for c, e in spans[:3])
        raise QueryError(f"--bbox {tuple(bbox)} lies outside every image's instances, in their own coordinates ({where}); "
                         "a box in another CRS needs --bbox-crs")
    return frames


def _applies(crs: CRS | None, bbox_crs: str | None, regions: gpd.GeoDataFrame | None) -> bool:
    """Whether a bbox in ``bbox_crs`` and ``regions`` can apply to images in ``crs``: not when a
    CRS is on one side only (pixels against a CRS, or the reverse)."""
    bbox_fits = bbox_crs is None or (bbox_crs == PIXELS) == (crs is None)
    return bbox_fits and (regions is None or (regions.crs is None) == (crs is None))


def crs_label(crs: CRS | None) -> str:
    """A CRS in a few words: its authority code, else its name; ``pixels`` for none."""
    if crs is None:
        return PIXELS
    authority = crs.to_authority(min_confidence=90)
    return ":".join(authority) if authority else crs.name


def _nothing_applies(crss: list[CRS | None], bbox_crs: str | None, regions: gpd.GeoDataFrame | None) -> str:
    """Why a bbox or regions apply to none of the images (a CRS on one side only)."""
    if None in crss:
        images = "every image is in pixel space (slides, unreferenced rasters)"
        remedy = "give --bbox-crs pixels, or no --bbox-crs for each image's own coordinates" if bbox_crs else "use regions without a CRS, in pixels"
    else:
        images = f"every image has a CRS ({', '.join(sorted({crs_label(c) for c in crss}))})"
        remedy = "give the bbox in a CRS, or no --bbox-crs for each image's own coordinates" if bbox_crs else "give the regions a CRS"
    given = f"the bbox is in {bbox_crs}" if bbox_crs else f"the regions have {'no CRS' if regions.crs is None else crs_label(regions.crs)}"
    return f"nothing to search: {given} and {images}; {remedy}"


def combine(frames: list[gpd.GeoDataFrame], to_crs: str | None = None) -> gpd.GeoDataFrame:
    """One frame in ``to_crs``, or in the CRS all matches share; mixing CRSs needs ``to_crs``. Polygons
    have no height: a compound CRS counts as its horizontal part (EPSG:32631+5773 as EPSG:32631)."""
    found = [f.set_crs(_horizontal(f.crs), allow_override=True) for f in frames if len(f)]
    if not found:
        empty = frames[0] if frames else gpd.GeoDataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()}, geometry=[])
        return empty.set_crs(to_crs, allow_override=True) if to_crs else empty
    if to_crs is not None:
        unreferenced = sorted({i for f in found if f.crs is None for i in f["image_id"]})
        if unreferenced:
            raise QueryError(f"images without a CRS cannot be reprojected: {', '.join(unreferenced)}")
        found = [reprojected(f, to_crs) for f in found]
    elif any(f.crs != found[0].crs for f in found):
        names = sorted({crs_label(f.crs) for f in found})
        raise QueryError(f"matches lie in several CRSs ({', '.join(names)}): choose one with to_crs (--to-crs) or filter images")
    return gpd.GeoDataFrame(pd.concat(found, ignore_index=True), crs=found[0].crs)


def reprojected(frame: gpd.GeoDataFrame, crs) -> gpd.GeoDataFrame:
    """``frame`` in ``crs``, its ``area`` column (CRS units²: degrees² in lon/lat, as documented)
    measured again in the new units; in lon/lat, objects on the antimeridian stay whole."""
    try:
        moved = frame.to_crs(crs)
    except ProjError as err:
        raise QueryError(f"cannot reproject {crs_label(frame.crs)} to {crs_label(CRS.from_user_input(crs))}: {err}") from None
    if moved.crs.is_geographic:
        moved = moved.set_geometry(continuous_longitudes(moved.geometry.values), crs=moved.crs)
    if "area" not in moved:
        return moved
    return moved.assign(area=shapely.area(moved.geometry.values))


def _horizontal(crs: CRS | None) -> CRS | None:
    return crs.sub_crs_list[0] if crs is not None and crs.is_compound else crs


def ground_area(frame: gpd.GeoDataFrame) -> np.ndarray:
    """Areas comparable across images: m² for georeferenced ones, px² in pixel space."""
    return frame["area_m2"].fillna(frame["area"]).to_numpy()


def region_stats(frames: list[gpd.GeoDataFrame], regions: gpd.GeoDataFrame, classes: list[str]) -> gpd.GeoDataFrame:
    """Per region: ``count``, ``count_<class>``, ``mean_score``, ``mean_area``, ``total_area`` (m² on the
    ground, px² in pixel space)."""
    members = [pd.DataFrame({"region": np.array([], int), "class": np.array([], str), "score": [], "area": []})]
    for frame in frames:
        local = regions_in(regions, frame.crs, tuple(frame.total_bounds) if len(frame) else None)
        if local is None or frame.empty:
            continue
        points = shapely.point_on_surface(frame.geometry.values)
        inside, region = shapely.STRtree(local.geometry.values).query(points, predicate="within")
        members.append(pd.DataFrame({
            "region": region, "class": frame["class"].to_numpy()[inside],
            "score": frame["score"].to_numpy()[inside], "area": ground_area(frame)[inside],
        }))
    member = pd.concat(members)
    index = pd.RangeIndex(len(regions), name="region")
    stats = member.groupby("region").agg(
        count=("score", "size"), mean_score=("score", "mean"), mean_area=("area", "mean"), total_area=("area", "sum")
    ).reindex(index)
    per_class = pd.crosstab(member["region"], member["class"]).reindex(index=index, columns=classes, fill_value=0)
    result = regions.reset_index(drop=True).rename_axis("region")
    result["count"] = stats["count"].fillna(0).astype(np.int64)
    for name in classes:
        result[f"count_{name}"] = per_class[name].fillna(0).astype(np.int64)
    result["mean_score"] = stats["mean_score"]
    result["mean_area"] = stats["mean_area"]
    result["total_area"] = stats["total_area"].fillna(0.0)
    return result.reset_index()


def read_regions(within: str | Path | gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Regions from a vector file (first layer) or as given."""
    if isinstance(within, gpd.GeoDataFrame):
        return within
    if not Path(within).is_file():
        raise QueryError(f"{within}: regions file not found")
    try:
        regions = gpd.read_file(within)
    except Exception as err:  # pyogrio raises DataSourceError and others
        raise QueryError(f"{within}: not a readable vector file ({' '.join(str(err).split())})") from None
    if not regions.geom_type.isin(["Polygon", "MultiPolygon"]).any():
        raise QueryError(f"{within}: no polygons to count in")
    return regions


def query(
    out_root: str | Path,
    bbox: Bbox | None = None,
    bbox_crs: str | None = None,
    classes: list[str] | None = None,
    min_score: float | None = None,
    area_range: tuple[float | None, float | None] | None = None,
    images: list[str] | None = None,
    within: str | Path | gpd.GeoDataFrame | None = None,
    to_crs: str | None = None,
) -> gpd.GeoDataFrame:
    """Instances matching every filter (one frame: in ``to_crs``, else ``bbox_crs``, else their
    shared CRS); with ``within``, one row per region with counts and statistics instead."""
    _check_crs(to_crs)
    regions = read_regions(within) if within is not None else None
    frames = select(out_root, bbox, bbox_crs, classes, min_score, area_range, images, regions)
    if regions is not None:
        return region_stats(frames, regions, classes or known_classes(read_images(Path(out_root) / CATALOGUE)))
    target = to_crs if to_crs is not None else (bbox_crs if bbox_crs not in (None, PIXELS) else None)
    return combine(frames, target)


def write_result(frame: gpd.GeoDataFrame, path: str | Path) -> Path:
    """Write a query result as CSV (geometry as WKT), GeoPackage or GeoJSON, by extension, atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in {".csv", *DRIVERS}:
        raise QueryError(f"{path}: output must end in .csv, .gpkg or .geojson")
    try:
        _write(frame, path, suffix)
    except (OSError, DataSourceError) as err:  # a read-only folder, a file in the way, a full disk
        raise QueryError(unwritable(path, err) if isinstance(err, OSError) else f"{path}: cannot write it ({err})") from None
    return path


def _write(frame: gpd.GeoDataFrame, path: Path, suffix: str) -> None:
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="'crs' was not provided")  # pixel space
        if suffix == ".csv":
            frame.to_wkt(rounding_precision=-1).to_csv(tmp, index=False)  # every digit: 6 decimals of a degree move vertices ~7 cm
        else:
            if suffix == ".geojson" and frame.crs is not None and frame.crs.to_json_dict().get("id", {}).get("authority") != "EPSG":
                frame = reprojected(frame, "EPSG:4326")  # GeoJSON names a CRS only by EPSG code: else RFC 7946's lon/lat
            if suffix == ".geojson" and frame.crs is None and len(frame):
                warnings.warn(f"{path}: pixel coordinates, which GeoJSON cannot say: GIS software reads GeoJSON as "
                              "lon/lat (QuPath reads pixels); .gpkg keeps them apart", stacklevel=2)
            options = dict(geometry_type="Polygon") if "instance_id" in frame else {}  # declared even when empty
            if suffix == ".geojson" and frame.crs is not None and frame.crs.is_geographic:
                # GDAL cuts shapes across the antimeridian in two, as RFC 7946 asks; every digit kept (RFC7946's default: 7)
                options |= {"RFC7946": "YES", "COORDINATE_PRECISION": 15}
            pyogrio.write_dataframe(frame, tmp, driver=DRIVERS[suffix], layer=path.stem, **options)
