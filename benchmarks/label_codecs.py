"""labels.zarr codecs: write time, read time and size of the instance and class rasters.

The rasters are generated scenes' ground truth, ids renumbered in Seamline's order (row, then
column of the box centre), as ``seamline run`` would store them:

- shapes: ``models.synthetic.make_scene`` defaults (objects 10–150 px, about one per 110² px);
- nuclei: dense small objects (10–24 px), so many more ids.

Written as ``pipeline.label_store`` writes level 0 (512² chunks, all-background chunks not stored,
blocks of 4 × 4 chunks from one thread per core), then read back whole and as 64 random 512²
windows. Repeats are interleaved; medians are reported.

    python benchmarks/label_codecs.py [--size 8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
from scipy import ndimage
from zarr.codecs import BloscCodec

from common import machine, table
from models.synthetic import make_scene
from pipeline.label_store import COMPRESSORS, CONFIG, label_blocks

CODECS = {
    "blosc zstd 5, byte shuffle": BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),
    "blosc zstd 3, bit shuffle": BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
    "blosc zstd 1, byte shuffle": BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
    "blosc zstd 1, bit shuffle": BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),
    "blosc lz4 5, bit shuffle": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
}
CHUNK, PER_TASK = 512, 4


def in_seamline_order(labels: np.ndarray) -> np.ndarray:
    """``labels`` with ids 1..n renumbered by box centre (row, then column), as ``assign_order`` numbers instances."""
    boxes = ndimage.find_objects(labels)
    present = [i for i, box in enumerate(boxes) if box is not None]
    centres = np.array([[(boxes[i][0].start + boxes[i][0].stop) / 2, (boxes[i][1].start + boxes[i][1].stop) / 2] for i in present])
    order = np.lexsort((centres[:, 1], centres[:, 0]))
    new_id = np.zeros(len(boxes) + 1, np.uint32)
    new_id[np.asarray(present)[order] + 1] = np.arange(1, len(present) + 1)
    return new_id[labels]


def write(path: Path, raster: np.ndarray, codec, threads: int) -> float:
    array = zarr.create_array(path, shape=raster.shape, chunks=(CHUNK, CHUNK), dtype=raster.dtype, fill_value=0,
                              compressors=codec, config=CONFIG)
    windows = [(slice(rows.start, rows.stop), slice(cols.start, cols.stop)) for rows, cols in label_blocks(*raster.shape, CHUNK, PER_TASK)]
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda window: array.__setitem__(window, raster[window]), windows))
    return time.perf_counter() - start


def read(path: Path, windows: np.ndarray) -> tuple[float, float]:
    array = zarr.open_array(path, mode="r")
    start = time.perf_counter()
    array[:]
    whole = time.perf_counter() - start
    start = time.perf_counter()
    for r, c in windows:
        array[r : r + CHUNK, c : c + CHUNK]
    return whole, (time.perf_counter() - start) / len(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    codecs = {f"{name}{' (shipped)' if codec.to_dict() == COMPRESSORS.to_dict() else ''}": codec for name, codec in CODECS.items()}
    assert any(name.endswith("(shipped)") for name in codecs), "the shipped codec must be among those compared"
    scenes = {
        "shapes": make_scene(1, args.size, args.size),
        "nuclei": make_scene(2, args.size, args.size, density=30, size_range=(10, 24), gap=1),
    }
    rng = np.random.default_rng(0)
    windows = rng.integers(0, args.size - CHUNK, size=(64, 2))
    for scene_name, scene in scenes.items():
        labels = in_seamline_order(scene.labels)
        rasters = {"labels": labels, "classes": np.concatenate([[0], scene.classes + 1]).astype(np.uint8)[scene.labels]}
        results: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name in codecs}
        with tempfile.TemporaryDirectory() as tmp:
            for repeat in range(args.repeats):
                for k, (name, codec) in enumerate(codecs.items()):
                    written = whole = window = size = 0.0
                    for raster_name, raster in rasters.items():
                        path = Path(tmp) / f"{repeat}-{k}-{raster_name}"
                        written += write(path, raster, codec, threads)
                        w, r = read(path, windows)
                        whole, window = whole + w, window + r
                        size += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                    results[name].append((written, whole, window, size))
        print(f"\n{scene_name}: {args.size}² pixels, {scene.count:,} instances, {np.count_nonzero(labels) / labels.size:.0%} "
              f"of pixels labelled; labels (uint32) + classes (uint8); {args.repeats} interleaved repeats, medians")
        reference = np.median(results[next(iter(codecs))], axis=0)
        rows = []
        for name, runs in results.items():
            written, whole, window, size = np.median(runs, axis=0)
            rows.append([name, f"{written:.2f}", f"{written / reference[0]:.2f}", f"{whole:.2f}", f"{window * 1000:.1f}",
                         f"{size / 1e6:.2f}", f"{size / reference[3]:.2f}"])
        print(table(["codec", "write s", "÷ first", "read whole s", "read 512² window ms", "stored MB", "÷ first"], rows))
    print(f"machine: {machine()}; {threads} writer threads")


if __name__ == "__main__":
    main()
