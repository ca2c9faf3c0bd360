import json
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from typer.testing import CliRunner

from models.synthetic import make_scene
from pipeline.synthetic_raster import write_geotiff
from tests.helpers import model_variant
from workflows.cli import _print_warning, app, command

runner = CliRunner()


def dataset(tmp_path, n=2, crs=None):
    """``n`` generated scenes and their label images; with ``crs``, georeferenced at 0.5 m pixels."""
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "labels").mkdir()
    for seed in range(n):
        scene = make_scene(500 + seed, 600, 700)
        write_geotiff(scene.image, tmp_path / "images" / f"scene{seed}.tif", crs=crs)
        write_geotiff(scene.labels[..., None].astype(np.uint16), tmp_path / "labels" / f"scene{seed}.tif", crs=crs)
    return tmp_path / "images", tmp_path / "labels"


def test_dataset_stats_and_evaluate_through_the_cli(tmp_path):
    images, labels = dataset(tmp_path)
    data = ["dataset", "stats", "-f", "label-images", "--images", str(images), "--annotations", str(labels)]
    result = runner.invoke(app, [*data, "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert stats["images"] == 2 and stats["instances"] > 20
    tables = runner.invoke(app, data).output
    assert f"2 images, {stats['instances']:,} instances" in tables
    assert f"{stats['area_px']['median']:,.0f}" in tables and "1 image(s) without" not in tables

    out = tmp_path / "report"
    result = runner.invoke(app, ["evaluate", "-f", "label-images", "--images", str(images), "--annotations", str(labels),
                                 "--out", str(out), "--tile-size", "256", "--overlap", "32"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["class_agnostic"] and report["unmatched_classes"] == ["object"]  # not among the model's classes
    assert "Classes ignored: the dataset's object" in (out / "report.md").read_text()
    assert report["summary"]["f1"] > 0.85 and report["coco"]["mask_ap50"] > 0.8
    assert (out / "report.md").read_text().startswith("# Evaluation") and (out / "pr_curve.png").stat().st_size > 0


def test_help_and_warnings_read_as_text(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    command().main(["run", "--help"], prog_name="seamline", standalone_mode=False)
    help_text = capsys.readouterr().out
    flags = [line for line in help_text.splitlines() if "--no-progress" in line or "--no-zarr" in line]
    assert len(flags) == 2 and not any("<bool>" in line for line in flags)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _print_warning
        warnings.warn("scene.tif: 3 of 9 objects [outside the image] ignored")
    assert capsys.readouterr().err == "warning: scene.tif: 3 of 9 objects [outside the image] ignored\n"


def test_bad_arguments_and_inputs_are_reported_clearly(tmp_path):
    def output(result):
        return " ".join(result.output.split())  # rich wraps long lines

    result = runner.invoke(app, ["run", str(tmp_path / "absent.tif"), "--tile-size", "100"])
    assert result.exit_code == 2 and "multiple of 32" in output(result)
    result = runner.invoke(app, ["run", str(tmp_path / "absent.tif"), "--model", str(tmp_path)])
    assert result.exit_code == 2 and "not a model directory" in output(result)
    result = runner.invoke(app, ["dataset", "stats", "-f", "imagescope", "--images", str(tmp_path)])
    assert result.exit_code == 2 and "--annotations" in output(result)
    (tmp_path / "a-file").write_text("")
    scene = write_geotiff(np.zeros((64, 64, 3), np.uint8), tmp_path / "scene.tif", crs=None)
    result = runner.invoke(app, ["run", str(scene), "--out", str(tmp_path / "a-file" / "out")])
    assert result.exit_code == 2 and "a-file is a file, not a directory" in output(result)  # before any cluster starts

    images, labels = dataset(tmp_path / "data", n=1)
    model_variant(tmp_path / "existing", "synthetic-shapes")
    data = ["-f", "label-images", "--images", str(images), "--annotations", str(labels)]
    for arguments, message in [
        (["evaluate", "--only", "scene0,nope", "--out", str(tmp_path / "r")], "--only: nope not among the dataset's images (scene0)"),
        (["evaluate", "--model", str(tmp_path), "--out", str(tmp_path / "r")], "not a model directory"),
        (["evaluate", "--tile-size", "0", "--out", str(tmp_path / "r")], "tile size 0 must be"),
        (["train", "--minutes", "-1", "--out", str(tmp_path / "m")], "--minutes -1.0 must be a positive number"),
        (["train", "--lr", "nan", "--out", str(tmp_path / "m")], "--lr nan must be a positive number"),
        (["train", "--anchors", "8,16", "--out", str(tmp_path / "m")], "--anchors 8,16: expected five positive sizes"),
        (["train", "--tile-size", "100", "--out", str(tmp_path / "m")], "--tile-size 100 must be a multiple of 32"),
        (["train", "--init", "no-such-model", "--out", str(tmp_path / "m")], "--init: no-such-model: not a model directory"),
        (["train", "--architecture", "resnet", "--out", str(tmp_path / "m")], "architecture: Input should be 'maskrcnn_resnet50_fpn'"),
        (["train", "--init", "nuclei-he", "--architecture", "maskrcnn_resnet50_fpn", "--out", str(tmp_path / "m")],
         "--architecture maskrcnn_resnet50_fpn: --init nuclei-he is a maskrcnn_compact"),
        (["train", "--batch-size", "0", "--out", str(tmp_path / "m")], "Invalid value for '--batch-size'"),
        (["train", "--val-every", "1", "--out", str(tmp_path / "m")], "--val-every 1 holds out all 1 image(s): none is left"),
        (["train", "--resume", "--out", str(tmp_path / "m")], "checkpoint.pt not found (nothing to continue)"),
        (["train", "--out", str(tmp_path / "existing")], "existing: already holds a model; --resume continues it, --overwrite replaces it"),
        (["evaluate", "--calibrate", "--out", str(tmp_path / "r")], "--calibrate rewrites the model's card: give a model directory"),
        (["train", "--pack-only", "--out", str(tmp_path / "existing")], "existing: already holds a model"),
    ]:
        result = runner.invoke(app, [arguments[0], *data, *arguments[1:]])
        assert result.exit_code == 2 and message in output(result), (arguments, result.output)
    assert not (tmp_path / "r").exists() and not (tmp_path / "m").exists()
    model_variant(tmp_path / "two-classes", "synthetic-shapes", classes=["a", "b"])  # weights of three
    result = runner.invoke(app, ["evaluate", *data, "--model", str(tmp_path / "two-classes"), "--out", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "weights for 3 classes, the card lists 2 (a, b)" in output(result), result.output
    images, labels = dataset(tmp_path / "blank", n=1)
    write_geotiff(np.zeros((600, 700, 1), np.uint16), labels / "scene0.tif")
    result = runner.invoke(app, ["train", "-f", "label-images", "--images", str(images), "--annotations", str(labels),
                                 "--val-every", "0", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "no annotated object in the 1 training image(s)" in output(result)


def test_train_command_writes_a_loadable_model_and_its_split(tmp_path):
    from models.inference import Segmenter

    images, labels = dataset(tmp_path, n=3)
    out = tmp_path / "model"
    result = runner.invoke(app, ["train", "-f", "label-images", "--images", str(images), "--annotations", str(labels),
                                 "--out", str(out), "--tile-size", "128", "--minutes", "0.15", "--batch-size", "2",
                                 "--workers", "0", "--val-every", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    split = json.loads((out / "split.json").read_text())
    assert split == {"train": ["scene0", "scene1"], "validation": ["scene2"]}
    segmenter = Segmenter(out, device="cpu")
    assert segmenter.card.classes == ["object"] and segmenter.card.tile_size == 128
    assert (out / "training_log.csv").is_file() and (out / "checkpoint.pt").is_file()
    result = runner.invoke(app, ["train", "-f", "label-images", "--images", str(images), "--annotations", str(labels),
                                 "--out", str(out), "--tile-size", "128", "--minutes", "0.15", "--batch-size", "2",
                                 "--workers", "0", "--val-every", "3", "--device", "cpu", "--resume"])
    assert result.exit_code == 2 and "give a larger --minutes to continue" in " ".join(result.output.split())
    before = (out / "split.json").read_text()
    result = runner.invoke(app, ["train", "-f", "label-images", "--images", str(images), "--annotations", str(labels),
                                 "--out", str(out), "--tile-size", "128", "--val-every", "2", "--resume"])
    assert result.exit_code == 2 and "records another train/validation split" in " ".join(result.output.split())
    assert (out / "split.json").read_text() == before  # a refused resume leaves the model's record alone


def test_train_keeps_what_it_starts_from_and_refuses_to_mix_runs(tmp_path):
    from models.card import load_card

    images, labels = dataset(tmp_path / "data", n=1)
    data = ["train", "-f", "label-images", "--images", str(images), "--annotations", str(labels), "--val-every", "0"]

    def train(*options):
        result = runner.invoke(app, [*data, *options])
        return result.exit_code, " ".join(result.output.split())

    # a fine-tune keeps the sizes its base model's weights learnt (anchors, tile, detections) unless told otherwise;
    # post-processing chosen for the base (threshold, mask NMS, flips) is the new model's to choose
    assert train("--init", "nuclei-he", "--pack-only", "--out", str(tmp_path / "fine"))[0] == 0
    fine = load_card(tmp_path / "fine")
    he = load_card(Path(__file__).parents[1] / "models/zoo/nuclei-he")
    assert (fine.anchor_sizes, fine.tile_size, fine.max_detections) == (he.anchor_sizes, he.tile_size, he.max_detections)
    assert (fine.mask_nms_threshold, fine.test_time_flips, fine.score_threshold, fine.classes) == (None, False, 0.5, ["object"])
    assert train("--init", "nuclei-he", "--anchors", "4,8,16,32,64", "--pack-only", "--out", str(tmp_path / "own"))[0] == 0
    assert load_card(tmp_path / "own").anchor_sizes == [4, 8, 16, 32, 64]

    # resuming a model of other classes would read its heads as these classes
    model_variant(tmp_path / "shapes", "synthetic-shapes")
    (tmp_path / "shapes" / "checkpoint.pt").write_bytes(b"tensors")
    code, output = train("--resume", "--out", str(tmp_path / "shapes"))
    assert code == 2 and "was trained for classes ['ellipse', 'rectangle', 'triangle']" in output and "give ['object']" in output

    # a folder of other files is not written over; --overwrite leaves no stale checkpoint behind
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "training_log.csv").write_text("mine")
    code, output = train("--pack-only", "--out", str(tmp_path / "notes"))
    assert code == 2 and "not empty and not a model directory" in output
    assert (tmp_path / "notes" / "training_log.csv").read_text() == "mine"
    assert train("--overwrite", "--pack-only", "--out", str(tmp_path / "shapes"))[0] == 0
    assert load_card(tmp_path / "shapes").classes == ["object"]
    assert not (tmp_path / "shapes" / "checkpoint.pt").exists() and not (tmp_path / "shapes" / "weights.safetensors").exists()


def test_a_value_range_given_to_train_is_kept_in_the_card_and_read_by_evaluate_and_run(tmp_path):
    """16-bit copies of 8-bit scenes (values × 16): ``train --value-range 0,4080`` trains on exactly the
    8-bit pixels and writes the range into the card, a model fine-tuned from it keeps it, and evaluate
    and run read images by the card's range, so the copies score as the originals do. Without a range,
    each image's percentiles stretch its data."""
    import rasterio

    from models.card import load_card
    from models.registry import resolve_model_dir
    from models.training import load_pack
    from pipeline.inputs import open_for_model

    images, labels = dataset(tmp_path / "8-bit", n=1)
    deep = tmp_path / "16-bit"
    deep.mkdir()
    with rasterio.open(images / "scene0.tif") as dataset_8:
        original = dataset_8.read().transpose(1, 2, 0)
    write_geotiff(original.astype(np.uint16) * 16, deep / "scene0.tif")

    def train(out, *extra):
        return runner.invoke(app, ["train", "-f", "label-images", "--images", str(deep), "--annotations", str(labels),
                                   "--out", str(out), "--val-every", "0", "--pack-only", *extra])

    assert train(tmp_path / "ranged", "--value-range", "0,4080").exit_code == 0
    assert train(tmp_path / "stretched").exit_code == 0
    assert train(tmp_path / "fine-tuned", "--init", str(tmp_path / "ranged")).exit_code == 0
    assert load_card(tmp_path / "ranged").input.value_range == (0, 4080)
    assert load_card(tmp_path / "fine-tuned").input.value_range == (0, 4080)
    assert load_card(tmp_path / "stretched").input.value_range is None
    (ranged,), _, _ = load_pack(tmp_path / "ranged" / "train-pack.npz")
    (stretched,), _, _ = load_pack(tmp_path / "stretched" / "train-pack.npz")
    assert np.array_equal(ranged.image, original) and not np.array_equal(stretched.image, original)

    shipped_input = load_card(resolve_model_dir("synthetic-shapes")).input
    card = model_variant(tmp_path / "model-16", "synthetic-shapes", input=shipped_input.model_copy(update={"value_range": (0, 4080)}))
    assert open_for_model(deep / "scene0.tif", card).value_range == ((0, 4080),) * 3
    assert open_for_model(deep / "scene0.tif", card, value_range=(0, 1000)).value_range == ((0, 1000),) * 3

    def evaluate(image_dir, model, out):
        result = runner.invoke(app, ["evaluate", "-f", "label-images", "--images", str(image_dir), "--annotations",
                                     str(labels), "--model", str(model), "--out", str(out)])
        assert result.exit_code == 0, result.output
        return json.loads((out / "report.json").read_text())["summary"]

    on_copies = evaluate(deep, tmp_path / "model-16", tmp_path / "report-16")
    assert on_copies == evaluate(images, "synthetic-shapes", tmp_path / "report-8")


def test_train_resamples_to_the_resolution_asked_for(tmp_path):
    from models.card import load_card
    from models.training import load_pack

    def train(root, *extra):
        images, labels = (root / "images", root / "labels") if root.exists() else dataset(root, n=2, crs=crs)
        return runner.invoke(app, ["train", "-f", "label-images", "--images", str(images), "--annotations", str(labels),
                                   "--out", str(root / "model"), "--val-every", "0", "--pack-only", *extra])

    crs = None
    result = train(tmp_path / "pixels", "--resolution", "1.0")
    assert result.exit_code == 2 and "--resolution 1.0: scene0: no pixel size" in " ".join(result.output.split())
    crs = "EPSG:32631"  # 0.5 m pixels
    assert train(tmp_path / "native").exit_code == 0
    assert train(tmp_path / "native").exit_code == 0  # a folder holding only a pack is packed again
    result = train(tmp_path / "coarse", "--resolution", "1.0")
    assert result.exit_code == 0, result.output
    card = load_card(tmp_path / "coarse" / "model")
    assert (card.resolution, card.resolution_unit) == (1.0, "m")
    assert load_card(tmp_path / "native" / "model").resolution == pytest.approx(0.5, rel=1e-3)  # ground metres: UTM scale 0.99966 there
    native, _, _ = load_pack(tmp_path / "native" / "model" / "train-pack.npz")
    coarse, _, resolution = load_pack(tmp_path / "coarse" / "model" / "train-pack.npz")
    assert resolution == 1.0 and [s.image.shape for s in coarse] == [(300, 350, 3)] * 2
    assert [s.labels.max() for s in coarse] == [s.labels.max() for s in native]  # no object lost at 2× coarser


def test_evaluate_reads_images_at_the_model_resolution(tmp_path):
    """The same scenes at 0.5 m and, pixels repeated, at 0.25 m. A model made for 0.5 m must score
    the 0.25 m copies as it scores the originals: evaluation resamples them to its resolution and
    maps the polygons back onto the 0.25 m ground truth."""
    from affine import Affine

    for name, repeat in (("coarse", 1), ("fine", 2)):
        for folder in ("images", "labels"):
            (tmp_path / name / folder).mkdir(parents=True)
        transform = Affine(0.5 / repeat, 0, 430000, 0, -0.5 / repeat, 5420000)
        for seed in range(2):
            scene = make_scene(510 + seed, 300, 350)
            image, labels = (np.repeat(np.repeat(a, repeat, 0), repeat, 1) for a in (scene.image, scene.labels))
            write_geotiff(image, tmp_path / name / "images" / f"s{seed}.tif", transform=transform)
            write_geotiff(labels[..., None].astype(np.uint16), tmp_path / name / "labels" / f"s{seed}.tif", transform=transform)

    def scores(name, resolution):
        model = tmp_path / f"model-{name}-{resolution}"
        model.mkdir()
        model_variant(model, "synthetic-shapes", resolution=resolution, resolution_unit=resolution and "m")
        out = tmp_path / f"report-{name}-{resolution}"
        result = runner.invoke(app, ["evaluate", "-f", "label-images", "--images", str(tmp_path / name / "images"),
                                     "--annotations", str(tmp_path / name / "labels"), "--model", str(model), "--out", str(out)])
        assert result.exit_code == 0, result.output
        vertices = shapely.get_coordinates(gpd.read_file(out / "predictions" / "s0" / "instances.gpkg").geometry.values)
        return json.loads((out / "report.json").read_text())["summary"], vertices

    (coarse, _), (fine, resampled), (_, as_is) = scores("coarse", None), scores("fine", 0.5), scores("fine", None)
    assert coarse["tp"] > 8 and [fine[k] for k in ("tp", "fp", "fn")] == [coarse[k] for k in ("tp", "fp", "fn")]
    assert fine["pq"] == pytest.approx(coarse["pq"], abs=0.03)
    # outlines (in the image's pixels) follow the pixels the model saw: every other one when resampled
    assert (resampled % 2 == 0).all() and (as_is % 1 == 0).all() and not (as_is % 2 == 0).all()


def test_evaluate_matches_classes_by_name_in_any_order(tmp_path):
    from models.card import load_card
    from models.registry import resolve_model_dir
    from pipeline.annotations import AnnotatedImage
    from pipeline.graph import Tiling
    from workflows.evaluate import evaluate

    card = load_card(resolve_model_dir())
    scene = make_scene(520, 300, 350)
    labels = scene.labels.astype(np.int32)
    in_order = AnnotatedImage("s", scene.image, labels, scene.classes.astype(np.int16), list(card.classes))
    reordered = AnnotatedImage("s", scene.image, labels, (2 - scene.classes).astype(np.int16), card.classes[::-1])
    reports = [evaluate([sample], resolve_model_dir(), card, tmp_path / name, Tiling(256, 32))
               for name, sample in (("in-order", in_order), ("reordered", reordered))]
    assert not reports[0]["class_agnostic"] and not reports[1]["class_agnostic"]
    assert reports[0]["summary"] == reports[1]["summary"] and reports[0]["summary"]["f1"] > 0.9
    assert reports[0]["per_image"][0]["per_class"] == reports[1]["per_image"][0]["per_class"]
    listed = AnnotatedImage("s", scene.image, labels, scene.classes.astype(np.int16), [*card.classes, "star"])  # no star drawn
    report = evaluate([listed], resolve_model_dir(), card, tmp_path / "listed", Tiling(256, 32))
    assert not report["class_agnostic"] and report["summary"] == reports[0]["summary"]


def test_the_command_line_loads_without_the_pipeline_libraries():
    """`seamline --help` and `seamline status` answer in about a second: torch, geopandas, Dask and
    rasterio (seconds to import) load only in the commands that use them."""
    import subprocess
    import sys

    heavy = ["torch", "torchvision", "geopandas", "pandas", "rasterio", "dask", "distributed", "matplotlib", "zarr", "scipy"]
    code = f"import sys, workflows.cli; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and all(name in result.output for name in ("run", "train", "evaluate", "query", "preview", "status"))


def test_demo_segments_the_real_tile_at_the_pixel_size_its_annotation_records(tmp_path, shared_data):
    """``make demo``'s command: the MoNuSeg TIFF has no resolution tags, its ImageScope XML has
    MicronsPerPixel; the demo passes it on, so nothing is read at a guessed scale and areas are in µm²."""
    import subprocess
    import sys

    out = tmp_path / "demo"
    result = subprocess.run([Path(sys.executable).parent / "seamline", "demo", "--out", out, "--workers", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pixel size unknown" not in result.stdout + result.stderr
    image = out / "TCGA-A6-6782-01A-01-BS1"
    frame = gpd.read_file(image / "instances.gpkg", layer="instances")
    assert len(frame) > 300 and (image / "preview.png").is_file()
    assert np.allclose(frame["area_um2"], frame["area"] * 0.2457**2)
    qupath = json.loads((image / "qupath.geojson").read_text())
    assert len(qupath["features"]) == len(frame)
