"""Damaged outputs, a damaged catalogue and places that cannot be written, on real outputs of two
images: the catalogue is rebuilt or leaves the damaged image out, and every command ends in one
line naming the file and the problem (exit 2), never a traceback."""

import json
import os
import shutil

import dask
import geopandas as gpd
import pyogrio
import pytest
import typer
from typer.testing import CliRunner

from models.card import load_card
from models.registry import resolve_model_dir
from pipeline.graph import Tiling, image_graph
from pipeline.sources import open_raster
from pipeline.synthetic_raster import write_scene
from workflows.analyst_cli import register
from workflows.catalogue import IMAGES, CatalogueWarning, build_catalogue, partition_path, read_images
from workflows.query import QueryError, select


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """OUT with images a and b (each with labels.zarr), catalogued."""
    root = tmp_path_factory.mktemp("damage")
    for name, seed in (("a", 1), ("b", 2)):
        write_scene(root / f"{name}.tif", seed, 300, 400, density=1.5)
        graph = image_graph(open_raster(root / f"{name}.tif"), str(resolve_model_dir()), load_card(resolve_model_dir()).classes,
                            root / "out" / name, Tiling(512, 64, 4), labels=True)
        dask.compute(graph.result, scheduler="sync")
    build_catalogue(root / "out")
    return root / "out"


@pytest.fixture
def out(pristine, tmp_path):
    shutil.copytree(pristine, tmp_path / "out")  # modification times kept: the copied catalogue is current
    return tmp_path / "out"


def cli(*args: str):
    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, [str(a) for a in args])


def said(result) -> str:
    return " ".join(result.output.split())  # rich wraps long lines


def failed(result, message: str) -> bool:
    """Exit 2 with one line holding ``message`` (no traceback)."""
    return result.exit_code == 2 and message in said(result) and result.output.count("\n") == 1


def found(out, **filters) -> dict:
    """Instances per image that ``select`` finds."""
    frames = select(out, **filters)
    return {i: n for f in frames for i, n in f["image_id"].astype(str).value_counts().items()}


def instances(out, name: str) -> int:
    return len(gpd.read_file(out / name / "instances.gpkg", layer="instances"))


def rerun_with_half(out, name: str) -> int:
    """Rewrite an image's outputs as a re-run does, with half its instances; returns their number."""
    frame = gpd.read_file(out / name / "instances.gpkg", layer="instances").iloc[::2]
    pyogrio.write_dataframe(frame, out / name / "tmp.gpkg", layer="instances")
    os.replace(out / name / "tmp.gpkg", out / name / "instances.gpkg")
    summary = json.loads((out / name / "counts.json").read_text())
    (out / name / "counts.json").write_text(json.dumps({**summary, "instances": len(frame)}))
    return len(frame)


def test_a_stale_image_table_is_rewritten_by_the_next_refresh(out):
    """A refresh that failed after rewriting a partition left ``_images.parquet`` stale: later
    refreshes, with nothing else changed, kept it so forever."""
    stale = (out / "catalogue" / IMAGES).read_bytes()
    n = rerun_with_half(out, "a")
    assert 0 < n < instances(out, "b") + n
    build_catalogue(out)
    (out / "catalogue" / IMAGES).write_bytes(stale)  # as a refresh that failed before writing it left it
    rows = {r["image_id"]: r["instances"] for r in read_images(build_catalogue(out))}
    assert rows == {"a": n, "b": instances(out, "b")}
    result = cli("catalogue", out)
    assert result.exit_code == 0 and f"2 images, {n + rows['b']} instances" in said(result)


@pytest.mark.parametrize("damage", ["garbage images", "partition footer", "partition data"])
def test_a_damaged_catalogue_file_is_rebuilt(out, damage):
    if damage == "garbage images":
        (out / "catalogue" / IMAGES).write_text("not parquet")
    else:
        part = partition_path(out / "catalogue", "b")
        stamp = part.stat().st_mtime_ns
        data = bytearray(part.read_bytes())
        if damage == "partition footer":
            data = data[:1000]
        else:
            data[2000:4000] = b"\x55" * 2000  # the pages, not the footer
        part.write_bytes(bytes(data))
        os.utime(part, ns=(stamp, stamp))  # as if current
    expected = {"a": instances(out, "a"), "b": instances(out, "b")}
    result = cli("catalogue", out)
    assert result.exit_code == 0 and f"2 images, {sum(expected.values())} instances" in said(result), result.output
    assert found(out) == expected
    result = cli("query", out, "--limit", "0")
    assert result.exit_code == 0 and f"{sum(expected.values())} instances" in said(result), result.output


