"""labels.zarr codecs and layout: write time, read time and size of the instance and class rasters.

The rasters are generated scenes' ground truth, ids renumbered in Seamline's order (row, then
column of the box centre), as ``seamline run`` would store them:

- shapes: ``models.synthetic.make_scene`` defaults (objects 10–150 px, about one per 110² px);
- nuclei: dense small objects (10–24 px), so many more ids.

Written as ``pipeline.label_store`` writes level 0 (512² chunks, blocks of 4 × 4 chunks from one
thread per core; unsharded, all-background chunks not stored; sharded, a shard per block), then read
back whole and as 64 random 512² windows. Write CPU is the process's, all threads. Repeats are
interleaved; medians are reported.

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
from pipeline.label_store import COMPRESSORS, label_blocks

CODECS = {  # name: (codec, a shard per block of PER_TASK × PER_TASK chunks)
    "blosc zstd 5, byte shuffle (until the eighth session)": (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), False),
    "blosc zstd 5, no shuffle": (BloscCodec(cname="zstd", clevel=5, shuffle="noshuffle"), False),
    "blosc zstd 3, no shuffle": (BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle"), False),
    "blosc zstd 3, no shuffle, a shard per block": (BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle"), True),
    "blosc zstd 1, no shuffle": (BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle"), False),
    "blosc zstd 3, bit shuffle": (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), False),
    "blosc zstd 1, byte shuffle": (BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), False),
    "blosc lz4 5, bit shuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), False),
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


def write(path: Path, raster: np.ndarray, codec, sharded: bool, threads: int) -> tuple[float, float]:
    """(wall s, CPU s of the process) to write ``raster`` a block at a time from ``threads`` threads.
    Sharded, each block is one shard, written whole with its background chunks (as ``label_store``
    writes it); unsharded, all-background chunks are left out."""
    block = CHUNK * PER_TASK
    array = zarr.create_array(path, shape=raster.shape, chunks=(CHUNK, CHUNK), shards=(block, block) if sharded else None,
                              dtype=raster.dtype, fill_value=0, compressors=codec, config={"write_empty_chunks": sharded})
    windows = [(slice(rows.start, rows.stop), slice(cols.start, cols.stop)) for rows, cols in label_blocks(*raster.shape, CHUNK, PER_TASK)]
    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda window: array.__setitem__(window, raster[window]), windows))
    return time.perf_counter() - start, time.process_time() - cpu


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
    codecs = {f"{name}{' (shipped)' if codec.to_dict() == COMPRESSORS.to_dict() and sharded else ''}": (codec, sharded)
              for name, (codec, sharded) in CODECS.items()}
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
        results: dict[str, list[tuple[float, ...]]] = {name: [] for name in codecs}
        with tempfile.TemporaryDirectory() as tmp:
            for repeat in range(args.repeats):
                for k, (name, (codec, sharded)) in enumerate(codecs.items()):
                    written = cpu = whole = window = size = files = 0.0
                    for raster_name, raster in rasters.items():
                        path = Path(tmp) / f"{repeat}-{k}-{raster_name}"
                        seconds, cpu_seconds = write(path, raster, codec, sharded, threads)
                        written, cpu = written + seconds, cpu + cpu_seconds
                        w, r = read(path, windows)
                        whole, window = whole + w, window + r
                        stored = [f for f in path.rglob("*") if f.is_file()]
                        size, files = size + sum(f.stat().st_size for f in stored), files + len(stored)
                    results[name].append((written, cpu, whole, window, size, files))
        print(f"\n{scene_name}: {args.size}² pixels, {scene.count:,} instances, {np.count_nonzero(labels) / labels.size:.0%} "
              f"of pixels labelled; labels (uint32) + classes (uint8); {args.repeats} interleaved repeats, medians")
        reference = np.median(results[next(iter(codecs))], axis=0)
        rows = []
        for name, runs in results.items():
            written, cpu, whole, window, size, files = np.median(runs, axis=0)
            rows.append([name, f"{written:.2f}", f"{cpu:.2f}", f"{cpu / reference[1]:.2f}", f"{whole:.2f}", f"{window * 1000:.1f}",
                         f"{size / 1e6:.2f}", f"{size / reference[4]:.2f}", f"{files:.0f}"])
        print(table(["codec", "write s", "write CPU s", "÷ first", "read whole s", "read 512² window ms", "stored MB", "÷ first",
                     "files"], rows))
    print(f"machine: {machine()}; {threads} writer threads")


if __name__ == "__main__":
    main()
