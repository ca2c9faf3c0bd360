"""Faults: a full disk during a write, a scheduler restarted mid-run. Nothing half-written is
ever visible under a final name, and the ledger never claims a result that is not on disk."""

import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import pyogrio
import shapely
from distributed import LocalCluster

from pipeline import side_process
from pipeline.synthetic_raster import write_scene
from tests.test_cluster import free_port
from workflows.batch import run_workflow
from workflows.spec import load_workflow

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def statuses(out: Path) -> dict[str, tuple[str, str | None]]:
    with sqlite3.connect(out / "ledger.sqlite") as db:
        return {Path(p).name: (s, e) for p, s, e in db.execute("SELECT path, status, error FROM images")}


def test_disk_full_during_a_write_loses_nothing(tmp_path, monkeypatch):
    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(2):
        write_scene(archive / f"scene{i}.tif", seed=60 + i, height=500, width=600)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        (tmp_path / "w.yaml").write_text(
            f"inputs:\n  paths: [archive]\noutputs:\n  dir: out\n  report: false\n  catalogue: false\n"
            f"cluster:\n  scheduler: {cluster.scheduler_address}\n"
        )
        workflow = load_workflow(tmp_path / "w.yaml")
        assert run_workflow(workflow, show_progress=False, log=lambda *_: None).ok
        out = tmp_path / "out"
        before = {p.relative_to(out): p.read_bytes() for p in (out / "scene1").rglob("*") if p.is_file()}

        write_scene(archive / "scene1.tif", seed=99, height=500, width=600)  # changed: reprocessed next run
        real_write = pyogrio.write_dataframe

        def disk_full(frame, path, *args, **kwargs):
            if "scene1" in str(path):
                Path(path).write_bytes(b"half a file")  # the bytes that made it before the disk filled up
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real_write(frame, path, *args, **kwargs)

        monkeypatch.setattr(pyogrio, "write_dataframe", disk_full)
        monkeypatch.setattr(side_process, "can_start", lambda: False)  # the write runs here, where the fault is
        outcome = run_workflow(workflow, show_progress=False, log=lambda *_: None)
        assert not outcome.ok and "No space left on device" in outcome.report.failed[str(archive / "scene1.tif")]
        status, error = statuses(out)["scene1.tif"]
        assert status == "failed" and "scene1" in error and "No space left" in error
        after = {p.relative_to(out): p.read_bytes() for p in (out / "scene1").rglob("*") if p.is_file()}
        staged = {p for p in after if ".partial-" in str(p) or ".instances-parts." in str(p)}
        assert after.keys() - before.keys() <= staged  # kept batches and the merge's parts only, both hidden
        assert all(after[p] == before[p] for p in before if p.parts[0] != "labels.zarr")  # old results intact
        assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temporary file left anywhere

        def gdal_full(frame, path, *args, **kwargs):  # as GDAL says it: whatever failed next
            if "scene1" in str(path):
                raise pyogrio.errors.DataLayerError("failed: no such table: gpkg_contents")
            return real_write(frame, path, *args, **kwargs)

        monkeypatch.setattr(pyogrio, "write_dataframe", gdal_full)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 2**30 - 2**20, 2**20))
        outcome = run_workflow(workflow, show_progress=False, log=lambda *_: None)
        error = outcome.report.failed[str(archive / "scene1.tif")]
        assert "out/scene1: disk full (1.0 MiB free) while writing the outputs (DataLayerError" in error
        assert all(after[p] == before[p] for p in before if p.parts[0] != "labels.zarr")

        monkeypatch.undo()
        assert run_workflow(workflow, show_progress=False, log=lambda *_: None).ok
        assert statuses(out)["scene1.tif"][0] == "done"


def start_cluster(port: int, logs: Path) -> list[subprocess.Popen]:
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                 stdout=open(logs / f"scheduler-{time.time()}.log", "w"), stderr=subprocess.STDOUT, env=ENV)
    worker = subprocess.Popen([BIN / "dask", "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                               "--host", "127.0.0.1"],
                              stdout=open(logs / f"worker-{time.time()}.log", "w"), stderr=subprocess.STDOUT, env=ENV)
    return [scheduler, worker]


def stop(processes: list[subprocess.Popen], sig=signal.SIGTERM) -> None:
    for process in processes:
        process.send_signal(sig)
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def test_scheduler_restart_mid_run_then_resume(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    write_scene(archive / "big.tif", seed=7, height=1500, width=1500)
    port = free_port()
    (tmp_path / "w.yaml").write_text(
        f"inputs:\n  paths: [archive]\noutputs:\n  dir: out\n  zarr: false\n  report: false\n  catalogue: false\n"
        f"tiling:\n  batch_size: 1\ncluster:\n  scheduler: tcp://127.0.0.1:{port}\n"
    )
    out = tmp_path / "out"
    cluster = start_cluster(port, tmp_path)
    try:
        run = subprocess.Popen([BIN / "seamline", "run", tmp_path / "w.yaml", "--no-progress"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env=ENV)
        deadline = time.time() + 300
        while len(list(out.glob("big/.partial-*/batch-*.npz"))) < 3 and time.time() < deadline:
            time.sleep(0.2)
        stop(cluster[:1], signal.SIGKILL)  # the scheduler dies mid-run
        stop(cluster[1:])
        try:
            output, _ = run.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            run.kill()
            output, _ = run.communicate()
        assert run.returncode != 0, output.decode()
        assert statuses(out)["big.tif"][0] != "done" and not (out / "big" / "instances.gpkg").exists()

        cluster = start_cluster(port, tmp_path)  # restarted, same address
        again = subprocess.run([BIN / "seamline", "run", tmp_path / "w.yaml", "--no-progress"], capture_output=True,
                               text=True, timeout=600, env=ENV)
        assert again.returncode == 0, again.stdout + again.stderr
    finally:
        stop(cluster)
    with sqlite3.connect(out / "ledger.sqlite") as db:
        status, resumed, instances = db.execute("SELECT status, batches_resumed, instances FROM images").fetchone()
    assert status == "done" and resumed >= 3
    frame = gpd.read_file(out / "big" / "instances.gpkg", layer="instances")
    assert len(frame) == instances > 100 and shapely.is_valid(frame.geometry.values).all()
