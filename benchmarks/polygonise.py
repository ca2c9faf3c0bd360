"""Mask → polygon tracing, before and after: the real masks of model outputs, traced both ways.

Masks come from ``models.inference.Segmenter`` on the tiles of a generated scene (``synthetic-shapes``)
and, when ``../shared/data`` is present, of the MoNuSeg held-out H&E tiles (``nuclei-he``). Timed
side by side in one run, interleaved, medians of ``--repeats``:

- before: one ``rasterio.features.shapes`` call per mask, largest region, ``shapely.simplify(·, 0)``
  (Seamline's tracer until 2026-11-30, kept here for comparison);
- after: ``pipeline.polygons.masks_to_polygons``, every mask of a tile in one vectorised pass.

Both must give the same polygons (checked: equal geometry for every mask).

    python benchmarks/polygonise.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import shapely
from affine import Affine
from rasterio import features

from common import ROOT, machine, table
from models.inference import Segmenter
from models.registry import resolve_model_dir
from models.synthetic import make_scene
from pipeline.polygons import masks_to_polygons

MONUSEG = ROOT.parent / "shared" / "data" / "nuclei-monuseg2018"


def before(mask: np.ndarray, row: int, col: int) -> shapely.Polygon | None:
    if not mask.any():
        return None
    shapes = features.shapes(mask.astype(np.uint8), mask=mask, connectivity=4, transform=Affine.translation(col, row))
    polygons = [shapely.geometry.shape(geometry) for geometry, _ in shapes]
    return shapely.simplify(max(polygons, key=lambda p: p.area), 0)


def model_tiles(model: str) -> tuple[list, int]:
    """(per-tile lists of (row, col, mask), tile size) from the model's own outputs."""
    segmenter = Segmenter(resolve_model_dir(model), "cpu", flips=False)  # polygonisation is timed, not the model
    size = segmenter.card.tile_size
    if model == "nuclei-he":
        import rasterio

        tiles = []
        for path in sorted((MONUSEG / "images").glob("*.tif"))[:4]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with rasterio.open(path) as source:
                    image = np.moveaxis(source.read([1, 2, 3]), 0, -1)
            tiles += [image[r : r + size, c : c + size] for r in (0, 1000 - size) for c in (0, 1000 - size)]
    else:
        tiles = [make_scene(seed, size, size).image for seed in range(16)]
    found = [segmenter(np.ascontiguousarray(tile)[None])[0] for tile in tiles]
    return [[(m.row, m.col, m.mask) for m in instances.masks] for instances in found], size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    models = ["synthetic-shapes"] + (["nuclei-he"] if MONUSEG.is_dir() else [])
    rows = []
    for model in models:
        tiles, size = model_tiles(model)
        masks = sum(len(t) for t in tiles)
        vertices = 0
        for crops in tiles:  # same polygons, both ways
            new = masks_to_polygons(crops, (size, size))
            old = [before(mask, r, c) for r, c, mask in crops]
            for a, b in zip(new, old):
                assert (a is None) == (b is None) and (a is None or shapely.equals(a, b)), "tracers disagree"
                vertices += 0 if a is None else shapely.get_num_coordinates(a)
        times = {"before": [], "after": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            for crops in tiles:
                [before(mask, r, c) for r, c, mask in crops]
            times["before"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for crops in tiles:
                masks_to_polygons(crops, (size, size))
            times["after"].append(time.perf_counter() - start)
        b, a = (float(np.median(times[k])) for k in ("before", "after"))
        rows.append([model, len(tiles), masks, f"{vertices / max(masks, 1):.0f}", f"{1e3 * b / len(tiles):.1f}",
                     f"{1e3 * a / len(tiles):.1f}", f"{1e3 * a / max(masks, 1):.3f}", f"{b / a:.1f}×"])
    print(f"machine: {machine()}; {args.repeats} interleaved repeats, medians")
    print(table(["model", "tiles", "masks", "vertices/mask", "before ms/tile", "after ms/tile", "after ms/mask", "speed-up"], rows))


if __name__ == "__main__":
    main()
