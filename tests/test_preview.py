"""Previews of real pipeline outputs: overlay sizes, class colours under polygons, density counts."""

import warnings

import dask
import geopandas as gpd
import numpy as np
import pytest
import shapely
import typer
from affine import Affine
from PIL import Image
from typer.testing import CliRunner

from models.card import load_card
from models.registry import resolve_model_dir
from models.synthetic import make_scene
from pipeline.graph import Tiling, image_graph
from pipeline.preview import FILL_ALPHA, class_colour, density_grid, image_grid, read_view, render_density, render_overlay
from pipeline.sources import open_image, open_raster
from pipeline.synthetic_raster import DEFAULT_TRANSFORM, write_geotiff
from pipeline import preview
from workflows.analyst_cli import register

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the pixel-space image


def segment(image, path, out, crs, transform, nodata=None, density_cell=None):
    write_geotiff(image, path, crs=crs, transform=transform, nodata=nodata)
    model = resolve_model_dir()
    graph = image_graph(open_raster(path), str(model), load_card(model).classes, out, Tiling(512, 64, 4),
                        labels=density_cell is not None, density_cell=density_cell or 256)
    dask.compute(graph.result, scheduler="sync")
    return path, gpd.read_file(out / "instances.gpkg", layer="instances")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """OUT with scene (800×600 px, UTM, 0.5 m pixels, labels.zarr with 64 px density cells), plain
    (pixel space) and empty (no instances)."""
    root = tmp_path_factory.mktemp("preview")
    out = root / "out"
    return out, {
        "scene": segment(make_scene(7, 600, 800, density=1.5).image, root / "scene.tif", out / "scene", "EPSG:32631", DEFAULT_TRANSFORM, density_cell=64),
        "plain": segment(make_scene(8, 400, 500, density=1.5).image, root / "plain.tif", out / "plain", None, Affine.identity()),
        "empty": segment(np.zeros((300, 400, 3), np.uint8), root / "empty.tif", out / "empty", "EPSG:32631", DEFAULT_TRANSFORM, 0),
    }


def colour_check(png, view, frame, margin=3) -> tuple[int, float, float]:
    """(polygons sampled, share whose inside pixel is the class colour blended over the image,
    share whose pixel differs from the plain image) at a point ``margin`` px inside each polygon."""
    overlay = np.asarray(Image.open(png).convert("RGB"), float)
    blended, differs = [], []
    for class_id, geometry in zip(frame["class_id"], frame.geometry.values):
        inner = shapely.affinity.affine_transform(geometry, view.to_view.to_shapely()).buffer(-margin)
        if inner.is_empty:
            continue
        point = inner.representative_point()
        x, y = int(point.x), int(point.y)
        if not (0 <= x < overlay.shape[1] and 0 <= y < overlay.shape[0]):
            continue
        plain = view.rgb[y, x].astype(float)
        expected = (1 - FILL_ALPHA) * plain + FILL_ALPHA * 255 * np.array(class_colour(class_id))
        blended.append(np.abs(overlay[y, x] - expected).max() <= 3)
        differs.append(np.abs(overlay[y, x] - plain).max() > 3)
    return len(blended), float(np.mean(blended)), float(np.mean(differs))


def test_whole_image_overlay_is_decimated_and_coloured_by_class(run, tmp_path):
    _, images = run
    path, frame = images["scene"]
    assert len(frame) >= 20 and frame["class_id"].nunique() >= 2
    png = render_overlay(path, frame, tmp_path / "overlay.png", max_size=400)
    assert Image.open(png).size == (400, 300)
    view = read_view(open_image(path), max_size=400)
    assert view.rgb.shape == (300, 400, 3)
    sampled, blended, differs = colour_check(png, view, frame)
    assert sampled >= 15 and blended >= 0.9 and differs >= 0.9


def test_region_overlay_at_full_resolution(run, tmp_path):
    _, images = run
    path, frame = images["scene"]
    x0, y0 = DEFAULT_TRANSFORM @ (200, 100)
    region = (x0, y0 - 150, x0 + 250, y0)  # 500 × 300 px of 0.5 m
    png = render_overlay(path, frame, tmp_path / "region.png", region=region)
    assert Image.open(png).size == (500, 300)
    sampled, blended, _ = colour_check(png, read_view(open_image(path), region), frame[frame.intersects(shapely.box(*region))])
    assert sampled >= 5 and blended >= 0.9
    assert Image.open(render_overlay(path, frame, tmp_path / "small.png", region=region, max_size=250)).size == (250, 150)


def test_pixel_space_region(run, tmp_path):
    _, images = run
    path, frame = images["plain"]
    png = render_overlay(path, frame, tmp_path / "plain.png", region=(100, 50, 400, 350))
    assert Image.open(png).size == (300, 300)
    sampled, blended, _ = colour_check(png, read_view(open_image(path), (100, 50, 400, 350)), frame)
    assert sampled >= 5 and blended >= 0.9


def test_image_without_instances(run, tmp_path):
    _, images = run
    path, frame = images["empty"]
    assert len(frame) == 0
    png = render_overlay(path, frame, tmp_path / "empty.png")
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), read_view(open_image(path)).rgb)
    grid = render_density(frame, *image_grid(open_image(path)), tmp_path / "density.png", cell_size=100)
    assert grid.shape == (3, 4) and grid.sum() == 0 and (tmp_path / "density.png").is_file()


