"""Model-only time per tile against batch size: ``models.inference.Segmenter`` (as ``seamline run``
calls it: autocast on CUDA) on tiles of a generated scene preloaded in memory. On a GPU a batch is
one forward pass, so larger batches fill the chip; on the CPU tiles run one by one whatever the batch.

    python benchmarks/batch_sweep.py --device cuda [--model synthetic-shapes] [--batch-sizes 1 4 8 16 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine, table
from models.inference import Segmenter
from models.registry import resolve_model_dir
from pipeline.grid import TileGrid
from pipeline.sources import open_raster, read_window
from pipeline.synthetic_raster import write_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--size", type=int, default=4096, help="side of the generated scene whose tiles are timed")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=5, help="passes over all tiles per batch size; the median is reported")
    args = parser.parse_args()

    segmenter = Segmenter(resolve_model_dir(args.model), args.device)
    card = segmenter.card
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scene.tif"
        write_scene(path, seed=1, height=args.size, width=args.size)
        source = open_raster(path)
        grid = TileGrid(source.height, source.width, card.tile_size, card.overlap)
        pixels = np.stack([read_window(source, t.rows, t.cols)[0] for t in grid.tiles])
    cuda = segmenter.device.type == "cuda"
    rows = []
    for batch in args.batch_sizes:
        segmenter(pixels[:batch])  # warm-up: kernels, allocator, autotuning for this shape
        times, found = [], 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            found = sum(len(t) for b in range(0, len(pixels), batch) for t in segmenter(pixels[b : b + batch]))
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / len(pixels))
        median = float(np.median(times))
        rows.append([batch, f"{1000 * median:.2f}", ", ".join(f"{1000 * t:.2f}" for t in times), f"{1 / median:.0f}", found])
    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"machine: {machine()}; device {device}; torch {torch.__version__}")
    print(f"model {card.name} ({card.architecture}), {len(pixels)} tiles of {card.tile_size}² from a {args.size}² generated "
          f"scene, {args.repeats} passes per batch size")
    print(table(["batch", "ms/tile (median)", "passes", "tiles/s", "detections"], rows))


if __name__ == "__main__":
    main()
