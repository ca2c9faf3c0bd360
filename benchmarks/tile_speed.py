"""Per-tile model speed and pipeline efficiency, on this machine's CPU or GPU.

Measured in one run, interleaved (each repeat runs every variant once, so drifts in machine speed
hit all alike), medians reported:

- model only: ``models.inference.Segmenter`` on tiles preloaded in memory, same batch size (the
  ceiling): one call at a time with torch using all cores or one thread, and as many calls side by
  side as there are cores, one torch thread each (how a CPU worker with several threads runs);
- end to end, synchronous scheduler: the image's Dask graph (read, segment, merge, write the
  GeoPackage; no labels.zarr) run in this process with ``scheduler="sync"``, with all cores and with
  one torch thread;
- end to end, LocalCluster: ``workflows.run.run_images`` (what ``seamline run`` calls) on a
  ``LocalCluster`` of one worker process with a thread per core, as ``seamline run`` starts it
  (Dask's ``MALLOC_TRIM_THRESHOLD_`` unset, as ``workflows.cluster.connect`` does). Dask starts
  workers with ``OMP_NUM_THREADS=1``, so each worker thread runs its own inference on one core;
  and one worker process per core, one thread each (``seamline run --workers N``). With
  ``--variants`` the 1-worker cluster also runs with Dask's default ``MALLOC_TRIM_THRESHOLD_=65536``
  (glibc then returns, and torch re-faults, every large freed block), without labels.zarr
  (``--no-zarr``), with labels.zarr written in the merge's thread (a daemonic worker, Dask's default,
  may not start the side process that writes it) and with Dask's sampling profiler on (Dask's
  default, off in ``seamline run``: it walks every busy thread's stack every 10 ms, holding the
  GIL). ``--headline`` runs the model-only ceiling (one call per core on the CPU; one call at a time on
  a GPU, which the segmenter's lock serialises), the three labels.zarr settings and the profiler on.

Efficiency = model-only time / end-to-end time with the same layout (calls side by side × torch
threads each), on the same tiles of a generated GeoTIFF scene. With ``--images N``, N scenes (seeds
1…N) go through one run, as an archive does: each image's merge and writes then overlap the next
image's tiles, and only the last image's tail follows its last tile. With ``--image`` the tiles are
those of real images instead (read as ``seamline run`` reads them, at their own resolution), and
``--mosaic K`` first lays them side by side, K × K, as one large image: a real model's throughput
on its own kind of data, where the demo model on generated scenes shows the pipeline's overhead at
its largest (its model takes ~60 ms per tile).
Each cluster is started and warmed up (model loaded in every worker) before its timed run and
closed after it, so no idle cluster shares the CPU with the other runs.

    python benchmarks/tile_speed.py [--model synthetic-shapes] [--size 2048] [--batch-size 4] [--repeats 3]
    python benchmarks/tile_speed.py --size 8192 --headline    # only the efficiency of `seamline run`: labels.zarr in its side process, in the merge's thread, none
    python benchmarks/tile_speed.py --size 4096 --images 4 --headline    # the same over four images in one run
    python benchmarks/tile_speed.py --model nuclei-he --no-flips --image ../shared/data/nuclei-monuseg2018/images/*.tif --mosaic 4 --headline
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import dask
import numpy as np
import torch
from rasterio.transform import Affine

from common import fresh_cluster_run, machine, table
from models.card import load_card
from models.inference import Segmenter
from models.registry import resolve_model_dir
from pipeline.graph import Tiling, image_graph
from pipeline.grid import Span, TileGrid
from pipeline.sources import open_raster, read_window
from pipeline.synthetic_raster import write_geotiff, write_scene


def write_mosaic(images: list[Path], side: int, path: Path) -> None:
    """``images`` (cycled) laid ``side`` × ``side`` as one untagged TIFF at ``path``, each cut to the
    smallest width and height among them: a large image made of real ones."""
    pixels = []
    for image in images[: side * side]:
        source = open_raster(image)
        pixels.append(read_window(source, Span(0, source.height), Span(0, source.width))[0])
    height, width = min(p.shape[0] for p in pixels), min(p.shape[1] for p in pixels)
    cells = [pixels[k % len(pixels)][:height, :width] for k in range(side * side)]
    rows = [np.concatenate(cells[r * side : (r + 1) * side], axis=1) for r in range(side)]
    write_geotiff(np.concatenate(rows), path, crs=None, transform=Affine.identity())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--images", type=int, default=1, help="scenes of --size in one run (an archive)")
    parser.add_argument("--image", type=Path, nargs="+", help="real images instead of generated scenes")
    parser.add_argument("--mosaic", type=int, help="with --image: lay them K × K as one image")
    parser.add_argument("--no-flips", action="store_true", help="flip test-time augmentation off (seamline run --no-flips)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    parser.add_argument("--variants", action="store_true",
                        help="also clusters with Dask's MALLOC_TRIM_THRESHOLD_=65536, without labels.zarr, with labels.zarr in "
                             "the merge's thread and with Dask's profiler on")
    parser.add_argument("--no-cluster", action="store_true", help="model only and synchronous scheduler only")
    parser.add_argument("--headline", action="store_true",
                        help="only the headline runs: model only, one call per core side by side, against seamline run's "
                             "cluster with and without labels.zarr and with Dask's profiler on")
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model)
    card = load_card(model_dir)
    flips = False if args.no_flips else None  # None: as the card says
    segmenter = Segmenter(model_dir, args.device, flips)
    tiling = Tiling(card.tile_size, card.overlap, args.batch_size, test_time_flips=flips)
    with tempfile.TemporaryDirectory() as tmp:
        if args.image and args.mosaic:
            paths = [Path(tmp) / "mosaic.tif"]
            write_mosaic(args.image, args.mosaic, paths[0])
        elif args.image:
            paths = args.image
        else:
            paths = [Path(tmp) / f"scene-{seed}.tif" for seed in range(1, args.images + 1)]
            for seed, path in enumerate(paths, start=1):
                write_scene(path, seed=seed, height=args.size, width=args.size)
        sources = [open_raster(path) for path in paths]
        tiles = [(source, t) for source in sources for t in TileGrid(source.height, source.width, card.tile_size, card.overlap).tiles]
        pixels = np.stack([read_window(source, t.rows, t.cols)[0] for source, t in tiles])
        for warm_up in range(3):
            segmenter(pixels[warm_up * args.batch_size : (warm_up + 1) * args.batch_size])

        batches = [pixels[b : b + args.batch_size] for b in range(0, len(pixels), args.batch_size)]

        def timed(run) -> tuple[int, float, None]:
            start = time.perf_counter()
            found = run()
            if segmenter.device.type == "cuda":
                torch.cuda.synchronize()
            return found, time.perf_counter() - start, None

        def model_only(out: Path, side_by_side: int = 1) -> tuple[int, float, None]:
            def run() -> int:
                with ThreadPoolExecutor(side_by_side) as pool:
                    return sum(len(r) for tiles_found in pool.map(segmenter, batches) for r in tiles_found)
            return timed(run)

        def synchronous(out: Path) -> tuple[int, float, None]:
            graphs = [image_graph(source, str(model_dir), card.classes, out / str(k), tiling) for k, source in enumerate(sources)]
            return timed(lambda: sum(s["instances"] for s in dask.compute(*[g.result for g in graphs], scheduler="sync")))

        def on_cluster(out: Path, workers: int, threads: int, env, config, labels: bool) -> tuple[int, float, float]:
            instances, seconds, torch_threads, tail = fresh_cluster_run(workers, threads, paths, model_dir, out, tiling, labels, env, config)
            assert torch_threads == cluster_threads, "the efficiency column assumes this layout"
            return instances, seconds, tail

        cores = os.cpu_count() or 1
        cluster_threads = 1  # Dask starts workers with OMP_NUM_THREADS=1
        runs: dict[str, tuple[tuple[int, int], object]] = {  # name: ((calls side by side, torch threads), run)
            f"model only, 1 call × {cores} torch threads": ((1, cores), model_only),
            "model only, 1 call × 1 torch thread": ((1, 1), model_only),
            f"model only, {cores} calls side by side × 1 torch thread": ((cores, 1), partial(model_only, side_by_side=cores)),
            f"end to end, sync scheduler, {cores} torch threads": ((1, cores), synchronous),
            "end to end, sync scheduler, 1 torch thread": ((1, 1), synchronous),
        }
        gpu = segmenter.device.type == "cuda"
        if args.headline:  # the ceiling of seamline run's layout: one call per core on the CPU, one at a time on a GPU (its lock)
            ceiling = "model only, 1 call × 1 torch thread" if gpu else f"model only, {cores} calls side by side × 1 torch thread"
            runs = {ceiling: runs[ceiling]}
        if not args.no_cluster:
            one = f"end to end, LocalCluster 1 worker × {cores} threads"
            clusters = {  # name: (workers, threads each, worker env, Dask config, labels.zarr)
                f"{one} (seamline run)": (1, cores, None, None, True),
            }
            if args.headline or args.variants:
                clusters[f"{one}, no labels.zarr (seamline run --no-zarr)"] = (1, cores, None, None, False)
                clusters[f"{one}, labels.zarr in the merge's thread (daemonic worker: no side process)"] = (
                    1, cores, None, {"distributed.worker.daemon": True}, True)
                clusters[f"{one}, Dask's profiler on (Dask's default)"] = (1, cores, None, {"distributed.worker.profile.enabled": True}, True)
            if not args.headline:
                clusters[f"end to end, LocalCluster {cores} workers × 1 thread (seamline run --workers {cores})"] = (cores, 1, None, None, True)
            if args.variants:
                clusters[f"{one}, Dask's MALLOC_TRIM_THRESHOLD_=65536"] = (1, cores, {}, None, True)
            for name, (workers, threads, *setup) in clusters.items():
                side_by_side = workers if gpu else workers * threads
                runs[name] = ((side_by_side, cluster_threads), partial(on_cluster, workers=workers, threads=threads,
                                                                       env=setup[0], config=setup[1], labels=setup[2]))
        times: dict[str, list[float]] = {name: [] for name in runs}
        found: dict[str, int] = {}
        after_last_tile: dict[str, list[float]] = {name: [] for name in runs}  # cluster runs: share of their time
        for repeat in range(args.repeats):
            for k, (name, ((_, threads), run)) in enumerate(runs.items()):
                torch.set_num_threads(threads)  # this process's runs; a cluster's worker has its own
                found[name], seconds, tail = run(Path(tmp) / f"out-{repeat}-{k}")
                times[name].append(seconds / len(tiles))
                if tail is not None:
                    after_last_tile[name].append(tail / seconds)

    device = torch.cuda.get_device_name() if segmenter.device.type == "cuda" else "CPU"
    print(f"machine: {machine()}; device {device}")
    images = ", ".join(f"{Path(s.path).name} {s.width}x{s.height}" for s in sources[:3]) + (" …" if len(sources) > 3 else "")
    print(f"model {card.name} ({card.architecture}, flips {'on' if segmenter.flips else 'off'}); {len(sources)} image(s): {images}; "
          f"{len(tiles)} tiles of {card.tile_size}² (overlap ≥ {card.overlap}), batch {args.batch_size}, {args.repeats} interleaved repeats")
    ceiling = {layout: float(np.median(times[name])) for name, (layout, _) in runs.items() if name.startswith("model only")}
    rows = []
    for name, runs_s in times.items():
        median = float(np.median(runs_s))
        layout = runs[name][0]
        what = "detections" if name.startswith("model only") else "instances"
        efficiency = f"{ceiling[layout] / median:.2f}" if layout in ceiling else "–"
        tail = f"{np.median(after_last_tile[name]):.0%}" if after_last_tile[name] else "–"
        rows.append([name, f"{layout[0]} × {layout[1]}", f"{median:.3f}", ", ".join(f"{t:.3f}" for t in runs_s),
                     f"{1 / median:.2f}", efficiency, tail, f"{found[name]} {what}"])
    print(table(["run", "calls × torch threads", "s/tile (median)", "runs", "tiles/s", "efficiency", "after last tile",
                 "found"], rows))
    print("efficiency = model-only s/tile with the same calls side by side × torch threads ÷ that run's s/tile "
          "(same tiles, same batch size); after last tile = share of the run's time after its last segment task "
          "ended (merge, labels.zarr, GeoPackage)")


if __name__ == "__main__":
    main()