def test_density_counts_every_instance_once(run, tmp_path):
    _, images = run
    path, frame = images["scene"]
    shape, transform = image_grid(open_image(path))
    grid = render_density(frame, shape, transform, tmp_path / "density.png", cell_size=128)
    cols, rows = ~transform @ tuple(shapely.get_coordinates(frame.representative_point().values).T)
    expected, _, _ = np.histogram2d(rows, cols, bins=[np.arange(0, 5 * 128 + 1, 128), np.arange(0, 7 * 128 + 1, 128)])
    assert grid.shape == (5, 7) and grid.sum() == len(frame) and np.array_equal(grid, expected)
    assert np.array_equal(density_grid(frame, shape, transform, 1000), [[len(frame)]])
    assert Image.open(tmp_path / "density.png").size[0] == 640


def test_slide_overlay(shared_data, tmp_path):
    path = shared_data / "wsi-cmu1-small-region" / "CMU-1-Small-Region.svs"
    source = open_image(path)
    frame = gpd.GeoDataFrame({"class_id": [0], "class": ["nucleus"]}, geometry=[shapely.box(500, 600, 1100, 1400)])
    png = render_overlay(source, frame, tmp_path / "slide.png", max_size=512)
    width, height = Image.open(png).size
    assert height == 512 and abs(width - 512 * 2220 / 2967) <= 1
    sampled, blended, differs = colour_check(png, read_view(source, max_size=512), frame)
    assert sampled == 1 and blended == 1 and differs == 1


def test_preview_cli(run, tmp_path, monkeypatch):
    out, _ = run
    cells = []
    monkeypatch.setattr(preview, "render_density", lambda *args: cells.append(args[-1]))
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["preview", str(out), "scene", "--max-size", "200"])
    assert result.exit_code == 0, result.output
    assert Image.open(out / "scene" / "preview.png").size == (200, 150)
    for image, *cell in (["plain", "--cell-size", "100"], ["scene"], ["plain"]):  # default: the run's cell
        result = runner.invoke(app, ["preview", str(out), image, *cell, "--density"])
        assert result.exit_code == 0, result.output
    assert cells == [100, 64, 256]
    result = runner.invoke(app, ["preview", str(out), "plain", "--region", "0,0,100,50", "--output", str(tmp_path / "r.png")])
    assert result.exit_code == 0 and Image.open(tmp_path / "r.png").size == (100, 50)
    for bad, message in [
        (["preview", str(out), "nope"], "no outputs for image 'nope'"),
        (["preview", str(tmp_path / "missing"), "scene"], "output directory not found"),
        (["preview", str(out), "plain", "--region", "1000,1000,2000,2000"], "lies outside the image"),
        (["preview", str(out), "plain", "--region", "a,b"], "--region 'a,b'"),
        (["preview", str(out), "plain", "--output", str(tmp_path / "p.jpg")], "previews are PNG files"),
    ]:
        result = runner.invoke(app, bad)
        assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, (bad, result.output)


def test_preview_reads_the_image_as_the_run_did(tmp_path):
    """A 4-band 16-bit image run with --bands 2,3,4 --value-range 0,1020: the preview shows those
    bands mapped as the model saw them, not the file's first three at their own percentiles."""
    from workflows.analyst_cli import _as_read
    from workflows.catalogue import find_output

    scene = make_scene(9, 300, 400, density=1.5).image
    noise = np.random.default_rng(0).integers(0, 60000, scene.shape[:2], np.uint16)
    image = np.dstack([noise, scene.astype(np.uint16) * 4])
    path = write_geotiff(image, tmp_path / "rgbn.tif", crs="EPSG:32631")
    graph = image_graph(open_raster(path, bands=(2, 3, 4), value_range=(0, 1020)), str(resolve_model_dir()),
                        load_card(resolve_model_dir()).classes, tmp_path / "out" / "rgbn", Tiling(512, 64, 4))
    dask.compute(graph.result, scheduler="sync")
    source = _as_read(find_output(tmp_path / "out", "rgbn"))
    assert source.bands == (2, 3, 4) and source.value_range == ((0, 1020),) * 3
    assert np.abs(read_view(source).rgb.astype(int) - scene).max() <= 1


def test_preview_warns_when_the_image_changed_since_its_results(tmp_path):
    path, _ = segment(make_scene(9, 200, 300).image, tmp_path / "s.tif", tmp_path / "out" / "s", None, Affine.identity())
    app = typer.Typer()
    register(app)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert CliRunner().invoke(app, ["preview", str(tmp_path / "out"), "s"]).exit_code == 0
    assert not [w for w in caught if "changed since" in str(w.message)]
    write_geotiff(make_scene(10, 200, 300).image, path, crs=None, transform=Affine.identity())  # replaced in place
    with pytest.warns(UserWarning, match="s.tif: changed since its results were written"):
        assert CliRunner().invoke(app, ["preview", str(tmp_path / "out"), "s"]).exit_code == 0
