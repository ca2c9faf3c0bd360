"""A corpus of bad inputs, generated here, through one workflow run: each fails alone with a
one-line reason naming the file, or is processed (with a warning where meaning is lost)."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile

from models.registry import resolve_model_dir
from pipeline.synthetic_raster import write_geotiff, write_scene
from tests.helpers import model_variant

SEAMLINE = Path(sys.executable).parent / "seamline"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def corpus(folder: Path) -> dict[str, str | None]:
    """Write the files; map each name to the cause its error must give (None: it must work)."""
    rng = np.random.default_rng(0)
    scene = write_scene(folder / "good.tif", seed=3, height=600, width=700)
    good = (folder / "good.tif").read_bytes()
    (folder / "zero.tif").write_bytes(b"")
    (folder / "truncated.tif").write_bytes(good[: len(good) // 3])
    write_scene(folder / "tall.tif", seed=4, height=2400, width=600)
    tall = (folder / "tall.tif").read_bytes()
    (folder / "tall.tif").unlink()
    (folder / "truncated-tiles.tif").write_bytes(tall[: len(tall) * 9 // 10])  # its top bands merge, its last do not read
    (folder / "corrupt-tile.tif").write_bytes(tall)
    with tifffile.TiffFile(folder / "corrupt-tile.tif") as tif:  # one block halfway down: garbage
        offset, size = tif.pages[0].dataoffsets[10], tif.pages[0].databytecounts[10]
    with open(folder / "corrupt-tile.tif", "r+b") as file:
        file.seek(offset)
        file.write(b"\xff" * size)
    (folder / "notes.tif").write_text("not an image at all\n")
    (folder / "photo.png.tif").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)  # wrong extension, broken PNG
    write_geotiff(rng.integers(0, 255, (300, 300, 2), dtype=np.uint8), folder / "two-band.tif")
    write_geotiff(scene.image[..., :1], folder / "one-band.tif")
    write_geotiff(np.dstack([scene.image, np.full(scene.image.shape[:2], 255, np.uint8)]), folder / "four-band.tif")
    write_geotiff(np.repeat(scene.image, 6, axis=2)[..., :16], folder / "sixteen-band.tif")
    write_geotiff(scene.image.astype(np.uint16) * 40, folder / "uint16.tif")
    as_float = scene.image.astype(np.float32) / 255
    as_float[:50] = np.nan
    write_geotiff(as_float, folder / "float-nan.tif")
    write_geotiff((scene.image[..., :1] * (1 + 1j)).astype(np.complex64), folder / "complex.tif")  # SAR, single look complex
    write_geotiff(np.zeros((400, 400, 3), np.uint8), folder / "all-nodata.tif", nodata=0)
    write_geotiff(scene.image[:100, :90], folder / "smaller-than-a-tile.tif")
    write_geotiff(scene.image, folder / "no-crs.tif", crs=None, transform=rasterio.Affine.identity())
    (folder / "a-folder.tif").mkdir()
    return {
        "good.tif": None, "zero.tif": "empty file", "truncated.tif": "", "notes.tif": "not a readable raster",
        "truncated-tiles.tif": "read failed at rows", "corrupt-tile.tif": "read failed at rows",
        "photo.png.tif": "not a readable raster", "two-band.tif": "2 colour bands", "one-band.tif": None,
        "four-band.tif": None, "sixteen-band.tif": None, "uint16.tif": None, "float-nan.tif": None, "complex.tif": "complex SAR data",
        "all-nodata.tif": None, "smaller-than-a-tile.tif": None, "no-crs.tif": None,
    }


def test_bad_input_corpus_fails_file_by_file(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    expected = corpus(archive)
    (tmp_path / "w.yaml").write_text(
        "inputs:\n  paths: [archive]\n  patterns: ['*.tif']\noutputs:\n  dir: out\n  report: false\n"
        "cluster:\n  threads_per_worker: 1\n  dashboard: ':0'\n"
    )
    result = subprocess.run([SEAMLINE, "run", tmp_path / "w.yaml", "--no-progress"], capture_output=True, text=True,
                            timeout=600, env=ENV)
    assert result.returncode == 1, result.stdout + result.stderr  # some failed, the run did not crash
    assert "Compute Failed" not in result.stdout + result.stderr  # a bad file is named once, not per tile read
    assert "CancelledError" not in result.stderr  # nor per task of it that the run dropped
    with sqlite3.connect(tmp_path / "out" / "ledger.sqlite") as db:
        rows = {Path(p).name: (s, e, w) for p, s, e, w in db.execute("SELECT path, status, error, warnings FROM images")}
    assert set(rows) == set(expected)  # the folder named *.tif is not an image: never listed
    for name, cause in expected.items():
        status, error, warned = rows[name]
        if cause is None:
            assert status == "done", (name, error)
            assert (tmp_path / "out" / name.removesuffix(".tif") / "instances.gpkg").is_file()
        else:
            assert status == "failed" and name in error and cause in error and "\n" not in error, (name, error)
            assert f"failed: {error}" in " ".join(result.stdout.split())
            left = [p.name for p in (tmp_path / "out" / name.removesuffix(".tif")).glob("*")]
            assert all(n.startswith(".partial-") for n in left), (name, left)  # only batches kept for a resume
    assert "uint16 data scaled" in rows["uint16.tif"][2] and "float32 data scaled" in rows["float-nan.tif"][2]
    assert "no CRS" in rows["no-crs.tif"][2] and "all-nodata.tif: no valid pixel" in rows["all-nodata.tif"][2]
    assert "warning:" in result.stdout
    assert rows["good.tif"][0] == "done"


@pytest.mark.parametrize("arguments, message", [
    (["--tile-size", "100"], "tile size 100 must be a multiple of 32"),
    (["--tile-size", "8192"], "must be a multiple of 32 between 64 and 4096"),
    (["--overlap", "400", "--tile-size", "512"], "overlap 400 must be in [1, tile size / 2)"),
    (["--overlap", "-3"], "overlap -3"),
    (["--overlap", "0"], "overlap 0 must be in [1, tile size / 2): a seam's halves are matched where tiles overlap"),
    (["--batch-size", "0"], "batch size 0 must be at least 1"),
    (["--mpp", "-1"], "--mpp -1.0 must be a positive number"),
    (["--mpp", "inf"], "--mpp inf must be a positive number"),
    (["--mpp", "nan"], "--mpp nan must be a positive number"),
    (["--density-cell", "1"], "--density-cell 1 must be between"),
    (["--value-range", "5"], "--value-range 5: expected two numbers LO,HI"),
    (["--value-range", "5,1"], "--value-range 5,1: needs two finite numbers LO,HI with LO < HI"),
    (["--value-range", "nan,3"], "--value-range nan,3: needs two finite"),
    (["--tile-size", "0"], "tile size 0 must be"),
    (["--workers", "0"], "Invalid value for '--workers'"),
    (["--workers", "-1"], "Invalid value for '--workers'"),
    (["--threads", "0"], "Invalid value for '--threads'"),
    (["--bands", "0"], "--bands 0: bands are numbered from 1"),
    (["--bands", "a,b"], "--bands a,b: expected 1-based band numbers"),
    (["--scheduler", "no-port-here"], "Dask scheduler no-port-here: cannot connect"),
    (["--model", "truncated-model"], "not a readable safetensors file (header longer than the file)"),
    (["https://example.com/cog.tif"], "cog.tif: URLs, GDAL virtual paths (/vsizip/, /vsicurl/ …) and subdataset names are not read"),
    (["/vsizip/scenes.zip/scene.tif"], "/vsizip/scenes.zip/scene.tif: URLs, GDAL virtual paths"),
])
def test_absurd_parameters_are_refused_before_any_work(tmp_path, monkeypatch, arguments, message):
    from typer.testing import CliRunner

    from workflows.cli import app

    image = write_geotiff(np.zeros((64, 64, 3), np.uint8), tmp_path / "x.tif")
    card = model_variant(tmp_path / "truncated-model", "synthetic-shapes")
    weights = tmp_path / "truncated-model" / card.weights
    weights.unlink()
    weights.write_bytes(resolve_model_dir().joinpath(card.weights).read_bytes()[:5000])
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", str(image), "--out", str(tmp_path / "out"), *arguments])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    from typer.testing import CliRunner

    from workflows.cli import app

    image = write_geotiff(np.zeros((64, 64, 3), np.uint8), tmp_path / "x.tif")
    (tmp_path / "taken").write_text("someone's notes")
    result = CliRunner().invoke(app, ["run", str(image), "--out", str(tmp_path / "taken")])
    assert result.exit_code == 2 and "taken: exists and is not a directory" in " ".join(result.output.split())
    assert (tmp_path / "taken").read_text() == "someone's notes"


def test_nothing_to_segment_is_refused_before_a_cluster_starts(tmp_path):
    from typer.testing import CliRunner

    from workflows.cli import app

    result = CliRunner().invoke(app, ["run", str(tmp_path / "typo.tif"), str(tmp_path), "--out", str(tmp_path / "out")])
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "typo.tif: no such file" in message and "a folder; give its images" in message
    assert "dashboard" not in message and not (tmp_path / "out").exists()


def test_unreadable_file_is_named(tmp_path):
    from pipeline.sources import SourceError, open_raster

    path = write_geotiff(np.zeros((64, 64, 3), np.uint8), tmp_path / "locked.tif")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("this user (root) reads files whatever their permissions")
        with pytest.raises(SourceError, match="locked.tif"):
            open_raster(path)
    finally:
        path.chmod(0o644)


def test_weights_that_do_not_fit_the_architecture_fail_the_run_once(tmp_path):
    """Whole-file checks pass (safetensors, 3 classes), but the tensors are another architecture's:
    every image would fail on the workers; the model is loaded on a worker first, and the run
    says so once, segments nothing, and earlier outputs stay."""
    model = tmp_path / "model"
    model_variant(model, "synthetic-shapes", architecture="maskrcnn_resnet50_fpn")
    images = [tmp_path / "a.tif", tmp_path / "b.tif"]
    for seed, image in enumerate(images):
        write_scene(image, seed=seed, height=300, width=300)
    (tmp_path / "out" / "a").mkdir(parents=True)
    (tmp_path / "out" / "a" / "counts.json").write_text("{}")  # an earlier run's
    result = subprocess.run([SEAMLINE, "run", *images, "--model", model, "--out", tmp_path / "out", "--no-progress",
                             "--threads", "1"], capture_output=True, text=True, timeout=600, env=ENV)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, output
    assert output.count("weights do not fit maskrcnn_resnet50_fpn with 3 classes") == 1 and "2 image(s) not segmented" in output
    assert "Compute Failed" not in output and "Traceback" not in output
    assert (tmp_path / "out" / "a" / "counts.json").read_text() == "{}" and not (tmp_path / "out" / "b").exists()
    failed = json.loads((tmp_path / "out" / "run.json").read_text())["failed"]
    assert sorted(failed) == sorted(map(str, images)) and all("not segmented: model" in e for e in failed.values())
