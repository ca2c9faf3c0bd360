"""Per-tile model speed and pipeline efficiency of a model, on this machine's CPU or GPU.

Prints, measured in one run: model-only seconds per tile on preloaded tiles (the ceiling), and
end-to-end seconds per tile for the whole pipeline (synchronous scheduler) (read, segment, merge, write) on a generated
GeoTIFF scene with the same tiles and batch size; efficiency = model-only / end-to-end time.

    python benchmarks/tile_speed.py [--model synthetic-shapes] [--size 2048] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
import torch

from models.card import load_card
from models.inference import Segmenter
from models.registry import resolve_model_dir
from pipeline.graph import Tiling, image_graph
from pipeline.grid import TileGrid
from pipeline.sources import open_raster, read_window
from pipeline.synthetic_raster import write_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model)
    card = load_card(model_dir)
    segmenter = Segmenter(model_dir, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scene.tif"
        write_scene(path, seed=1, height=args.size, width=args.size)
        source = open_raster(path)
        tiles = TileGrid(args.size, args.size, card.tile_size, card.overlap).tiles
        pixels = np.stack([read_window(source, t.rows, t.cols)[0] for t in tiles])
        for warm_up in range(3):
            segmenter(pixels[warm_up * args.batch_size : (warm_up + 1) * args.batch_size])
        graph_tiling = Tiling(card.tile_size, card.overlap, args.batch_size)
        model_times, pipeline_times = [], []
        for repeat in range(args.repeats):  # interleaved, so drifts in machine speed hit both alike
            start = time.perf_counter()
            found = sum(len(r) for b in range(0, len(pixels), args.batch_size) for r in segmenter(pixels[b : b + args.batch_size]))
            if segmenter.device.type == "cuda":
                torch.cuda.synchronize()
            model_times.append((time.perf_counter() - start) / len(tiles))
            graph = image_graph(source, str(model_dir), card.classes, Path(tmp) / f"out{repeat}", graph_tiling)
            start = time.perf_counter()
            (summary,) = dask.compute(graph.result, scheduler="sync")
            pipeline_times.append((time.perf_counter() - start) / len(tiles))
        model_only, end_to_end = float(np.median(model_times)), float(np.median(pipeline_times))

    device = torch.cuda.get_device_name() if segmenter.device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    print(f"model {card.name} ({card.architecture}), device {device}, torch threads {torch.get_num_threads()}")
    print(f"scene {args.size}x{args.size}: {len(tiles)} tiles of {card.tile_size}² (overlap >= {card.overlap}), batch {args.batch_size}")
    print(f"model only : runs {', '.join(f'{t:.3f}' for t in model_times)} s/tile")
    print(f"end to end : runs {', '.join(f'{t:.3f}' for t in pipeline_times)} s/tile")
    print(f"model only : {model_only:.3f} s/tile  ({1 / model_only:.1f} tiles/s, {found} detections)")
    print(f"end to end : {end_to_end:.3f} s/tile  ({1 / end_to_end:.1f} tiles/s, {summary['instances']} instances after merge)")
    print(f"efficiency : {model_only / end_to_end:.2f}  (model-only time / end-to-end time)")


if __name__ == "__main__":
    main()