DAMAGES = {
    "instances.gpkg": (lambda p: p.write_bytes(p.read_bytes()[:4096]), "b/instances.gpkg: not a readable GeoPackage"),
    "counts.json": (lambda p: p.write_text('{"ima'), "b/counts.json: not readable JSON"),
    "counts.json ": (lambda p: p.write_text("[1, 2]"), "b/counts.json: not an image summary"),
    "counts.json  ": (lambda p: p.write_text('{"counts": "many"}'), "b/counts.json: not an image summary"),
}


@pytest.mark.parametrize("damaged", DAMAGES)
def test_an_image_with_unreadable_outputs_is_left_out_and_the_others_stay_queryable(out, damaged):
    damage, message = DAMAGES[damaged]
    damage(out / "b" / damaged.strip())
    with pytest.warns(CatalogueWarning, match=message):
        assert found(out) == {"a": instances(out, "a")}  # b's old partition is not served
    assert not partition_path(out / "catalogue", "b").exists()
    assert [r["image_id"] for r in read_images(out / "catalogue")] == ["a"]
    for args in (["--image", "a"], []):
        result = cli("query", out, *args, "--limit", "0")
        assert result.exit_code == 0 and f"{instances(out, 'a')} instances" in said(result), result.output
    result = cli("catalogue", out)
    assert result.exit_code == 0 and "1 images" in said(result)


def test_preview_names_a_damaged_summary_or_label_store(out):
    summary = (out / "b" / "counts.json").read_text()
    (out / "b" / "counts.json").write_text(json.dumps({k: v for k, v in json.loads(summary).items() if k != "image"}))
    assert failed(cli("preview", out, "b"), "b/counts.json: names no image file")
    (out / "b" / "counts.json").write_text(summary[:30])
    assert failed(cli("preview", out, "b"), "b/counts.json: not readable JSON (Unterminated string")
    (out / "b" / "counts.json").write_text(summary)
    (out / "b" / "labels.zarr" / "zarr.json").write_text('{"attributes": "\x01')
    assert failed(cli("preview", out, "b", "--density"), "b/labels.zarr: unreadable metadata (JSONDecodeError")
    assert cli("preview", out, "a", "--density").exit_code == 0


def test_query_and_preview_outputs_that_cannot_be_written_are_named(out, tmp_path):
    (tmp_path / "somefile").write_text("")
    result = cli("query", out, "--image", "a", "--output", tmp_path / "somefile" / "x.csv")
    assert failed(result, "somefile/x.csv: cannot write it (") and "somefile is a file, not a folder)" in said(result)
    assert failed(cli("preview", out, "a", "--output", tmp_path / "somefile" / "p.png"), "somefile is a file, not a folder")
    (out / "a" / "preview.png").mkdir()
    assert failed(cli("preview", out, "a"), "a/preview.png: cannot write it (Is a directory)")


def test_a_catalogue_that_cannot_be_written_is_named(out):
    shutil.rmtree(out / "catalogue")
    (out / "catalogue").write_text("")  # the catalogue cannot be made
    for command in ("query", "catalogue"):
        assert failed(cli(command, out), "catalogue is a file, not a folder); the catalogue of")


def test_non_finite_filters_are_refused(out):
    for option, value in (("--min-area", "nan"), ("--max-area", "inf"), ("--bbox", "0,0,inf,1")):
        assert failed(cli("query", out, option, value), f"{option} ")
    for filters in ({"area_range": (float("nan"), None)}, {"min_score": float("nan")}, {"bbox": (0, 0, float("inf"), 1)}):
        with pytest.raises(QueryError, match="finite"):
            select(out, **filters)
