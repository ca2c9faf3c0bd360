"""Shared by the benchmark scripts: peak-memory measurement, machine description, and the
scoring of outputs against ground truth (sparse versions of ``tests/helpers``' definitions, so
tens of thousands of instances fit in memory)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import shapely
from scipy import ndimage

from pipeline.polygons import mask_to_polygon

if TYPE_CHECKING:
    from pipeline.graph import Tiling

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """CPU model, cores, memory, and the load when the benchmark started."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{name}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, load average {load}"


class PeakRSS:
    """Peak resident memory of this process (sampled every ``interval`` s) inside a ``with`` block."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.process = psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def run_measured(command: list[str], env: dict | None = None, interval: float = 0.05, want_json: bool = True) -> dict:
    """Run ``command`` in its own process tree; its wall time, the peak of the tree's summed RSS,
    the peak of its largest single process and the peaks by role (``client``: the command's own
    process, ``worker``: its multiprocessing children such as Dask workers, ``side``: theirs, such
    as a worker's side process for its writes, ``other``), sampled every
    ``interval`` s, and the JSON object the command printed last on stdout (``result``)."""
    start = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    out: list[str] = []
    errors: list[str] = []
    readers = [threading.Thread(target=lambda: out.extend(process.stdout), daemon=True),
               threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True)]
    for reader in readers:
        reader.start()
    tree_peak = single_peak = 0
    roles: dict[str, int] = {}
    while process.poll() is None:
        total = 0
        try:
            family = [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for member in family:
            try:
                rss = member.memory_info().rss
                spawned = "spawn_main" in " ".join(member.cmdline())
                role = ("client" if member is process else "other" if not spawned
                        else "worker" if member.ppid() == process.pid else "side")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            single_peak = max(single_peak, rss)
            roles[role] = max(roles.get(role, 0), rss)
        tree_peak = max(tree_peak, total)
        time.sleep(interval)
    seconds = time.perf_counter() - start
    for reader in readers:
        reader.join()
    result = None
    for line in reversed(out):
        if line.startswith("{"):
            result = json.loads(line)
            break
    if process.returncode or (want_json and result is None):
        sys.stderr.write("".join(errors)[-3000:])
        raise RuntimeError(f"{' '.join(command)} failed with exit code {process.returncode}")
    return {"seconds": seconds, "tree_peak": tree_peak, "single_peak": single_peak, "roles": roles,
            "result": result, "stdout": "".join(out)}


WORKER_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")


# what workflows.cluster.connect (``seamline run``) gives its workers: no MALLOC_TRIM_THRESHOLD_
SEAMLINE_WORKER_ENV: dict[str, str | None] = {"MALLOC_TRIM_THRESHOLD_": None}


@contextlib.contextmanager
def local_cluster(workers: int, threads: int, env: dict[str, str | None] | None = None, config: dict | None = None):
    """A ``LocalCluster`` like ``workflows.cluster.connect`` (processes, 127.0.0.1), dashboard on
    a free port. Dask starts workers with ``OMP/MKL/OPENBLAS_NUM_THREADS=1`` and
    ``MALLOC_TRIM_THRESHOLD_=65536`` (``distributed.nanny.pre-spawn-environ``); ``env`` overrides
    them (``None`` as a value: unset in the worker). By default (``env=None``) the overrides of
    ``connect``: ``SEAMLINE_WORKER_ENV``; ``env={}`` keeps Dask's defaults. Workers get ``connect``'s
    other settings too (``local_worker_config``: not daemonic, so each has its side process for
    the writes; no profiler); ``config`` overrides them
    (``{"distributed.worker.daemon": True}``: the writes in the merge's thread)."""
    import dask
    from distributed import Client, LocalCluster

    from workflows.cluster import SideProcessShutdown, local_worker_config

    env = SEAMLINE_WORKER_ENV if env is None else env
    # the nanny prefers these variables from os.environ over its config and leaves its own in
    # os.environ after spawning: clear them around the start and restore them afterwards
    saved = {k: os.environ.pop(k, None) for k in WORKER_ENV}
    os.environ.update({k: str(v) for k, v in env.items() if v is not None})
    spawn_environ = "distributed.nanny.pre-spawn-environ."
    settings = {k: v for k, v in local_worker_config().items() if not k.startswith(spawn_environ)}  # env sets those
    settings |= {f"{spawn_environ}{k}": None for k, v in env.items() if v is None} | (config or {})
    try:
        with dask.config.set(settings):
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=threads, processes=True, host="127.0.0.1", dashboard_address=":0"
            )
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    with cluster, Client(cluster) as client:
        client.register_plugin(SideProcessShutdown())
        yield client


def cluster_run(client, images: list[Path], model_dir: Path, out: Path, tiling: Tiling, labels: bool = True) -> int:
    """Images through ``workflows.run.run_images`` in one run, as ``seamline run`` does (``labels``:
    also labels.zarr, as without ``--no-zarr``); the instances found in all of them."""
    from models.card import load_card
    from workflows.run import run_images

    card = load_card(model_dir)
    report = run_images(client, images, model_dir, card, out, tiling, show_progress=False, labels=labels)
    if not report.ok:
        raise RuntimeError(report.failed)
    return sum(summary["instances"] for summary in report.done.values())


def fresh_cluster_run(workers: int, threads: int, images: list[Path], model_dir: Path, out: Path, tiling: Tiling,
                      labels: bool = True, env: dict | None = None, config: dict | None = None) -> tuple[int, float, int, float]:
    """Start a ``local_cluster``, warm it up (a run of the first image per worker, so every worker
    has loaded the model), time one ``cluster_run`` of all ``images`` and close it: no idle cluster
    shares the CPU with other runs. Returns (instances, seconds, torch threads per worker, seconds
    after the last segment task ended: the last image's merge, labels.zarr and GeoPackage, which no
    tile overlaps)."""
    from dask.utils import key_split
    from distributed import get_task_stream

    with local_cluster(workers, threads, env, config) as client:
        for warm_up in range(workers):
            cluster_run(client, images[:1], model_dir, out.with_name(f"{out.name}-warm-{warm_up}"), tiling)
        with get_task_stream(client) as stream:
            start = time.time()
            found = cluster_run(client, images, model_dir, out, tiling, labels)
            end = time.time()
        last_tile = max(part["stop"] for task in stream.data if key_split(task["key"]) == "segment"
                        for part in task["startstops"] if part["action"] == "compute")
        return found, end - start, worker_torch_threads(client), end - last_tile


def worker_torch_threads(client) -> int:
    import torch

    return next(iter(client.run(torch.get_num_threads).values()))


def label_polygons(labels: np.ndarray) -> np.ndarray:
    """Exact pixel-edge polygon of every instance of a label image (ids 1..n, in id order);
    ``tests.helpers.label_polygons`` with ``find_objects`` so it scales to large scenes."""
    polygons = []
    for instance, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        rows, cols = found
        polygons.append(mask_to_polygon(labels[found] == instance, rows.start, cols.start))
    return np.asarray(polygons + [None], dtype=object)[:-1]


def _pair_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, IoU) for every intersecting pair of ``a[i]`` and ``b[j]``."""
    if len(a) == 0 or len(b) == 0:
        return np.empty(0, np.intp), np.empty(0, np.intp), np.empty(0)
    i, j = shapely.STRtree(b).query(a, predicate="intersects")
    inter = shapely.area(shapely.intersection(a[i], b[j]))
    union = shapely.area(a[i]) + shapely.area(b[j]) - inter
    return i, j, np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def true_positives(predicted: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> int:
    """One-to-one matches of outputs to true objects at IoU ≥ ``threshold``, best IoU first (two
    overlapping outputs can both pass 0.5 on one object; only one of them counts)."""
    i, j, iou = _pair_iou(predicted, truth)
    keep = iou >= threshold
    i, j, iou = i[keep], j[keep], iou[keep]
    used_output, used_truth = set(), set()
    for k in np.argsort(-iou, kind="stable"):
        a, b = int(i[k]), int(j[k])
        if a not in used_output and b not in used_truth:
            used_output.add(a)
            used_truth.add(b)
    return len(used_output)


def match_f1(predicted: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> float:
    """``tests.helpers.match_f1``: F1 of one-to-one matches at IoU ≥ ``threshold`` (≥ 0.5)."""
    return 2 * true_positives(predicted, truth, threshold) / max(len(predicted) + len(truth), 1)


def seam_errors(predicted: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """``tests.helpers.seam_errors``: (output pairs with IoU > 0.3, true objects that two
    outputs each lying at least half on it cover)."""
    duplicates, split = _errors(predicted, truth)
    return len(duplicates), len(split)


def _errors(predicted: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((k, 2) duplicate output pairs, indices of split true objects)."""
    i, j, iou = _pair_iou(predicted, predicted)
    duplicates = np.stack([i, j], 1)[(i < j) & (iou > 0.3)]
    split = np.empty(0, np.intp)
    if len(predicted) and len(truth):
        i, j = shapely.STRtree(truth).query(predicted, predicate="intersects")
        inter = shapely.area(shapely.intersection(predicted[i], truth[j]))
        covers = inter >= 0.5 * shapely.area(predicted[i])
        split = np.flatnonzero(np.bincount(j[covers], minlength=len(truth)) >= 2)
    return duplicates, split


