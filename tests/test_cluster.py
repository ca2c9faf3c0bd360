"""The pipeline through real ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import dask
import geopandas as gpd
import pytest
import shapely
from distributed import Client

from models.card import load_card
from models.registry import resolve_model_dir
from pipeline.graph import Tiling, image_graph
from pipeline.sources import open_raster
from pipeline.synthetic_raster import write_scene

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path_factory.mktemp("dask-logs")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    scheduler = subprocess.Popen(
        [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=open(logs / "scheduler.log", "w"), stderr=subprocess.STDOUT, env=env,
    )
    workers = subprocess.Popen(
        [BIN / "dask", "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
        stdout=open(logs / "workers.log", "w"), stderr=subprocess.STDOUT, env=env,
    )
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            yield address, client
    finally:
        for process in (workers, scheduler):
            process.terminate()
        for process in (workers, scheduler):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def test_cli_through_scheduler_and_worker_processes(cluster, tmp_path):
    address, client = cluster
    scene_path = tmp_path / "scene.tif"
    write_scene(scene_path, seed=77, height=1100, width=1000)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(scene_path.read_bytes()[:5000])
    result = subprocess.run(
        [BIN / "seamline", "run", scene_path, broken, "--scheduler", address, "--out", tmp_path / "out",
         "--batch-size", "2", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 1, result.stdout + result.stderr  # one image failed, the other did not
    assert "broken.tif" in result.stdout
    assert "Dask workers are daemonic" in result.stderr  # `dask worker`'s default: the writes run in the merge's thread
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert list(run["done"]) == [str(scene_path)] and list(run["failed"]) == [str(broken)]
    assert "broken.tif" in run["failed"][str(broken)]
    assert not (tmp_path / "out" / "broken" / "instances.gpkg").exists()

    distributed = gpd.read_file(tmp_path / "out" / "scene" / "instances.gpkg", layer="instances")
    model = resolve_model_dir()
    card = load_card(model)
    graph = image_graph(open_raster(scene_path), str(model), card.classes, tmp_path / "local", Tiling(512, 64, 4))
    dask.compute(graph.result, scheduler="sync")
    local = gpd.read_file(tmp_path / "local" / "instances.gpkg", layer="instances")
    assert len(distributed) == len(local) > 0
    assert list(distributed["instance_id"]) == list(local["instance_id"])
    assert shapely.equals_exact(distributed.geometry.values, local.geometry.values, tolerance=0).all()

    prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert {"read", "segment", "merge", "write"} <= set(prefixes)


@pytest.mark.parametrize("variables, profiling", [({}, False), ({"DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "True"}, True)])
def test_local_workers_run_without_dask_s_profiler_unless_the_dask_config_asks(monkeypatch, variables, profiling):
    from workflows.cluster import connect

    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with connect(workers=1, threads_per_worker=1, dashboard=":0") as client:
        sampling = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
        daemonic = client.run(lambda: dask.config.get("distributed.worker.daemon"))
    assert list(sampling.values()) == [profiling]
    assert list(daemonic.values()) == [False]  # Seamline's own settings still apply


def test_runs_on_gpu_asks_the_workers(cluster, monkeypatch):
    """CPU workers run batches of 4; workers whose model loads on CUDA (a local cluster on a GPU
    machine advertises no GPU resource) are told apart by asking them."""
    from distributed import LocalCluster

    from workflows.cluster import runs_on_gpu

    assert not runs_on_gpu(cluster[1])
    monkeypatch.setenv("SEAMLINE_DEVICE", "cuda")  # in-process workers read this process's environment
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as local, Client(local) as client:
        assert runs_on_gpu(client)
