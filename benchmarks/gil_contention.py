"""How much a labels.zarr stage slows the model running beside it in the same process.

A Dask worker runs the model and the merge chain (which writes labels.zarr) as threads of one
process. torch releases the GIL inside each operator but takes it back between operators, so a
thread that holds the GIL for long stalls inference even with a core free. Measured here: the
model's time per tile on one thread (one torch thread) alone, then with a second thread looping
over one stage of the label path:

- the whole label path: ``label_store.write_label_block`` over the blocks of an 8,192² store;
- rasterising alone (``rasterio.features.rasterize`` of one 2,048² block);
- writing alone (one block, already rasterised, as one zarr shard);
- compressing alone (the block's sixteen 512² chunks with numcodecs' blosc, no zarr);
- the image's final write: its GeoPackage (and counts) from a staged part (``writers.write_outputs``);
- numpy sorting (a C loop that releases the GIL: the control);
- the whole label path again, in the side process the pipeline writes labels.zarr in
  (``pipeline.side_process``: its own GIL), the thread beside the model sending it the polygons
  and waiting, as the merge's thread does.

The polygons are a generated 8,192² scene's ground truth (``models.synthetic.make_scene``,
traced exactly), the tiles a generated scene's. Each row also says how many units the other thread
finished in the same time.

    python benchmarks/gil_contention.py [--tiles 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import zarr
from affine import Affine
from numcodecs import Blosc
from rasterio import features

from common import label_polygons, machine, table
from models.inference import Segmenter
from models.registry import resolve_model_dir
from models.synthetic import make_scene
from pipeline import side_process
from pipeline.detections import Detections
from pipeline.grid import TileGrid
from pipeline.label_store import COMPRESSORS, create_label_store, label_blocks, write_label_block
from pipeline.sources import open_raster, read_window
from pipeline.synthetic_raster import write_scene
from pipeline.writers import write_outputs, write_part

SIZE, BLOCK, CHUNK = 8192, 2048, 512


def scene_detections() -> Detections:
    scene = make_scene(5, SIZE, SIZE)
    geometry = label_polygons(scene.labels)
    n = len(geometry)
    return Detections(
        geometry=geometry, label=scene.classes[:n].astype(np.int16), score=np.ones(n, np.float32),
        tile=np.zeros(n, np.int32), cut=np.zeros(n, bool), owned=np.ones(n, bool),
    )


def write_label_path(detections: Detections, path: Path) -> None:
    """The label path over the first 4 blocks of an 8,192² store: rasterise, write every level."""
    store = create_label_store(path, SIZE, SIZE, CHUNK, ["a", "b", "c"], Affine.identity(), None, None, BLOCK // CHUNK)
    for rows, cols in label_blocks(SIZE, SIZE, CHUNK, BLOCK // CHUNK)[:4]:
        write_label_block(store, detections, rows, cols)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=16, help="tiles the model runs per measurement")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a Dask worker thread runs it

    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "scene.tif"
        write_scene(image, seed=1, height=2048, width=2048)
        source = open_raster(image)
        pixels = np.stack([read_window(source, t.rows, t.cols)[0] for t in TileGrid(2048, 2048, CHUNK, 64).tiles])
        segmenter = Segmenter(resolve_model_dir(None), "cpu")
        detections = scene_detections()
        bounds = detections.bounds
        inside = np.flatnonzero((bounds[:, 2] > BLOCK) & (bounds[:, 0] < 2 * BLOCK) & (bounds[:, 3] > BLOCK) & (bounds[:, 1] < 2 * BLOCK))
        shapes = list(zip(detections.geometry[inside], (inside + 1).tolist()))

        def rasterise() -> np.ndarray:
            return features.rasterize(shapes, out_shape=(BLOCK, BLOCK), transform=Affine.translation(BLOCK, BLOCK), dtype="uint32")

        block = rasterise()
        shard = zarr.create_array(Path(tmp) / "shard", shape=(BLOCK, BLOCK), chunks=(CHUNK, CHUNK), shards=(BLOCK, BLOCK),
                                  dtype="uint32", fill_value=0, compressors=COMPRESSORS, config={"write_empty_chunks": True})
        blosc = Blosc(cname="zstd", clevel=3, shuffle=Blosc.NOSHUFFLE)
        chunks = [np.ascontiguousarray(block[r : r + CHUNK, c : c + CHUNK]) for r in range(0, BLOCK, CHUNK) for c in range(0, BLOCK, CHUNK)]
        to_sort = np.random.default_rng(0).integers(0, 1000, 4_000_000).astype(np.uint32)
        stores = itertools.count()

        def label_path() -> None:
            write_label_path(detections, Path(tmp) / f"labels-{next(stores)}.zarr")

        def write_shard() -> None:
            shard[:] = block

        def model_ms() -> float:
            start = time.perf_counter()
            for i in range(args.tiles):
                segmenter(pixels[i % len(pixels) : i % len(pixels) + 1])
            return (time.perf_counter() - start) / args.tiles * 1000

        def beside(work) -> tuple[float, int]:
            stop, done = threading.Event(), [0]

            def loop() -> None:
                while not stop.is_set():
                    work()
                    done[0] += 1

            thread = threading.Thread(target=loop)
            thread.start()
            try:
                return model_ms(), done[0]
            finally:
                stop.set()
                thread.join()

        classes = ["a", "b", "c"]
        parts = [write_part(detections, 1, source, classes, Path(tmp) / "part.parquet")]
        counts = np.bincount(detections.label.astype(np.int64), minlength=len(classes))
        outputs = itertools.count()

        def write_geopackage() -> None:
            write_outputs(parts, counts, source, classes, Path(tmp) / f"out-{next(outputs)}")

        def label_path_in_side_process() -> None:  # what the merge's thread does: send the polygons, wait
            side_process.call(write_label_path, detections, Path(tmp) / f"labels-{next(stores)}.zarr")

        stages = {  # name: (model ms per tile and units the other side did, what a unit is)
            "whole label path (write_label_block)": (partial(beside, label_path), "4 blocks"),
            "rasterise (rasterio)": (partial(beside, rasterise), "block"),
            "write one shard (zarr)": (partial(beside, write_shard), "block"),
            "compress 16 chunks (numcodecs blosc, no zarr)": (partial(beside, lambda: [blosc.encode(c) for c in chunks]), "block"),
            "the image's GeoPackage from its part (writers.write_outputs)": (partial(beside, write_geopackage), "GeoPackage"),
            "numpy sort (releases the GIL; control)": (partial(beside, lambda: np.sort(to_sort)), "sort of 4M"),
            "whole label path, in the side process (pipeline.side_process)": (partial(beside, label_path_in_side_process), "4 blocks"),
        }
        model_ms()  # warm-up: the first tiles of a fresh model run slower
        label_path_in_side_process()  # started: imports done
        alone, results = [], {name: [] for name in stages}
        for _ in range(args.repeats):
            alone.append(model_ms())
            for name, (measure, _unit) in stages.items():
                results[name].append(measure())
        base = float(np.median(alone))
        rows = [["model alone", f"{base:.0f}", "1.00", "–"]]
        for name, runs in results.items():
            ms = float(np.median([m for m, _ in runs]))
            rows.append([f"model beside: {name}", f"{ms:.0f}", f"{ms / base:.2f}",
                         f"{np.median([n for _, n in runs]):.0f} × {stages[name][1]}"])
        print(f"\nmodel synthetic-shapes on 512² tiles, 1 torch thread, {args.tiles} tiles per measurement, {args.repeats} interleaved repeats, medians")
        print(table(["run", "model ms per tile", "÷ alone", "the other thread (process) did"], rows))
        print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
