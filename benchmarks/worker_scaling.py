"""Worker scaling: the same image on LocalClusters of 1 and 2 worker processes.

Clusters (each started and warmed up, so every worker has loaded the model, before its timed run,
and closed after it, so no idle cluster shares the CPU; Dask gives each worker
``OMP_NUM_THREADS=MKL_NUM_THREADS=1``, so each worker thread runs its own inference on one torch
thread; malloc trimming off, as ``seamline run`` starts them):

- 1 worker × 1 thread — one core's worth;
- 1 worker × 2 threads — what ``seamline run`` starts by default on 2 cores;
- 2 workers × 1 thread.

Each repeat runs the image once on every layout through ``workflows.run.run_images`` (what
``seamline run`` calls), in alternating order; medians are reported. Speed-up = the 1-worker
time ÷ the 2-worker time. On 2 cores shared with other users, expect < 2.

    python benchmarks/worker_scaling.py [--size 3072] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from common import fresh_cluster_run, machine, table
from models.card import load_card
from models.registry import resolve_model_dir
from pipeline.graph import Tiling
from pipeline.grid import TileGrid
from pipeline.synthetic_raster import write_scene

CONFIGS = {"1 worker × 1 thread": (1, 1), "1 worker × 2 threads (seamline run)": (1, 2), "2 workers × 1 thread": (2, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=3072)
    parser.add_argument("--model", default="synthetic-shapes")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model)
    card = load_card(model_dir)
    tiling = Tiling(card.tile_size, card.overlap, args.batch_size)
    tiles = len(TileGrid(args.size, args.size, card.tile_size, card.overlap))
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = tmp / "scene.tif"
        write_scene(image, seed=3, height=args.size, width=args.size)
        times: dict[str, list[float]] = {name: [] for name in CONFIGS}
        found: dict[str, int] = {}
        for repeat in range(args.repeats):
            order = list(CONFIGS) if repeat % 2 == 0 else list(CONFIGS)[::-1]
            for k, name in enumerate(order):
                found[name], seconds, *_ = fresh_cluster_run(*CONFIGS[name], [image], model_dir, tmp / f"out-{repeat}-{k}", tiling)
                times[name].append(seconds)
    median = {name: float(np.median(t)) for name, t in times.items()}
    one_core = median["1 worker × 1 thread"]
    rows = [[name, f"{median[name]:.1f}", ", ".join(f"{t:.1f}" for t in times[name]), f"{median[name] / tiles:.3f}",
             f"{one_core / median[name]:.2f}", found[name]] for name in CONFIGS]
    print(f"\n{args.size}² generated scene, {tiles} tiles of {card.tile_size}², model {card.name}, batch {args.batch_size}, "
          f"{args.repeats} interleaved repeats")
    print(table(["cluster", "s (median)", "runs", "s/tile", "speed-up vs 1 worker × 1 thread", "instances"], rows))
    two = median["2 workers × 1 thread"]
    print(f"speed-up, 2 workers vs 1 worker: {one_core / two:.2f}× (vs 1 × 1 thread), "
          f"{median['1 worker × 2 threads (seamline run)'] / two:.2f}× (vs 1 × 2 threads, the default)")


if __name__ == "__main__":
    main()
