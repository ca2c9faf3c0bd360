"""Workflow runs through real Dask worker processes: incremental, resumable, isolated failures."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import dask
import geopandas as gpd
import numpy as np
import psutil
import pytest
import shapely

from models.card import load_card
from models.registry import resolve_model_dir
from pipeline.graph import Tiling, image_graph
from pipeline.sources import open_raster
from pipeline.synthetic_raster import write_scene
from tests.helpers import match_f1
from workflows.ledger import run_lock
from workflows.spec import WorkflowError, list_inputs, load_workflow

SEAMLINE = Path(sys.executable).parent / "seamline"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def workflow_file(folder: Path, out: str = "out", batch_size: int = 2, workers: int = 1, extra: str = "",
                  zarr: bool = False, report: bool = False) -> Path:
    path = folder / "workflow.yaml"
    flag = str(report).lower()
    path.write_text(
        f"name: test\ninputs:\n  paths: [archive]\noutputs:\n  dir: {out}\n  zarr: {str(zarr).lower()}\n  catalogue: {flag}\n  report: {flag}\n"
        f"tiling:\n  batch_size: {batch_size}\ncluster:\n  workers: {workers}\n  threads_per_worker: 1\n  dashboard: ':0'\n{extra}"
    )
    return path


def seamline(*args, timeout=600) -> subprocess.CompletedProcess:
    flags = ["--no-progress"] if args[0] == "run" else []
    return subprocess.run([SEAMLINE, *map(str, args), *flags], capture_output=True, text=True, timeout=timeout, env=ENV)


def ledger_rows(out: Path) -> dict[str, dict]:
    with sqlite3.connect(out / "ledger.sqlite") as db:
        db.row_factory = sqlite3.Row
        return {Path(r["path"]).name: dict(r) for r in db.execute("SELECT * FROM images")}


def reference(image: Path, folder: Path, batch_size: int = 2) -> gpd.GeoDataFrame:
    model = resolve_model_dir()
    card = load_card(model)
    graph = image_graph(open_raster(image), str(model), card.classes, folder, Tiling(card.tile_size, card.overlap, batch_size))
    dask.compute(graph.result, scheduler="sync")
    return gpd.read_file(folder / "instances.gpkg", layer="instances")


def same_instances(a: gpd.GeoDataFrame, b: gpd.GeoDataFrame) -> bool:
    return (
        len(a) == len(b) > 0 and list(a["instance_id"]) == list(b["instance_id"])
        and bool(shapely.equals_exact(a.geometry.values, b.geometry.values, tolerance=0).all())
    )


def whole_outputs(folder: Path) -> Path:
    """A folder with what ``write_outputs`` commits: a GeoPackage, counts.csv, counts.json listing them."""
    folder.mkdir(parents=True, exist_ok=True)
    gpd.GeoDataFrame({"instance_id": [1]}, geometry=[shapely.box(0, 0, 1, 1)]).to_file(folder / "instances.gpkg", layer="instances")
    (folder / "counts.csv").write_text("class,count\na,1\n")
    outputs = {"geopackage": str(folder / "instances.gpkg"), "counts_csv": str(folder / "counts.csv")}
    (folder / "counts.json").write_text(json.dumps({"image": "x.tif", "outputs": outputs}))
    return folder


def test_workflow_errors_name_key_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("inputs:\n  paths: [a]\n  colour: red\noutputs:\n  dir: out\ntiling:\n  batch_size: many\n")
    with pytest.raises(WorkflowError) as err:
        load_workflow(path)
    message = str(err.value)
    assert "bad.yaml:3: inputs.colour: Extra inputs are not permitted" in message
    assert "bad.yaml:7: tiling.batch_size" in message
    path.write_text("inputs: {paths: [a]}\n")
    with pytest.raises(WorkflowError, match="outputs"):
        load_workflow(path)
    path.write_text("inputs: {paths: [a]}\noutputs:\n  dir: out\nmodel: buildings\ntiling: {batch_size: 2}\nmodel: nuclei-he\n")
    with pytest.raises(WorkflowError, match="bad.yaml:6: model: given twice"):
        load_workflow(path)
    path.write_text("- not a mapping\n")
    with pytest.raises(WorkflowError, match="mapping"):
        load_workflow(path)
    (tmp_path / "taken").write_text("")
    path.write_text("inputs: {paths: [a]}\noutputs:\n  dir: out\nread:\n  mpp: .inf\n")
    with pytest.raises(WorkflowError, match="bad.yaml:5: read.mpp: Input should be a finite number"):
        load_workflow(path)
    path.write_text("inputs: {paths: [a]}\noutputs:\n  dir: taken\nread:\n  value_range: [5, 1]\n")
    with pytest.raises(WorkflowError) as err:
        load_workflow(path)
    message = " ".join(str(err.value).split())
    assert "bad.yaml:3: outputs.dir: Value error, " in message and "taken exists and is not a directory" in message
    assert "bad.yaml:5: read.value_range: Value error, needs two finite numbers LO,HI with LO < HI" in message


def test_manifest_paths_cannot_escape_the_input_roots(tmp_path):
    (tmp_path / "archive").mkdir()
    inside = tmp_path / "archive" / "a.tif"
    inside.write_bytes(b"x")
    outside = tmp_path / "secret.tif"
    outside.write_bytes(b"x")
    (tmp_path / "manifest.csv").write_text("path\narchive/a.tif\narchive/../secret.tif\narchive/missing.tif\n")
    (tmp_path / "w.yaml").write_text("inputs:\n  manifest: manifest.csv\n  roots: [archive]\noutputs:\n  dir: out\n")
    images, problems = list_inputs(load_workflow(tmp_path / "w.yaml").inputs)
    assert images == [inside]
    assert any("outside the workflow's input roots" in p for p in problems.values())
    assert any("missing.tif: file not found" in p for p in problems.values())


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    (root / "archive").mkdir()
    for i, size in enumerate([(700, 800), (600, 900)]):
        write_scene(root / "archive" / f"scene{i}.tif", seed=40 + i, height=size[0], width=size[1])
    (root / "archive" / "corrupt.tif").write_bytes((root / "archive" / "scene0.tif").read_bytes()[:3000])
    return root


def test_incremental_reruns_and_failure_isolation(archive):
    workflow = workflow_file(archive, report=True)
    out = archive / "out"
    first = seamline("run", workflow)
    assert first.returncode == 1, first.stdout + first.stderr  # the corrupt file failed, alone
    rows = ledger_rows(out)
    assert {n: r["status"] for n, r in rows.items()} == {"scene0.tif": "done", "scene1.tif": "done", "corrupt.tif": "failed"}
    assert "corrupt.tif" in rows["corrupt.tif"]["error"] and "\n" not in rows["corrupt.tif"]["error"]
    assert rows["scene0.tif"]["instances"] == len(gpd.read_file(out / "scene0" / "instances.gpkg", layer="instances"))
    metrics = (out / "metrics.prom").read_text()
    assert 'seamline_images_done_total{workflow="test"} 2.0' in metrics
    assert 'seamline_images_failed_total{workflow="test"} 1.0' in metrics
    assert 'seamline_last_run_success{workflow="test"} 0.0' in metrics and "seamline_last_run_finished_timestamp_seconds" in metrics
    page = (out / "report" / "index.html").read_text()
    assert "scene0.tif" in page and "corrupt.tif" in page and 'src="scene1.png"' in page
    assert (out / "report" / "scene0.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "catalogue").glob("image_id=*")) == ["image_id=scene0", "image_id=scene1"]

    second = seamline("run", workflow)
    assert "0 to process" not in second.stdout and "2 up to date" in second.stdout  # only the failed one retried
    assert ledger_rows(out)["scene0.tif"]["finished"] == rows["scene0.tif"]["finished"]

    (archive / "archive" / "corrupt.tif").unlink()
    scene1 = archive / "archive" / "scene1.tif"
    write_scene(scene1, seed=99, height=600, width=900)  # the file changed
    third = seamline("run", workflow)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "1 to process, 1 up to date" in third.stdout
    after = ledger_rows(out)
    assert after["scene1.tif"]["finished"] > rows["scene1.tif"]["finished"]
    assert after["scene0.tif"]["finished"] == rows["scene0.tif"]["finished"]
    rerun = gpd.read_file(out / "scene1" / "instances.gpkg", layer="instances")
    # the new file's objects (in-process inference may differ from a 1-thread worker by a pixel)
    assert match_f1(rerun.geometry.values, reference(scene1, archive / "ref1").geometry.values) > 0.99

    forced = seamline("run", workflow, "--force")
    assert "2 to process" in forced.stdout and ledger_rows(out)["scene0.tif"]["finished"] > rows["scene0.tif"]["finished"]
    status = seamline("status", out)
    assert status.returncode == 0 and "scene0.tif" in status.stdout and "done: 2" in status.stdout


def test_second_run_on_the_same_output_is_refused(archive, tmp_path):
    workflow = workflow_file(archive, out=str(tmp_path / "locked"))
    with run_lock(tmp_path / "locked"):
        result = seamline("run", workflow)
    assert result.returncode == 2 and "another Seamline run" in result.stdout


@pytest.fixture(scope="module")
def big_scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    (root / "archive").mkdir()
    image = root / "archive" / "big.tif"
    write_scene(image, seed=7, height=1500, width=1500)
    uninterrupted = seamline("run", workflow_file(root, out="uninterrupted", batch_size=1))
    assert uninterrupted.returncode == 0, uninterrupted.stdout + uninterrupted.stderr
    return root, image, gpd.read_file(root / "uninterrupted" / "big" / "instances.gpkg", layer="instances")


def start_run(workflow: Path) -> psutil.Popen:
    return psutil.Popen([SEAMLINE, "run", str(workflow), "--no-progress"], stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def wait_for(condition, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_a_killed_run_resumes_from_its_batches_with_identical_output(big_scene):
    root, image, expected = big_scene
    workflow = workflow_file(root, out="killed", batch_size=1)
    out = root / "killed"
    run = start_run(workflow)
    assert wait_for(lambda: len(list(out.glob("big/.partial-*/batch-*.npz"))) >= 4), run.stdout.read().decode()
    os.killpg(run.pid, signal.SIGKILL)  # the whole run: client, scheduler and workers
    run.wait()
    assert ledger_rows(out)["big.tif"]["status"] == "running"  # never claimed done
    assert not (out / "big" / "instances.gpkg").exists()
    kept = sorted(out.glob("big/.partial-*/batch-*.npz"))
    kept[0].write_bytes(kept[0].read_bytes()[:100])  # damaged on disk: segmented again, never a failed image
    kept[1].write_bytes(b"\0" * kept[1].stat().st_size)
    again = seamline("run", workflow)
    assert again.returncode == 0, again.stdout + again.stderr
    row = ledger_rows(out)["big.tif"]
    assert row["status"] == "done" and row["batches_resumed"] >= 4
    assert same_instances(gpd.read_file(out / "big" / "instances.gpkg", layer="instances"), expected)
    assert not list((out / "big").glob(".partial-*"))  # kept batches are removed once written


def test_ctrl_c_ends_the_run_in_one_line_and_leaves_no_process(big_scene):
    """Ctrl-C reaches the terminal's whole process group: the client and the local cluster's
    worker and side processes. Each worker printed a KeyboardInterrupt traceback. What the
    unfinished image staged goes (merge parts, files half written); its kept batches stay."""
    root, image, expected = big_scene
    workflow = workflow_file(root, out="interrupted", batch_size=1, zarr=True)
    folder = root / "interrupted" / "big"
    run = start_run(workflow)
    assert wait_for(lambda: len(list(folder.glob(".partial-*/batch-*.npz"))) >= 2 and list(folder.glob(".instances-parts.*"))), \
        run.stdout.read().decode()
    (folder / ".instances.gpkg.0123abcd.tmp").write_bytes(b"half a file")  # as a write cut short leaves it
    children = run.children(recursive=True)
    os.killpg(run.pid, signal.SIGINT)
    output = run.communicate(timeout=120)[0].decode()
    assert run.returncode == 130 and "interrupted: run the workflow again to resume" in " ".join(output.split()), output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert wait_for(lambda: not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children), 30)
    assert list(folder.glob(".partial-*/batch-*.npz")) and not list(folder.glob(".instances-parts.*"))
    assert not list(folder.glob(".*.tmp")) and not (folder / "labels.zarr").exists()


def test_a_killed_worker_does_not_change_the_output(big_scene):
    root, image, expected = big_scene
    workflow = workflow_file(root, out="worker-killed", batch_size=1, workers=2, zarr=True)
    out = root / "worker-killed"
    run = start_run(workflow)

    def workers():
        found = []
        for process in run.children(recursive=True):
            try:
                if "spawn_main" in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.NoSuchProcess:
                pass
        return found

    assert wait_for(lambda: len(workers()) == 2 and len(list(out.glob("big/.partial-*/batch-*.npz"))) >= 2)
    workers()[0].kill()
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output.decode()
    assert same_instances(gpd.read_file(out / "big" / "instances.gpkg", layer="instances"), expected)
    assert np.isclose(ledger_rows(out)["big.tif"]["instances"], len(expected))

    # labels.zarr, written block by block by both workers, agrees with the GeoPackage
    import rasterio.features
    import zarr

    frame = gpd.read_file(out / "big" / "instances.gpkg", layer="instances")
    store = zarr.open_group(out / "big" / "labels.zarr", mode="r")
    labels = store["labels/0"][:]
    with rasterio.open(image) as dataset:
        transform, shape = dataset.transform, dataset.shape
    order = np.lexsort((frame["instance_id"], frame["score"]))  # the store's rule: higher score wins
    burned = rasterio.features.rasterize(
        ((frame.geometry.values[i], int(frame["instance_id"].iloc[i])) for i in order),
        out_shape=shape, transform=transform, dtype="uint32",
    )
    assert (labels == burned).all()
    assert store.attrs["counts"] == frame["class"].value_counts().reindex(store.attrs["counts"].keys(), fill_value=0).to_dict()
    assert int(store["density"][:].sum()) == len(frame)


def test_images_sharing_a_name_keep_apart_ids_in_every_output(tmp_path):
    from distributed import Client, LocalCluster

    from workflows.run import run_images

    images = []
    for k, folder in enumerate(("north", "south")):
        (tmp_path / folder).mkdir()
        write_scene(tmp_path / folder / "scene.tif", seed=70 + k, height=300, width=300)
        images.append(tmp_path / folder / "scene.tif")
    card = load_card(resolve_model_dir())
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        again = tmp_path / "south" / ".." / "south" / "scene.tif"  # given twice: runs once
        report = run_images(client, [*images, again], resolve_model_dir(), card, tmp_path / "out", Tiling(256, 32), show_progress=False)
    assert not report.failed and len(report.done) == 2 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scene", "scene-2"]
    assert f"{again}: the same file as {images[1]}: segmented once" in report.warnings[str(images[1])]
    ids = {image: summary["image_id"] for image, summary in report.done.items()}
    assert sorted(ids.values()) == ["scene", "scene-2"]
    for image, image_id in ids.items():
        frame = gpd.read_file(tmp_path / "out" / image_id / "instances.gpkg", layer="instances")
        counts = gpd.read_file(tmp_path / "out" / image_id / "instances.gpkg", layer="counts")
        assert len(frame) and set(frame["image_id"]) == set(counts["image_id"]) == {image_id}


def test_an_image_id_names_one_file_whatever_the_order_of_the_inputs_and_across_runs(tmp_path):
    """Ids were given in input order: run again in another order, ``scene-2`` held another file,
    and the catalogue served one image twice."""
    from distributed import Client, LocalCluster

    from workflows.catalogue import build_catalogue, image_outputs
    from workflows.run import run_images

    images = []
    for k, relative in enumerate(("dupA/scene.tif", "dupB/scene.tif", "scene-2.tif")):
        (tmp_path / relative).parent.mkdir(exist_ok=True)
        write_scene(tmp_path / relative, seed=80 + k, height=200, width=200)
        images.append(tmp_path / relative)
    card = load_card(resolve_model_dir())
    folders = []
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        for order in (images, images[::-1], images[1:]):
            report = run_images(client, order, resolve_model_dir(), card, tmp_path / "out", Tiling(256, 32), show_progress=False)
            assert not report.failed
            folders.append({Path(image).relative_to(tmp_path).parts[0]: summary["image_id"] for image, summary in report.done.items()})
        assert folders[0] == folders[1] == {"dupA": "scene", "dupB": "scene-3", "scene-2.tif": "scene-2"}
        assert folders[2] == {"dupB": "scene-3", "scene-2.tif": "scene-2"}
        build_catalogue(tmp_path / "out")
        assert sorted(o.image_id for o in image_outputs(tmp_path / "out")) == ["scene", "scene-2", "scene-3"]
        # dupA's counts.json damaged: whose `scene` holds is unknown, and another scene.tif must not overwrite it
        (tmp_path / "out" / "scene" / "counts.json").write_text('{"ima')
        before = (tmp_path / "out" / "scene" / "instances.gpkg").read_bytes()
        (tmp_path / "dupC").mkdir()
        write_scene(tmp_path / "dupC" / "scene.tif", seed=90, height=200, width=200)
        report = run_images(client, [tmp_path / "dupC" / "scene.tif"], resolve_model_dir(), card, tmp_path / "out", Tiling(256, 32),
                            show_progress=False)
    assert [summary["image_id"] for summary in report.done.values()] == ["scene-4"]
    assert (tmp_path / "out" / "scene" / "instances.gpkg").read_bytes() == before
    assert "results without a readable counts.json (their image is unknown) kept" in report.warnings[str(tmp_path / "dupC" / "scene.tif")][0]


def test_status_tells_apart_images_of_one_name(tmp_path):
    from typer.testing import CliRunner

    from workflows.cli import app
    from workflows.ledger import Fingerprint, Ledger

    with Ledger(tmp_path) as ledger:
        for folder, out_dir in (("north", "scene"), ("south", "scene-2")):
            ledger.started(tmp_path / folder / "scene.tif", Fingerprint(1, 1), "c", "m", tmp_path / out_dir)
            ledger.failed(tmp_path / folder / "scene.tif", "stopped")
    output = CliRunner().invoke(app, ["status", str(tmp_path)]).output
    assert output.count("scene.tif") == 2 and output.count("→") == 1  # the second one shows its folder
    assert "scene.tif → scene-2" in output or ("scene.tif →" in output and "│ scene-2" in output)  # rich may wrap it


def test_folders_and_manifests_are_read_as_an_operator_expects(tmp_path):
    """Any letter case; no hidden files or folders (macOS `._*`, `.snapshot/`); never the run's own
    outputs; one spelling per file; Excel's CSV (a BOM) and a row without a path; nothing found refused."""
    archive = tmp_path / "archive"
    for name in ["a.tif", "B.TIF", "deep/c.tiff", ".hidden.tif", "._a.tif", ".snapshot/a.tif", "out/report/a.png", "notes.txt"]:
        (archive / name).parent.mkdir(parents=True, exist_ok=True)
        (archive / name).write_bytes(b"x")
    (tmp_path / "w.yaml").write_text("inputs:\n  paths: [archive, sub/../archive]\noutputs:\n  dir: archive/out\n")
    workflow = load_workflow(tmp_path / "w.yaml")
    images, problems = list_inputs(workflow.inputs, workflow.outputs.dir)
    assert [p.relative_to(archive).as_posix() for p in images] == ["B.TIF", "a.tif", "deep/c.tiff"] and not problems
    assert all(".." not in p.parts for p in images)

    (tmp_path / "m.csv").write_bytes("\ufeffpath,note\narchive/a.tif,x\n,no file\n".encode())
    (tmp_path / "m.yaml").write_text("inputs:\n  manifest: m.csv\noutputs:\n  dir: out\n")
    images, problems = list_inputs(load_workflow(tmp_path / "m.yaml").inputs)
    assert images == [archive / "a.tif"] and list(problems.values()) == [f"{tmp_path / 'm.csv'}:3: no path in this row"]
    (tmp_path / "m.csv").write_bytes(b"\x1f\x8b\x08\x00\xff\xfe\x00")  # a gzip, not a CSV
    with pytest.raises(WorkflowError, match="m.csv: not a CSV text file"):
        list_inputs(load_workflow(tmp_path / "m.yaml").inputs)

    (tmp_path / "empty").mkdir()
    (tmp_path / "e.yaml").write_text("inputs:\n  paths: [empty]\n  patterns: ['*.tif']\noutputs:\n  dir: out\n")
    with pytest.raises(WorkflowError, match=r"no image found in .*empty \(patterns \*\.tif\)"):
        list_inputs(load_workflow(tmp_path / "e.yaml").inputs)
    result = seamline("run", tmp_path / "e.yaml")
    assert result.returncode == 2 and "no image found" in result.stdout
    (tmp_path / "typo.yaml").write_text("inputs:\n  paths: [archiv]\noutputs:\n  dir: typo-out\n")
    result = seamline("run", tmp_path / "typo.yaml")
    assert result.returncode == 2 and "not found: " in result.stdout and not (tmp_path / "typo-out").exists()
    result = seamline("run", tmp_path / "w.yaml", "--out", tmp_path / "elsewhere", "--model", "nuclei-he")
    assert result.returncode == 2 and "--out, --model: a workflow file sets these itself" in " ".join(result.stdout.split())


