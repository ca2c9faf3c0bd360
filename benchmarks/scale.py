"""Scale: time and peak memory against image size, end to end with ``seamline run``.

For each ``--sizes`` side, a generated scene (``pipeline.synthetic_raster.write_tiled_scene``: one
5000² block of objects repeated across a tiled, deflate-compressed, georeferenced GeoTIFF, so every
size has the same content per tile and none needs the image in memory) is segmented by the
real command line — ``seamline run SCENE --model synthetic-shapes`` on its default LocalCluster of
one worker process × 2 threads — in a fresh process tree per size, with the shipped model (no
stand-in detector: inference is real). The parent samples the RSS of the ``seamline`` process
(client + scheduler), of the worker process and of its side process (labels.zarr and GeoPackage
writes) every 50 ms. Sizes are run in the order given, ``--repeats`` times interleaved; medians
are reported.

Expected: time = fixed start-up + a constant cost per tile (a line through the points), and peak
memory flat: a worker holds one batch of tiles, the model and the polygons, never the image.

    python benchmarks/scale.py                          # 5000², 20000², 50000² (~25 min on 2 cores)
    python benchmarks/scale.py --sizes 2048 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from common import fmt_bytes, machine, run_measured, table
from models.card import load_card
from models.registry import resolve_model_dir
from pipeline.grid import TileGrid
from pipeline.synthetic_raster import write_tiled_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    parser.add_argument("--model", default="synthetic-shapes")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    card = load_card(resolve_model_dir(args.model))
    seamline = Path(sys.executable).with_name("seamline")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scenes = {}
        for size in args.sizes:
            start = time.perf_counter()
            scenes[size] = write_tiled_scene(tmp / f"scene-{size}.tif", seed=5, side=size)
            print(f"generated {size}² scene ({scenes[size]:,} objects, {(tmp / f'scene-{size}.tif').stat().st_size / 2**20:.0f} MiB "
                  f"GeoTIFF) in {time.perf_counter() - start:.0f} s", flush=True)
        runs: dict[int, list[dict]] = {size: [] for size in args.sizes}
        for repeat in range(args.repeats):
            for size in args.sizes:
                out = tmp / f"out-{size}-{repeat}"
                command = [str(seamline), "run", str(tmp / f"scene-{size}.tif"), "--model", args.model, "--out", str(out),
                           "--workers", str(args.workers), "--no-progress"]
                measured = run_measured(command, want_json=False)
                measured["summary"] = next(iter(json.loads((out / "run.json").read_text())["done"].values()))
                runs[size].append(measured)
                print(f"{size}²: {measured['seconds']:.1f} s", flush=True)

    rows, tiles_list, seconds_list = [], [], []
    for size in args.sizes:
        tiles = len(TileGrid(size, size, card.tile_size, card.overlap))
        seconds = float(np.median([m["seconds"] for m in runs[size]]))
        worker = float(np.median([m["roles"].get("worker", 0) for m in runs[size]]))
        side = float(np.median([m["roles"].get("side", 0) for m in runs[size]]))
        client = float(np.median([m["roles"].get("client", 0) for m in runs[size]]))
        tree = float(np.median([m["tree_peak"] for m in runs[size]]))
        summary = runs[size][-1]["summary"]
        tiles_list.append(tiles)
        seconds_list.append(seconds)
        rows.append([f"{size:,}²", f"{size * size / 1e6:.1f}", tiles, f"{summary['instances']:,} ({scenes[size]:,} true)",
                     f"{seconds:.1f}", f"{seconds / tiles:.3f}", fmt_bytes(worker), fmt_bytes(side), fmt_bytes(client), fmt_bytes(tree)])
    print(f"\nmodel {card.name}, {card.tile_size}² tiles (overlap ≥ {card.overlap}), batch 4, `seamline run` "
          f"(LocalCluster, {args.workers} worker × 2 threads), {args.repeats} run(s) per size")
    print(table(["image", "Mpx", "tiles", "instances", "wall s", "wall s/tile", "worker peak RSS", "side process peak RSS",
                 "client peak RSS", "tree peak RSS"], rows))
    if len(args.sizes) >= 2:
        slope, intercept = np.polyfit(tiles_list, seconds_list, 1)
        fitted = np.polyval([slope, intercept], tiles_list)
        worst = float(np.max(np.abs(fitted - seconds_list) / np.asarray(seconds_list)))
        print(f"least-squares line: wall s = {intercept:.1f} + {slope:.3f} × tiles (largest deviation {worst:.0%})")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    main()
