"""The heads' RoIAlign sampling (the card's ``roi_sampling_ratio``): the shipped nuclei models with one
sample per bin side against torchvision's 2 × 2, model only (``models.inference.Segmenter``, one torch
thread) on the same real tiles, interleaved, medians. Accuracy of both settings: the cards'
``seamline evaluate`` commands (MODEL_CARD.md), on the training and the held-out images.

    python benchmarks/roi_sampling.py [--models nuclei-he nuclei-fluo] [--images 6] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from common import ROOT, machine, table
from models.card import load_card, save_variant
from models.inference import Segmenter
from models.registry import resolve_model_dir
from pipeline.grid import TileGrid
from pipeline.inputs import open_for_model
from pipeline.sources import read_window

DATA = {"nuclei-he": "nuclei-monuseg2018", "nuclei-fluo": "nuclei-bbbc039"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DATA))
    parser.add_argument("--images", type=int, default=6, help="images per model, four tiles each")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model_dir = resolve_model_dir(name)
            card = load_card(model_dir)
            variants = {ratio: Path(tmp) / f"{name}-{ratio}" for ratio in (2, 1)}
            for ratio, folder in variants.items():
                save_variant(model_dir, folder, roi_sampling_ratio=ratio)
            settings = {ratio: Segmenter(folder, "cpu") for ratio, folder in variants.items()}
            tiles = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # images without a pixel size, read at the model's
                for path in sorted((ROOT.parent / "shared" / "data" / DATA[name] / "images").glob("*.tif"))[: args.images]:
                    source = open_for_model(path, card)
                    tiles += [read_window(source, t.rows, t.cols)[0]
                              for t in TileGrid(source.height, source.width, card.tile_size, card.overlap).tiles[:4]]
            tiles = np.stack(tiles)
            times: dict[int, list[float]] = {ratio: [] for ratio in settings}
            for repeat in range(args.repeats):
                for ratio in settings if repeat % 2 == 0 else list(settings)[::-1]:
                    start = time.perf_counter()
                    settings[ratio](tiles)
                    times[ratio].append((time.perf_counter() - start) / len(tiles))
            median = {ratio: float(np.median(t)) for ratio, t in times.items()}
            for ratio in settings:
                rows.append([name, f"{len(tiles)} of {card.tile_size}²", f"{ratio} × {ratio}" + (" (card)" if ratio == card.roi_sampling_ratio else ""),
                             f"{median[ratio]:.4f}", ", ".join(f"{t:.4f}" for t in times[ratio]), f"{median[2] / median[ratio]:.2f}×"])
    print(f"machine: {machine()}; one torch thread, {args.repeats} interleaved repeats, medians")
    print(table(["model", "tiles", "RoIAlign samples per bin", "s/tile", "repeats", "speed-up"], rows))


if __name__ == "__main__":
    main()