def seam_zone(windows: list) -> shapely.Geometry:
    """The pixels that two or more windows (x0, y0, x1, y1) read."""
    boxes = shapely.box(*np.asarray(windows, float).reshape(-1, 4).T)
    i, j = shapely.STRtree(boxes).query(boxes, predicate="intersects")
    keep = i < j
    return shapely.union_all(shapely.intersection(boxes[i[keep]], boxes[j[keep]]))


def located_errors(predicted: np.ndarray, truth: np.ndarray, windows: list, one_window=None) -> dict[str, int]:
    """``seam_errors`` split by place: at a seam (a duplicate of which either output, or a split
    object, meets the pixels two of the tool's windows read) or inside one window (the model's own
    overlapping or over-segmented outputs, which no merge across seams can cause).

    With ``one_window`` (a window (x0, y0, x1, y1) → the model's polygons on it alone, in image
    pixels), an error at a seam is also checked against the model's output on the window that holds
    it most centrally: ``*_seam_model`` counts those the model makes there too (an object it splits
    seen whole, away from any edge), which are not the merge's doing."""
    duplicates, split = _errors(predicted, truth)
    zone = seam_zone(windows)
    shapely.prepare(zone)
    at_seam = shapely.intersects(zone, predicted[duplicates[:, 0]]) | shapely.intersects(zone, predicted[duplicates[:, 1]])
    split_at_seam = shapely.intersects(zone, truth[split])
    counts = {
        "duplicates_seam": int(at_seam.sum()), "duplicates_interior": int((~at_seam).sum()),
        "splits_seam": int(split_at_seam.sum()), "splits_interior": int((~split_at_seam).sum()),
    }
    if one_window is not None:
        cache: dict[tuple, np.ndarray] = {}

        def model_output(region: shapely.Geometry) -> np.ndarray | None:
            window = _central_window(shapely.bounds(region), windows)
            if window is None:
                return None
            if window not in cache:
                cache[window] = one_window(window)
            found = cache[window]
            found = found[shapely.intersects(found, region)]
            return found[shapely.area(shapely.intersection(found, region)) >= 0.5 * shapely.area(found)]  # half on it

        model_duplicates = model_splits = 0
        for a, b in duplicates[at_seam]:
            found = model_output(shapely.union(predicted[a], predicted[b]))
            model_duplicates += int(found is not None and len(_errors(found, truth[:0])[0]) > 0)  # no truth: pairs only
        for s in split[split_at_seam]:
            found = model_output(truth[s])
            model_splits += int(found is not None and len(found) >= 2)
        counts.update(duplicates_seam_model=model_duplicates, splits_seam_model=model_splits)
    return counts


def _central_window(bounds: np.ndarray, windows: list) -> tuple | None:
    """The window (x0, y0, x1, y1) holding ``bounds`` with the widest margin, if any holds it."""
    w = np.asarray(windows, float).reshape(-1, 4)
    margin = np.min(np.stack([bounds[0] - w[:, 0], bounds[1] - w[:, 1], w[:, 2] - bounds[2], w[:, 3] - bounds[3]]), axis=0)
    best = int(np.argmax(margin))
    return tuple(int(v) for v in w[best]) if margin[best] >= 0 else None


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (the scripts print it; BENCHMARKS.md quotes it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
