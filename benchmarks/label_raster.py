"""labels.zarr's rasterising: ``pipeline.rasterise.burn_polygons`` against rasterio's ``rasterize``
(what ``pipeline.label_store`` used until the twenty-first session), and the whole
``write_label_blocks`` path (rasterise + every level of labels and classes), CPU seconds.

Polygons are generated scenes' ground truth traced as the pipeline traces masks (pixel edges):

- shapes: ``models.synthetic.make_scene`` defaults (objects 10–150 px);
- nuclei: dense small objects (10–24 px), ~20,000 on 4,096².

Each block of 4 × 4 chunks of 384² (a 384-pixel tile's, as ``seamline run`` writes them) is
rasterised by both, results checked equal; repeats interleaved, medians of CPU seconds.

    python benchmarks/label_raster.py [--size 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely
from affine import Affine
from rasterio import features

from common import machine, table
from models.synthetic import make_scene
from pipeline.detections import Detections
from pipeline.label_store import create_label_store, label_blocks, write_label_blocks
from pipeline.polygons import trace_labels
from pipeline.rasterise import burn_polygons

CHUNK, PER_TASK = 384, 4


def reaching(geometry: np.ndarray, rows, cols) -> np.ndarray:
    """The polygons whose boxes meet the block, as ``write_label_block`` picks them."""
    xmin, ymin, xmax, ymax = shapely.bounds(geometry).T
    return np.flatnonzero((xmax > cols.start) & (xmin < cols.stop) & (ymax > rows.start) & (ymin < rows.stop))


def with_rasterio(geometry: np.ndarray, ids: np.ndarray, blocks) -> list[np.ndarray]:
    out = []
    for rows, cols in blocks:
        hit = reaching(geometry, rows, cols)
        out.append(features.rasterize(zip(geometry[hit], ids[hit].tolist()), out_shape=(rows.length, cols.length),
                                      transform=Affine.translation(cols.start, rows.start), fill=0, dtype="uint32"))
    return out


def with_numpy(geometry: np.ndarray, ids: np.ndarray, blocks) -> list[np.ndarray]:
    out = []
    for rows, cols in blocks:
        hit = reaching(geometry, rows, cols)
        out.append(burn_polygons(geometry[hit], ids[hit], rows, cols))
    return out


def cpu(function, *args):
    start = time.process_time()
    result = function(*args)
    return time.process_time() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    scenes = {
        "shapes": make_scene(1, args.size, args.size),
        "nuclei": make_scene(2, args.size, args.size, density=30, size_range=(10, 24), gap=1),
    }
    blocks = label_blocks(args.size, args.size, CHUNK, PER_TASK)
    rows = []
    for name, scene in scenes.items():
        values, polygons = trace_labels(scene.labels)
        geometry = np.asarray(polygons, object)[np.argsort(values)]
        ids = np.arange(1, len(geometry) + 1)
        detections = Detections(geometry=geometry, label=np.zeros(len(ids), np.int16), score=np.ones(len(ids), np.float32),
                                tile=np.zeros(len(ids), np.int32), cut=np.zeros(len(ids), bool), owned=np.ones(len(ids), bool))
        timings = {"rasterio": [], "numpy": [], "write_label_blocks": []}
        with tempfile.TemporaryDirectory() as tmp:
            for repeat in range(args.repeats):
                seconds, gdal = cpu(with_rasterio, geometry, ids, blocks)
                timings["rasterio"].append(seconds)
                seconds, ours = cpu(with_numpy, geometry, ids, blocks)
                timings["numpy"].append(seconds)
                assert all((a == b).all() for a, b in zip(gdal, ours)), "burn_polygons differs from rasterio"
                store = create_label_store(Path(tmp) / f"{repeat}.zarr", args.size, args.size, CHUNK, ["a"], Affine.identity(), None, None, PER_TASK)
                timings["write_label_blocks"].append(cpu(write_label_blocks, store, detections, ids, blocks)[0])
        medians = {k: float(np.median(v)) for k, v in timings.items()}
        rows.append([name, f"{len(ids):,}", f"{medians['rasterio']:.2f}", f"{medians['numpy']:.2f}",
                     f"{medians['rasterio'] / medians['numpy']:.1f}×", f"{medians['write_label_blocks']:.2f}"])
    print(f"{args.size}² pixels, {len(blocks)} blocks of {CHUNK * PER_TASK}²; CPU s, medians of {args.repeats} interleaved repeats")
    print(table(["scene", "instances", "rasterio s", "burn_polygons s", "speed-up", "write_label_blocks s (shipped)"], rows))
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
