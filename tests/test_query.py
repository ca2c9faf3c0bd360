"""Catalogue and query on real pipeline outputs: three images in two CRSs and pixel space, plus an
image with no instances; every result is checked against a brute-force filter of the GeoPackages."""

import json
import os
import shutil
from pathlib import Path

import dask
import duckdb
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyogrio
import pytest
import shapely
import typer
from affine import Affine
from pyproj import Transformer
from typer.testing import CliRunner

from models.registry import resolve_model_dir
from models.synthetic import make_scene
from pipeline.graph import Tiling, image_graph
from pipeline.sources import open_raster
from pipeline.synthetic_raster import DEFAULT_TRANSFORM, write_geotiff
from workflows.analyst_cli import register
from workflows.catalogue import IMAGES, build_catalogue, partition_path
from workflows.query import QueryError, _fetch, query, select, write_result

ODD = "rect'); DROP TABLE instances; --"  # a class name that would break string-built SQL
CLASSES = ["ellipse", ODD, "triangle"]
UTM = "EPSG:32631"
GEOREFERENCED = ["alpha", "beta", "empty"]
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the pixel-space image


def segment(image: np.ndarray, path: Path, out: Path, crs, transform, nodata=None) -> None:
    write_geotiff(image, path, crs=crs, transform=transform, nodata=nodata)
    graph = image_graph(open_raster(path), str(resolve_model_dir()), CLASSES, out, Tiling(512, 64, 4))
    dask.compute(graph.result, scheduler="sync")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """OUT with alpha (UTM 31N), beta (Web Mercator, overlapping alpha), o'hare (pixels), empty."""
    root = tmp_path_factory.mktemp("query")
    out = root / "out"
    x, y = Transformer.from_crs(UTM, "EPSG:3857", always_xy=True).transform(430150, 5419900)
    segment(make_scene(1, 600, 800, density=1.5).image, root / "alpha.tif", out / "alpha", UTM, DEFAULT_TRANSFORM)
    segment(make_scene(2, 600, 700, density=1.5).image, root / "beta.tif", out / "beta", "EPSG:3857", Affine(0.75, 0, x, 0, -0.75, y))
    segment(make_scene(3, 500, 600, density=1.5).image, root / "o'hare.tif", out / "o'hare", None, Affine.identity())
    segment(np.zeros((300, 400, 3), np.uint8), root / "empty.tif", out / "empty", UTM, DEFAULT_TRANSFORM, nodata=0)
    truth = {d.name: gpd.read_file(d / "instances.gpkg", layer="instances") for d in sorted(out.iterdir())}
    build_catalogue(out)
    return out, truth


def ids(frame) -> set:
    return set(zip(frame["image_id"], frame["instance_id"]))


def brute(truth, keep, images=None) -> set:
    """(image, instance) pairs of the GeoPackages whose rows ``keep(frame)`` selects."""
    return {pair for name, frame in truth.items() if images is None or name in images for pair in ids(frame[keep(frame)])}