def test_kept_batches_are_named_by_the_file_and_model_they_came_from(tmp_path):
    """A file or model replaced in place (same names, same settings) must not resume from the
    batches of the one before."""
    import shutil

    from safetensors.torch import load_file, save_file

    from workflows.ledger import fingerprint, model_hash
    from workflows.run import resume_folder

    scene = tmp_path / "scene.tif"
    write_scene(scene, seed=1, height=300, width=300)
    model = tmp_path / "model"
    shutil.copytree(resolve_model_dir(), model)
    card = load_card(model)
    tiling = Tiling(card.tile_size, card.overlap, 2)

    def folder(content: bool = False):
        return resume_folder(tmp_path / "out", open_raster(scene), model_hash(model), tiling, fingerprint(scene, content))

    first, hashed = folder(), folder(content=True)
    assert folder() == first and hashed != first
    stat = scene.stat()
    write_scene(scene, seed=2, height=300, width=300)  # new content, same name and size
    assert folder() != first
    os.utime(scene, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old time too: the content hash tells them apart
    assert folder(content=True) != hashed
    weights = model / card.weights
    stat = weights.stat()
    swapped = load_file(weights)
    swapped["roi_heads.box_predictor.cls_score.bias"] = swapped["roi_heads.box_predictor.cls_score.bias"].flip(0)
    save_file(swapped, weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # new weights, same size and time
    assert folder() != first


def test_a_rerun_leaves_no_stale_labels_or_kept_batches(tmp_path):
    write_scene(tmp_path / "s.tif", seed=5, height=400, width=500)
    out = tmp_path / "out"
    options = ["--out", out, "--workers", "1", "--threads", "1"]
    assert seamline("run", tmp_path / "s.tif", *options).returncode == 0
    assert (out / "s" / "labels.zarr").is_dir()
    (out / "s" / ".partial-0123").mkdir()  # kept by a run that died, under other settings
    (out / "s" / ".instances.0123abcd.tmp.gpkg").write_bytes(b"half")  # a run killed while writing its outputs
    (out / "s" / ".labels.zarr.0123abcd.tmp").mkdir()
    result = seamline("run", tmp_path / "s.tif", *options, "--no-zarr")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (out / "s").iterdir()) == ["counts.csv", "counts.json", "instances.gpkg"]


def test_the_ledger_follows_its_output_directory_when_it_moves(tmp_path):
    from workflows.ledger import Ledger, fingerprint

    image = tmp_path / "scene.tif"
    image.write_bytes(b"pixels")
    with Ledger(tmp_path / "old") as ledger:
        ledger.started(image, fingerprint(image), "config", "model", tmp_path / "old" / "scene")
        ledger.done(image, {"instances": 3, "counts": {"a": 3}})
    whole_outputs(tmp_path / "old" / "scene")
    (tmp_path / "old").rename(tmp_path / "new")
    with Ledger(tmp_path / "new") as ledger:
        row = ledger.get(image)
        assert ledger.folder(row) == tmp_path / "new" / "scene"  # not the old place: results must not go there
        assert ledger.is_current(image, fingerprint(image), "config", "model")


def test_an_image_whose_outputs_are_gone_or_damaged_is_no_longer_current(tmp_path):
    """The ledger says done, but the GeoPackage was deleted, truncated or replaced, counts.json
    is unreadable or labels.zarr lost its metadata: the image is processed again."""
    from workflows.ledger import Ledger, fingerprint

    image = tmp_path / "scene.tif"
    image.write_bytes(b"pixels")
    folder = tmp_path / "scene"
    gpkg = folder / "instances.gpkg"
    damages = {
        "deleted": lambda: gpkg.unlink(),
        "truncated": lambda: gpkg.write_bytes(gpkg.read_bytes()[: gpkg.stat().st_size // 2]),
        "not a GeoPackage": lambda: gpkg.write_text("notes"),
        "counts.json cut": lambda: (folder / "counts.json").write_text('{"image": "x'),
        "counts.csv gone": lambda: (folder / "counts.csv").unlink(),
        "labels.zarr lost": lambda: (folder / "counts.json").write_text(
            json.dumps({**json.loads((folder / "counts.json").read_text()), "labels_zarr": {}})),
    }
    with Ledger(tmp_path) as ledger:
        ledger.started(image, fingerprint(image), "config", "model", folder)
        ledger.done(image, {"instances": 1, "counts": {"a": 1}})
        for name, damage in damages.items():
            whole_outputs(folder)
            assert ledger.is_current(image, fingerprint(image), "config", "model"), name
            damage()
            assert not ledger.is_current(image, fingerprint(image), "config", "model"), name


def test_the_catalogue_serves_only_what_the_ledger_has_as_done(tmp_path):
    """A renamed image is served once (under its new name), a deleted one not at all, and one that
    changed and now fails no longer serves the results of its earlier version (they stay on disk)."""
    (tmp_path / "archive").mkdir()
    for i in range(3):
        write_scene(tmp_path / "archive" / f"scene{i}.tif", seed=60 + i, height=300, width=400)
    workflow = workflow_file(tmp_path, report=True)
    assert seamline("run", workflow).returncode == 0
    archive = tmp_path / "archive"
    (archive / "scene0.tif").rename(archive / "renamed.tif")
    (archive / "scene1.tif").unlink()
    (archive / "scene2.tif").write_bytes((archive / "renamed.tif").read_bytes()[:2000])  # changed, now unreadable
    second = seamline("run", workflow)
    assert second.returncode == 1 and "gone since the last run" in second.stdout
    rows = ledger_rows(tmp_path / "out")
    assert {n: r["status"] for n, r in rows.items()} == {
        "scene0.tif": "missing", "scene1.tif": "missing", "scene2.tif": "failed", "renamed.tif": "done"}
    assert rows["scene2.tif"]["instances"] is None and (tmp_path / "out" / "scene2" / "instances.gpkg").is_file()
    served = sorted(p.name for p in (tmp_path / "out" / "catalogue").glob("image_id=*"))
    assert served == ["image_id=renamed"]


def test_a_model_folder_beside_the_workflow_is_found_from_any_directory(tmp_path, monkeypatch):
    (tmp_path / "jobs" / "mymodel").mkdir(parents=True)
    (tmp_path / "jobs" / "mymodel" / "model.yaml").write_text((resolve_model_dir() / "model.yaml").read_text())
    (tmp_path / "jobs" / "w.yaml").write_text("inputs: {paths: [a]}\noutputs: {dir: out}\nmodel: mymodel\n")
    monkeypatch.chdir(tmp_path)  # as cron runs it: not from the workflow's folder
    assert load_workflow(tmp_path / "jobs" / "w.yaml").model == str(tmp_path / "jobs" / "mymodel")
    (tmp_path / "jobs" / "w.yaml").write_text("inputs: {paths: [a]}\noutputs: {dir: out}\nmodel: nuclei-he\n")
    assert load_workflow(tmp_path / "jobs" / "w.yaml").model == "nuclei-he"  # shipped names stay names
    (tmp_path / "models" / "mine").mkdir(parents=True)  # beside the current directory, not the workflow
    (tmp_path / "models" / "mine" / "model.yaml").write_text((resolve_model_dir() / "model.yaml").read_text())
    (tmp_path / "jobs" / "w.yaml").write_text("inputs: {paths: [a]}\noutputs: {dir: out}\nmodel: models/mine\n")
    assert load_workflow(tmp_path / "jobs" / "w.yaml").model == str(tmp_path / "jobs" / "models" / "mine")  # the file's


def test_an_images_seconds_are_its_own_segmentation_time_kept_across_a_resume(tmp_path):
    """Images of a run interleave, so wall times overlap: an image's seconds are its batches' own
    (model and polygons), summed, and a batch kept for a resume keeps its time."""
    from pipeline.batch_cache import load_batch, save_batch
    from pipeline.grid import TileGrid
    from pipeline.stages import read_batch, segment_batch
    from workflows.ledger import Ledger, fingerprint

    image = tmp_path / "scene.tif"
    write_scene(image, seed=81, height=300, width=300)
    model = resolve_model_dir()
    card = load_card(model)
    graph = image_graph(open_raster(image), str(model), card.classes, tmp_path / "out", Tiling(256, 32, 2))
    (summary,) = dask.compute(graph.result, scheduler="sync")
    assert 0 < summary["segment_seconds"] < 60
    result = segment_batch(read_batch(open_raster(image), TileGrid(300, 300, 256, 32), [0, 1]), str(model))
    save_batch(tmp_path / "kept.npz", result)
    assert load_batch(tmp_path / "kept.npz").seconds == result.seconds > 0
    with Ledger(tmp_path / "out") as ledger:
        ledger.started(image, fingerprint(image), "config", "model", tmp_path / "out")
        ledger.done(image, summary)
        assert ledger.get(image)["seconds"] == summary["segment_seconds"]


def test_status_tells_a_killed_run_from_a_live_one(tmp_path):
    from typer.testing import CliRunner

    from workflows.cli import app
    from workflows.ledger import LOCK_NAME, Ledger, fingerprint

    image = tmp_path / "scene.tif"
    image.write_bytes(b"pixels")
    with Ledger(tmp_path / "out") as ledger:
        ledger.started(image, fingerprint(image), "config", "model", tmp_path / "out" / "scene")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid, shown in [(int(finished.stdout), "interrupted: 1"), (os.getpid(), "running: 1")]:
        (tmp_path / "out" / LOCK_NAME).write_text(f"{pid}\n")
        result = CliRunner().invoke(app, ["status", str(tmp_path / "out")])
        assert result.exit_code == 0 and shown in result.output, result.output


def test_a_failing_image_stops_its_other_batches(tmp_path):
    """A tile that cannot be read fails its image at once; the image's other batches are cancelled,
    not segmented for nothing, and the next image is unaffected."""
    import tifffile
    from distributed import Client, LocalCluster

    from workflows.run import RunEvents, run_images

    write_scene(tmp_path / "bad.tif", seed=80, height=1536, width=1536)
    write_scene(tmp_path / "good.tif", seed=81, height=300, width=300)
    with tifffile.TiffFile(tmp_path / "bad.tif") as tif:
        offset, size = tif.pages[0].dataoffsets[20], tif.pages[0].databytecounts[20]
    with open(tmp_path / "bad.tif", "r+b") as file:  # a tile in the fourth row of blocks: garbage
        file.seek(offset)
        file.write(b"\xff" * size)
    done = []
    events = RunEvents(batch_done=lambda image: done.append(Path(image).name))
    card = load_card(resolve_model_dir())
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        report = run_images(client, [tmp_path / "bad.tif", tmp_path / "good.tif"], resolve_model_dir(), card,
                            tmp_path / "out", Tiling(256, 32, 2), show_progress=False, events=events)
    assert list(report.failed) == [str(tmp_path / "bad.tif")] and "bad.tif" in report.failed[str(tmp_path / "bad.tif")]
    assert list(report.done) == [str(tmp_path / "good.tif")] and done.count("good.tif") >= 1
    assert done.count("bad.tif") <= 16, done  # of its 25 batches: those above the bad tile, and one or two more


def test_the_ledger_serves_results_being_redone_and_retires_inputs_no_longer_listed(tmp_path):
    """While a run redoes an image, its previous results stand (the new files replace them only when
    complete); an image the workflow no longer lists is withdrawn, one whose file is gone missing."""
    from workflows.ledger import Fingerprint, Ledger

    kept, new, dropped, deleted = (tmp_path / f"{n}.tif" for n in ("kept", "new", "dropped", "deleted"))
    for image in (kept, new, dropped):
        image.write_bytes(b"x")
    summary = {"instances": 3, "counts": {"a": 3}}
    with Ledger(tmp_path) as ledger:
        for image in (kept, dropped, deleted):
            ledger.started(image, Fingerprint(1, 1), "c", "m", tmp_path / image.stem)
            ledger.done(image, summary)
        assert ledger.served_folders() == {"kept", "dropped", "deleted"}
        ledger.started(kept, Fingerprint(1, 2), "c", "m2", tmp_path / "kept")  # redone: a model change, say
        ledger.started(new, Fingerprint(1, 1), "c", "m2", tmp_path / "new")  # nothing to serve yet
        assert ledger.served_folders() == {"kept", "dropped", "deleted"}
        retired = ledger.retire_missing({str(kept), str(new)})
        assert sorted(retired) == [(str(deleted), "missing"), (str(dropped), "withdrawn")]
        assert ledger.served_folders() == {"kept"} and ledger.retire_missing({str(kept), str(new)}) == []
        whole_outputs(tmp_path / "dropped")  # its outputs, still in the folder
        assert ledger.is_current(dropped, Fingerprint(1, 1), "c", "m")  # listed again unchanged: not redone ...
        ledger.reinstate(dropped)
        assert ledger.served_folders() == {"kept", "dropped"}  # ... and served again
        ledger.failed(kept, "unreadable")
        assert ledger.served_folders() == {"dropped"}


def test_inputs_never_include_the_outputs_and_a_glob_into_no_folder_is_a_problem(tmp_path):
    archive = tmp_path / "archive"
    for name in ["a.tif", "out/report/a.png", "out/scene/preview.png"]:
        (archive / name).parent.mkdir(parents=True, exist_ok=True)
        (archive / name).write_bytes(b"x")
    (tmp_path / "g.yaml").write_text("inputs:\n  globs: ['archive/**/*.png', 'archive/*.tif', 'archiv/*.tif']\n"
                                     "outputs:\n  dir: archive/out\n")
    workflow = load_workflow(tmp_path / "g.yaml")
    images, problems = list_inputs(workflow.inputs, workflow.outputs.dir)
    assert images == [archive / "a.tif"]  # the run's pictures are never its inputs, however matched
    assert list(problems.values()) == [f"{tmp_path / 'archiv/*.tif'}: matches nothing: no folder {tmp_path / 'archiv'}"]
    (tmp_path / "same.yaml").write_text("inputs:\n  paths: [archive/out]\n  patterns: ['*.png']\noutputs:\n  dir: archive/out\n")
    workflow = load_workflow(tmp_path / "same.yaml")
    with pytest.raises(WorkflowError, match="no image found"):
        list_inputs(workflow.inputs, workflow.outputs.dir)


def test_what_decides_a_rerun_is_the_models_files_and_settings_that_change_results(tmp_path):
    from safetensors.numpy import save_file

    from workflows.batch import settings_of
    from workflows.ledger import model_hash

    model = tmp_path / "model"
    (model / "weights").mkdir(parents=True)
    card = (resolve_model_dir() / "model.yaml").read_text().replace("weights: weights.safetensors", "weights: weights/w.ckpt")
    (model / "model.yaml").write_text(card)
    save_file({"w": np.zeros(3, np.float32)}, model / "weights" / "w.ckpt")
    before = model_hash(model)
    save_file({"w": np.ones(3, np.float32)}, model / "weights" / "w.ckpt")  # new weights where the card says they are
    assert model_hash(model) != before
    workflow = load_workflow(workflow_file(tmp_path))
    assert settings_of(workflow, Tiling(512, 64, 2)) == settings_of(workflow, Tiling(512, 64, 8))  # batch size: same results
    assert settings_of(workflow, Tiling(512, 64, 2)) != settings_of(workflow, Tiling(512, 96, 2))


def test_status_shows_counts_only_for_results_that_are_served(tmp_path):
    from typer.testing import CliRunner

    from workflows.cli import app
    from workflows.ledger import Fingerprint, Ledger

    with Ledger(tmp_path) as ledger:
        for name, count in (("kept.tif", 41), ("gone.tif", 97)):
            ledger.started(tmp_path / name, Fingerprint(1, 1), "c", "m", tmp_path / Path(name).stem)
            ledger.done(tmp_path / name, {"instances": count, "counts": {"a": count}})
        ledger.retire_missing({str(tmp_path / "kept.tif")})
    output = CliRunner().invoke(app, ["status", str(tmp_path)]).output
    assert "41" in output and "97" not in output and "missing: 1" in output


def test_a_damaged_ledger_is_named_with_what_to_do(tmp_path):
    from typer.testing import CliRunner

    from workflows.cli import app

    (tmp_path / "archive").mkdir()
    write_scene(tmp_path / "archive" / "a.tif", seed=1, height=100, width=100)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ledger.sqlite").write_bytes(b"not a database, but a page of text " * 40)
    for arguments in (["status", str(tmp_path / "out")], ["run", str(workflow_file(tmp_path)), "--no-progress"],
                      ["query", str(tmp_path / "out")], ["catalogue", str(tmp_path / "out")]):
        result = CliRunner().invoke(app, arguments)
        message = " ".join(result.output.split())
        assert result.exit_code == 2 and "ledger.sqlite: not a readable ledger" in message and "move it aside" in message, result.output
    assert (tmp_path / "out" / "ledger.sqlite").read_bytes().startswith(b"not a database")  # left for the operator to see


def test_results_rewritten_outside_the_ledger_are_not_current_and_old_ledgers_migrate(tmp_path):
    """A plain ``seamline run`` into a workflow's folder (another model, say) rewrote an image's
    outputs: the ledger must not serve them as what it recorded."""
    from workflows.ledger import Ledger, fingerprint

    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:  # as an earlier version created it
        db.execute("CREATE TABLE images (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha256 TEXT, config_hash TEXT, "
                   "model_hash TEXT, status TEXT NOT NULL, output_dir TEXT, started REAL, finished REAL, seconds REAL, "
                   "instances INTEGER, counts TEXT, tiles INTEGER, tiles_skipped INTEGER, batches_resumed INTEGER, error TEXT, warnings TEXT)")
    image = tmp_path / "scene.tif"
    image.write_bytes(b"pixels")
    folder = whole_outputs(tmp_path / "scene")
    with Ledger(tmp_path) as ledger:
        ledger.started(image, fingerprint(image), "config", "model", folder)
        ledger.done(image, {"instances": 1, "counts": {"a": 1}})
        assert ledger.is_current(image, fingerprint(image), "config", "model")
        summary = json.loads((folder / "counts.json").read_text())
        (folder / "counts.json").write_text(json.dumps({**summary, "instances": 2}))  # another run's
        assert not ledger.is_current(image, fingerprint(image), "config", "model")