def test_catalogue_equals_the_per_image_outputs(run):
    out, truth = run
    assert truth["alpha"].crs.to_epsg() == 32631 and truth["beta"].crs.to_epsg() == 3857 and truth["o'hare"].crs is None
    assert len(truth["empty"]) == 0 and all(len(truth[i]) >= 20 for i in ["alpha", "beta", "o'hare"])
    for name, frame in truth.items():
        part = partition_path(out / "catalogue", name)
        assert part.parent.name == f"image_id={name.replace(chr(39), '%27')}"
        stored = gpd.read_parquet(part).astype({"image_id": str})  # dictionary-encoded, as partition keys are read
        assert stored.crs == frame.crs
        assert len(stored) == len(frame)
        pd.testing.assert_frame_equal(stored[frame.columns.drop("geometry")], pd.DataFrame(frame.drop(columns="geometry")),
                                      check_dtype=False)
        assert stored.geometry.geom_equals_exact(frame.geometry, tolerance=0).all()
        assert stored["area_um2"].isna().all()
        geo = json.loads(pq.read_metadata(part).metadata[b"geo"])
        assert geo["version"] == "1.1.0" and "covering" in geo["columns"]["geometry"]
        bbox = pq.read_table(part, columns=["bbox"]).column("bbox").to_pylist()
        covering = np.array([[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in bbox], float).reshape(-1, 4)
        assert np.allclose(covering, shapely.bounds(frame.geometry.values).reshape(-1, 4))
    images = pq.read_table(out / "catalogue" / IMAGES).to_pylist()
    assert [r["image_id"] for r in images] == sorted(truth)
    for row in images:
        summary = json.loads((out / row["image_id"] / "counts.json").read_text())
        assert row["crs"] == summary["crs"] and dict(row["counts"]) == summary["counts"] and row["instances"] == summary["instances"]


def test_a_partition_is_written_a_row_group_at_a_time_and_equals_the_one_shot_frame(run, tmp_path, monkeypatch):
    from workflows import catalogue

    out, truth = run
    shutil.copytree(out / "alpha", tmp_path / "alpha")
    monkeypatch.setattr(catalogue, "ROW_GROUP_ROWS", 7)
    reads = []
    real_read = pyogrio.read_dataframe
    monkeypatch.setattr(catalogue.pyogrio, "read_dataframe", lambda *a, **k: reads.append(k["max_features"]) or real_read(*a, **k))
    part = partition_path(build_catalogue(tmp_path), "alpha")
    frame = truth["alpha"]
    assert set(reads) == {7} and len(reads) == -(-len(frame) // 7)
    assert pq.read_metadata(part).num_row_groups == len(reads)
    stored = gpd.read_parquet(part)
    assert stored.crs == frame.crs and stored["instance_id"].tolist() == frame["instance_id"].tolist()
    assert stored.geometry.geom_equals_exact(frame.geometry, tolerance=0).all()
    geo = json.loads(pq.read_metadata(part).metadata[b"geo"])
    assert np.allclose(geo["columns"]["geometry"]["bbox"], frame.total_bounds)  # the whole image's, not one group's


def test_duckdb_and_arrow_readers_read_the_catalogue(run):
    """DuckDB by glob; pandas / pyarrow as one hive-partitioned dataset (a string ``image_id`` in the
    files against the dictionary partition key, and a list of images in the folder, made them fail)."""
    out, truth = run
    frame = pd.read_parquet(out / "catalogue", columns=["image_id", "instance_id", "class"])
    assert ids(frame) == set().union(*map(ids, truth.values())) and len(frame) == sum(map(len, truth.values()))
    files = str(out / "catalogue" / "*" / "*.parquet")
    counts = duckdb.sql(
        f"SELECT image_id, class, count(*) FROM read_parquet('{files}', hive_partitioning = true) GROUP BY ALL"
    ).fetchall()
    expected = {(name, c, n) for name, f in truth.items() for c, n in f["class"].value_counts().items()}
    assert set(counts) == expected
    with duckdb.connect() as con:
        con.execute("SET enable_geoparquet_conversion = false")  # geometries of several CRSs, as WKB
        rows = con.execute(
            "SELECT image_id, instance_id, geometry FROM read_parquet(?, hive_partitioning = true) ORDER BY ALL", [files]
        ).fetchall()
    assert len(rows) == sum(len(f) for f in truth.values())
    for image_id, instance_id, wkb in rows:
        expected = truth[image_id].geometry.values[instance_id - 1]
        assert shapely.from_wkb(bytes(wkb)).equals_exact(expected, 0)


def _state(catalogue: Path) -> dict:
    return {p.relative_to(catalogue): (p.stat().st_ino, p.stat().st_mtime_ns) for p in catalogue.rglob("*.parquet")}


def test_incremental_rebuild_rewrites_only_changed_images(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run[0], out)  # copies keep modification times: the copied partitions are current
    catalogue = out / "catalogue"
    before = _state(catalogue)
    build_catalogue(out)
    moved = {str(p) for p in _state(catalogue) if _state(catalogue)[p] != before[p]}
    assert moved == {IMAGES}  # its image folders are the copy's
    before = _state(catalogue)
    build_catalogue(out)
    assert _state(catalogue) == before
    beta = gpd.read_file(out / "beta" / "instances.gpkg", layer="instances")
    pyogrio.write_dataframe(beta.iloc[::2], out / "beta" / "tmp.gpkg", layer="instances")
    os.replace(out / "beta" / "tmp.gpkg", out / "beta" / "instances.gpkg")  # as the pipeline re-writes an image
    build_catalogue(out)
    after = _state(catalogue)
    changed = {str(p) for p in after if after[p] != before[p]}
    assert changed == {str(partition_path(Path(), "beta")), IMAGES}
    assert ids(gpd.read_parquet(partition_path(catalogue, "beta"))) == ids(beta.iloc[::2])
    shutil.copytree(out / "alpha", out / "gamma")
    build_catalogue(out)
    assert len(gpd.read_parquet(partition_path(catalogue, "gamma"))) == len(run[1]["alpha"])
    shutil.rmtree(out / "gamma")
    build_catalogue(out)
    assert not partition_path(catalogue, "gamma").parent.exists()
    assert [r["image_id"] for r in pq.read_table(catalogue / IMAGES).to_pylist()] == sorted(run[1])


def test_attribute_filters_match_brute_force(run):
    out, truth = run
    result = query(out, classes=[ODD], min_score=0.9, images=["alpha", "beta"], to_crs=UTM)
    expected = brute(truth, lambda f: (f["class"] == ODD) & (f["score"] >= 0.9), ["alpha", "beta"])
    assert ids(result) == expected and len(expected) >= 5
    assert result.crs.to_epsg() == 32631 and set(result["class"]) == {ODD}
    for name in ["alpha", "beta"]:
        mine = result[result["image_id"] == name].set_index("instance_id").geometry
        theirs = truth[name].to_crs(UTM).set_index("instance_id").geometry.loc[mine.index]
        assert mine.geom_equals_exact(theirs, tolerance=1e-6).all()
    lo, hi = truth["alpha"]["area_m2"].quantile([0.25, 0.75])  # m² on the ground, whatever the CRS
    result = query(out, area_range=(lo, hi), images=["alpha", "beta"], to_crs=UTM)
    expected = brute(truth, lambda f: f["area_m2"].between(lo, hi), ["alpha", "beta"])
    assert ids(result) == expected and {i for i, _ in expected} == {"alpha", "beta"}
    lo, hi = truth["o'hare"]["area"].quantile([0.25, 0.75])  # px² in pixel space
    assert ids(query(out, area_range=(lo, hi), images=["o'hare"])) == brute(truth, lambda f: f["area"].between(lo, hi), ["o'hare"]) != set()
    result = query(out, classes=["ellipse"], images=["o'hare"])
    assert ids(result) == brute(truth, lambda f: f["class"] == "ellipse", ["o'hare"]) != set()
    assert result.crs is None


def test_bbox_in_a_crs_applies_to_images_in_every_crs(run):
    out, truth = run
    bbox = (430100, 5419750, 430300, 5419950)
    result = query(out, bbox=bbox, bbox_crs=UTM, min_score=0.6)
    expected = brute(
        truth, lambda f: f.to_crs(UTM).intersects(shapely.box(*bbox)).to_numpy() & (f["score"] >= 0.6).to_numpy(), GEOREFERENCED
    )
    assert ids(result) == expected
    assert {i for i, _ in expected} == {"alpha", "beta"} and len(expected) < len(truth["alpha"]) + len(truth["beta"])
    assert result.crs.to_epsg() == 32631


def test_a_world_bbox_or_region_finds_every_georeferenced_instance(run, tmp_path):
    """A lon/lat box or region far larger than the images (the world) is cut to them before it is
    reprojected: into a UTM zone or Web Mercator, the whole box would not reproject."""
    out, truth = run
    everything = brute(truth, lambda f: f["score"] >= 0, GEOREFERENCED)
    assert ids(query(out, bbox=(-180, -90, 180, 90), bbox_crs="EPSG:4326")) == everything
    world = gpd.GeoDataFrame({"name": ["world"]}, geometry=[shapely.box(-180, -90, 180, 90)], crs="EPSG:4326")
    assert query(out, within=world)["count"].tolist() == [len(everything)]


def test_outputs_hold_ground_areas_and_counter_clockwise_exteriors(run, tmp_path):
    out, truth = run
    alpha, beta = truth["alpha"], truth["beta"]
    assert np.allclose(alpha["area_m2"], alpha["area"], rtol=2e-3)  # UTM: the scale factor, within 0.1 %
    latitude = np.radians(gpd.GeoSeries(beta.geometry, crs=beta.crs).to_crs("EPSG:4326").centroid.y)
    assert np.allclose(beta["area_m2"], beta["area"] * np.cos(latitude) ** 2, rtol=1e-2)  # Web Mercator inflates
    assert "area_m2" not in truth["o'hare"]
    for name, frame in truth.items():
        stored = gpd.read_parquet(partition_path(out / "catalogue", name))
        for geometry in (frame.geometry.values, stored.geometry.values):
            assert shapely.is_ccw(shapely.get_exterior_ring(geometry)).all(), name
    assert json.loads(pq.read_metadata(partition_path(out / "catalogue", "alpha")).metadata[b"geo"])["columns"]["geometry"]["orientation"] == "counterclockwise"


def test_geojson_in_a_crs_without_an_epsg_code_is_written_in_lon_lat(run, tmp_path):
    out, truth = run
    local = 'PROJCS["site grid",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION["Transverse_Mercator"],PARAMETER["latitude_of_origin",48],PARAMETER["central_meridian",2],PARAMETER["scale_factor",1],PARAMETER["false_easting",0],PARAMETER["false_northing",0],UNIT["metre",1]]'
    frame = query(out, images=["alpha"], to_crs=local)
    write_result(frame, tmp_path / "site.geojson")
    back = gpd.read_file(tmp_path / "site.geojson")
    assert back.crs.to_epsg() == 4326  # RFC 7946, not site-grid metres read as degrees
    assert back.geom_equals_exact(frame.to_crs("EPSG:4326").geometry, tolerance=1e-9).all()
    write_result(query(out, images=["alpha"]), tmp_path / "utm.geojson")
    assert gpd.read_file(tmp_path / "utm.geojson").crs.to_epsg() == 32631  # an EPSG code travels as is


def test_written_results_keep_every_digit_areas_in_their_crs_and_say_what_geojson_cannot(run, tmp_path):
    out, truth = run
    both = query(out, images=["alpha", "beta"], to_crs="EPSG:4326")
    assert np.allclose(both["area"], shapely.area(both.geometry.values))  # degrees², as the CRS measures, for both images
    write_result(both, tmp_path / "both.csv")
    back = gpd.GeoSeries.from_wkt(pd.read_csv(tmp_path / "both.csv")["geometry"])
    assert (shapely.get_coordinates(back.values) == shapely.get_coordinates(both.geometry.values)).all()
    with pytest.warns(UserWarning, match="pixels.geojson: pixel coordinates"):
        write_result(query(out, images=["o'hare"]), tmp_path / "pixels.geojson")
    write_result(query(out, images=["empty"]), tmp_path / "none.gpkg")
    assert pyogrio.read_info(tmp_path / "none.gpkg")["geometry_type"] == "Polygon"


def test_pixel_bbox_applies_to_pixel_space_images(run):
    out, truth = run
    result = query(out, bbox=(100, 100, 400, 300), bbox_crs="pixels")
    expected = brute(truth, lambda f: f.intersects(shapely.box(100, 100, 400, 300)), ["o'hare"])
    assert ids(result) == expected and 0 < len(expected) < len(truth["o'hare"])


def test_counts_per_region_with_regions_in_another_crs(run, tmp_path):
    out, truth = run
    regions = gpd.GeoDataFrame(
        {"name": ["overlap", "west", "elsewhere"]},
        # edges off the 0.25 m lattice that representative points of pixel-traced outlines lie on: a point on
        # an edge would fall either side of it after the round trip through lon/lat
        geometry=[shapely.box(430120.1, 5419700.1, 430400.1, 5419920.1), shapely.box(430000.1, 5419700.1, 430120.1, 5420000.1),
                  shapely.box(431000, 5421000, 431100, 5421100)],
        crs=UTM,
    ).to_crs("EPSG:4326")
    regions.to_file(tmp_path / "regions.gpkg")
    stats = query(out, within=tmp_path / "regions.gpkg", min_score=0.6)
    members = []
    for name in GEOREFERENCED:
        frame = truth[name][truth[name]["score"] >= 0.6]
        points = gpd.GeoDataFrame(frame.drop(columns="geometry"), geometry=frame.representative_point(), crs=frame.crs)
        members.append(pd.DataFrame(gpd.sjoin(points, regions.to_crs(frame.crs), predicate="within").drop(columns="geometry")))
    member = pd.concat(members)
    grouped = member.groupby("index_right")
    assert member[member["index_right"] == 0]["image_id"].nunique() == 2  # both CRSs feed the overlap region
    assert list(stats["name"]) == ["overlap", "west", "elsewhere"] and stats.crs == regions.crs
    expected_count = grouped.size().reindex(range(3), fill_value=0)
    assert stats["count"].tolist() == expected_count.tolist() and stats["count"].iloc[2] == 0
    for name in CLASSES:
        per_class = member[member["class"] == name].groupby("index_right").size().reindex(range(3), fill_value=0)
        assert stats[f"count_{name}"].tolist() == per_class.tolist()
    assert np.allclose(stats["mean_score"].iloc[:2], grouped["score"].mean().iloc[:2])
    assert np.allclose(stats["total_area"], grouped["area_m2"].sum().reindex(range(3), fill_value=0))  # m², both CRSs
    assert np.allclose(stats["mean_area"].iloc[:2], grouped["area_m2"].mean().iloc[:2]) and np.isnan(stats["mean_area"].iloc[2])


def test_values_travel_as_sql_parameters(run):
    out, truth = run
    files = [str(partition_path(out / "catalogue", name)) for name in truth]
    injected = _fetch(files, ["ellipse' OR '1'='1"], None, None, None)
    assert len(injected) == 0
    odd = _fetch(files, [ODD], None, None, None)
    assert ids(odd) == brute(truth, lambda f: f["class"] == ODD)
    with pytest.raises(QueryError, match="unknown class"):
        query(out, classes=["ellipse' OR '1'='1"])
    with pytest.raises(QueryError, match="unknown image"):
        query(out, images=["alpha' OR '1'='1"])
    assert sum(len(f) for f in select(out)) == sum(len(f) for f in truth.values())


def test_query_cli(run, tmp_path):
    out, truth = run
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["catalogue", str(out)])
    assert result.exit_code == 0 and "4 images" in result.output
    args = ["query", str(out), "--class", "ellipse", "--class", ODD, "--min-score", "0.9", "--image", "alpha"]
    expected = brute(truth, lambda f: f["class"].isin(["ellipse", ODD]) & (f["score"] >= 0.9), ["alpha"])
    for suffix in ["csv", "gpkg", "geojson"]:
        result = runner.invoke(app, [*args, "--output", str(tmp_path / f"q.{suffix}")])
        assert result.exit_code == 0, result.output
        written = pd.read_csv(tmp_path / "q.csv") if suffix == "csv" else gpd.read_file(tmp_path / f"q.{suffix}")
        assert ids(written) == expected
    result = runner.invoke(app, ["query", str(out), "--class", "triangle", "--limit", "500"])  # three CRSs in one table
    n = len(brute(truth, lambda f: f["class"] == "triangle"))
    assert result.exit_code == 0 and f"{n} instances: triangle {n}" in result.output
    regions = gpd.GeoDataFrame({"name": ["all"]}, geometry=[shapely.box(429000, 5419000, 431000, 5421000)], crs=UTM)
    regions.to_file(tmp_path / "regions.geojson")
    result = runner.invoke(app, ["query", str(out), "--within", str(tmp_path / "regions.geojson")])
    assert result.exit_code == 0 and str(len(truth["alpha"]) + len(truth["beta"])) in result.output
    (tmp_path / "garbage.gpkg").write_text("not a GeoPackage")
    gpd.GeoDataFrame(geometry=[shapely.Point(430000, 5420000)], crs=UTM).to_file(tmp_path / "points.geojson")
    for bad, message in [
        (["query", str(tmp_path / "missing")], "output directory not found"),
        (["query", str(tmp_path)], "not the output directory of a run"),
        (["query", str(out), "--bbox", "9000000,9000000,9000001,9000001"], "lies outside every image's instances"),
        (["query", str(out), "--class", "hexagon"], "unknown class 'hexagon'"),
        (["query", str(out), "--image", "zeta"], "unknown image 'zeta'"),
        (["query", str(out), "--bbox", "1,2,3"], "--bbox '1,2,3'"),
        (["query", str(out), "--bbox", "5,0,1,1"], "x0 < x1"),
        (["query", str(out), "--bbox", "0,0,1,1", "--bbox-crs", "EPSG:999999"], "unknown CRS"),
        (["query", str(out), "--output", str(tmp_path / "q.shp"), "--image", "alpha"], ".csv, .gpkg or .geojson"),
        (["query", str(out), "--output", str(tmp_path / "all.gpkg")], "several CRSs"),
        (["query", str(out), "--within", str(tmp_path / "garbage.gpkg")], "garbage.gpkg: not a readable vector file"),
        (["query", str(out), "--within", str(tmp_path / "points.geojson")], "points.geojson: no polygons to count in"),
        (["query", str(out), "--image", "alpha", "--bbox", "0,0,9,9", "--bbox-crs", "pixels"],
         "nothing to search: the bbox is in pixels and every image has a CRS (EPSG:32631)"),
        (["query", str(out), "--image", "o'hare", "--bbox", "0,0,9,9", "--bbox-crs", "EPSG:4326"],
         "the bbox is in EPSG:4326 and every image is in pixel space"),
    ]:
        result = runner.invoke(app, bad)
        assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, (bad, result.output)
    assert runner.invoke(app, ["query", str(out), "--limit", "-1"]).exit_code == 2
    assert not (tmp_path / "catalogue").exists()  # a folder that is not an output gets nothing written into it
    assert runner.invoke(app, ["query", str(out), "--min-score", "2"]).exit_code == 2


def test_a_damaged_geopackage_is_named(run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(run[0] / "alpha", out / "alpha")
    gpkg = out / "alpha" / "instances.gpkg"
    gpkg.write_bytes(gpkg.read_bytes()[:4096])  # cut short, as by a full disk or a broken copy
    app = typer.Typer()
    register(app)
    for command in (["catalogue", str(out)], ["query", str(out)], ["preview", str(out), "alpha"]):
        result = CliRunner().invoke(app, command)
        message = " ".join(result.output.split())
        assert result.exit_code == 2 and "alpha/instances.gpkg: not a readable GeoPackage" in message, (command, result.output)


def test_a_compound_crs_joins_its_horizontal_crs():
    from workflows.query import combine

    def frame(crs):
        return gpd.GeoDataFrame({"image_id": ["a"]}, geometry=[shapely.box(430000, 5419000, 430010, 5419010)], crs=crs)

    joined = combine([frame("EPSG:32631"), frame("EPSG:32631+5773")])
    assert len(joined) == 2 and joined.crs.to_epsg() == 32631
    with pytest.raises(QueryError, match="several CRSs"):
        combine([frame("EPSG:32631"), frame("EPSG:32632")])


@pytest.fixture(scope="module")
def lon_lat_run(tmp_path_factory):
    """Four lon/lat images in one output: at the equator, at 85° N, and across the antimeridian
    written both ways (longitudes past 180, and below -180)."""
    root = tmp_path_factory.mktemp("lonlat")
    out = root / "out"
    step = 4.5e-6  # ~0.5 m
    corners = {"equator": (10.0, 0.001), "north": (10.0, 85.0), "east": (180 - 150 * step, -17.0), "west": (-180 - 150 * step, -16.9)}
    for seed, (name, (x, y)) in enumerate(corners.items()):
        scene = make_scene(40 + seed, 300, 300, density=1.5).image
        segment(scene, root / f"{name}.tif", out / name, "EPSG:4326", Affine(step, 0, x, 0, -step, y))
    truth = {d.name: gpd.read_file(d / "instances.gpkg", layer="instances") for d in sorted(out.iterdir())}
    build_catalogue(out)
    return out, truth, corners


def test_lon_lat_boxes_find_images_on_the_antimeridian_and_near_the_pole(lon_lat_run):
    out, truth, corners = lon_lat_run
    everything = brute(truth, lambda f: f["score"] >= 0)
    assert {i for i, _ in everything} == set(corners) and len(everything) > 20
    assert ids(query(out, bbox=(-180, -90, 180, 90), bbox_crs="EPSG:4326")) == everything
    world = gpd.GeoDataFrame({"name": ["world"]}, geometry=[shapely.box(-180, -90, 180, 90)], crs="EPSG:4326")
    assert query(out, within=world)["count"].tolist() == [len(everything)]
    for name, (x, y) in corners.items():  # a box around each image, its longitudes given either way round
        whole = brute(truth, lambda f: f["score"] >= 0, [name])
        for turn in (0, 360, -360):
            box = (x - 0.001 + turn, y - 0.003, x + 0.003 + turn, y + 0.001)
            if -540 < box[0] and box[2] < 540:
                found = query(out, bbox=box, bbox_crs="EPSG:4326")
                assert ids(found) == whole, (name, turn)


def test_a_projected_image_across_the_antimeridian_answers_lon_lat_boxes_and_stays_whole_in_lon_lat(tmp_path):
    """A UTM 60S scene (Fiji) across 180°: its footprint in lon/lat wrapped into an invalid polygon
    (every lon/lat box crashed), and its objects reprojected to lon/lat spanned the globe."""
    out = tmp_path / "out"
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32760", always_xy=True).transform(180.0, -17.0)
    segment(make_scene(6, 400, 600, density=1.5).image, tmp_path / "fiji.tif", out / "fiji", "EPSG:32760",
            Affine(0.5, 0, x - 150, 0, -0.5, y + 100))
    build_catalogue(out)
    everything = query(out)
    assert len(everything) > 20
    around = query(out, bbox=(179.9, -17.1, 180.1, -16.9), bbox_crs="EPSG:4326")
    west = query(out, bbox=(179.9, -17.1, 180.0, -16.9), bbox_crs="EPSG:4326")
    east = query(out, bbox=(-180.0, -17.1, -179.9, -16.9), bbox_crs="EPSG:4326")
    assert ids(around) == ids(everything) == ids(west) | ids(east) and ids(west) and ids(east)
    lon_lat = query(out, to_crs="EPSG:4326")
    widths = lon_lat.geometry.bounds["maxx"] - lon_lat.geometry.bounds["minx"]
    crossing = shapely.intersects(everything.geometry.values, shapely.LineString([(x, y - 1000), (x, y + 1000)]))
    assert crossing.any() and widths.max() < 1e-3  # objects on the meridian 180 stay whole
    assert np.allclose(lon_lat["area"], shapely.area(lon_lat.geometry.values))
    written = gpd.read_file(write_result(lon_lat, tmp_path / "fiji.geojson"))  # RFC 7946: cut at the antimeridian
    cut = written.geometry.geom_type == "MultiPolygon"
    assert cut.sum() == crossing.sum() and written.total_bounds[[0, 2]].tolist() == pytest.approx([-180, 180], abs=0.01)
    assert np.allclose(shapely.area(written.geometry.values), shapely.area(lon_lat.geometry.values), rtol=1e-3)
    site = 'ENGCRS["site grid",EDATUM["site"],CS[Cartesian,2],AXIS["x",east,LENGTHUNIT["metre",1]],AXIS["y",north,LENGTHUNIT["metre",1]]]'
    with pytest.raises(QueryError, match="cannot relate"):
        query(out, bbox=(0, 0, 10, 10), bbox_crs=site)
