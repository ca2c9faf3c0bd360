"""Merge + write throughput: N instances merged across tile seams and written to a GeoPackage.

Per-tile detections are generated directly (no model): a lattice of small nucleus-like ellipses
(pixel-edge polygons, 5–13 px, 9–29 vertices) over an image just large enough to hold N of them,
cut by the standard tile grid. Each tile gets what a model would return for its window: every
object that meets the window, clipped to it, with neighbouring tiles seeing slightly different
copies (one boundary pixel apart; ``--identical-copies`` turns that off), flagged ``cut`` / ``owned`` by the same rules as
``pipeline.segment.tile_detections``, then split into final instances and seam candidates by
``pipeline.segment.split_seam_candidates`` and grouped into per-batch results as the Dask graph
does. Timed, in this process: ``pipeline.stages.merge_image`` (the whole image's seam merge and
stable order in memory) and, as the Dask graph runs it, the streamed merge and write (the
``merge`` step of ``pipeline.streaming`` per band of tile rows, then ``finish_image``: GeoPackage
with spatial index, counts) with its memory growth. Both must hold exactly N instances (checked).

    python benchmarks/merge_throughput.py                     # 1,000,000 instances
    python benchmarks/merge_throughput.py --instances 200000 --before --repeats 3   # old vs new merge
    python benchmarks/merge_throughput.py --instances 200000 --profile 25
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely
from affine import Affine

from common import PeakRSS, fmt_bytes, machine, table
from models.synthetic import shape_mask
from pipeline.detections import Detections
from pipeline.graph import MIN_BAND_TILES
from pipeline.grid import Span, Tile, TileGrid
from pipeline.polygons import mask_to_polygon
from pipeline.segment import split_seam_candidates
from pipeline.sources import RasterSource
from pipeline.stages import BatchResult, merge_image
from pipeline.synthetic_raster import DEFAULT_CRS
from pipeline.streaming import finish_image, merge_step, start_image

CLASSES = ["a", "b", "c"]


def templates(count: int = 24, seed: int = 0) -> tuple[list[shapely.Polygon], list[shapely.Polygon]]:
    """Pixel-edge polygons of ``count`` small ellipses (5–13 px, nucleus-like) at the origin, and
    for each a variant one boundary pixel smaller with the same bounding box: the copy a
    neighbouring tile's model run returns (real copies are seldom identical)."""
    rng = np.random.default_rng(seed)
    shapes, variants = [], []
    while len(shapes) < count:
        mask = shape_mask("ellipse", rng.uniform(6, 14), rng.uniform(0.6, 1.0), rng.uniform(0, np.pi))
        h, w = mask.shape
        if max(h, w) > PITCH - 2 or min(h, w) < 4:
            continue
        padded = np.pad(mask, 1)
        edge = mask & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
        edge[[0, -1]] = False
        edge[:, [0, -1]] = False
        rows, cols = np.nonzero(edge)
        if len(rows) == 0:
            continue
        smaller = mask.copy()
        smaller[rows[0], cols[0]] = False
        polygon, variant = mask_to_polygon(mask, 0, 0), mask_to_polygon(smaller, 0, 0)
        if variant.bounds != polygon.bounds or not variant.is_valid:
            continue
        shapes.append(polygon)
        variants.append(variant)
    return shapes, variants


PITCH = 16


class Lattice:
    """``n`` objects, one per ``PITCH``² cell of a square lattice, each a template ellipse placed
    at a deterministic offset inside its cell (neighbours never touch)."""

    def __init__(self, n: int) -> None:
        shapes, variants = templates()
        self.n = n
        self.per_row = int(np.ceil(np.sqrt(n)))
        self.side = self.per_row * PITCH
        self.geometry = np.array(shapes + variants + [None], dtype=object)[:-1]
        self.coords = [shapely.get_coordinates(g) for g in self.geometry]
        size = np.array([g.bounds[2:] for g in shapes])
        k = np.arange(n)
        self.template = k * 7 % len(shapes)
        w, h = size[self.template, 0], size[self.template, 1]
        self.x0 = (k % self.per_row) * PITCH + (k * 3) % (PITCH - w)
        self.y0 = (k // self.per_row) * PITCH + (k * 11) % (PITCH - h)
        self.x1, self.y1 = self.x0 + w, self.y0 + h

    def in_window(self, tile: Tile) -> np.ndarray:
        wx0, wy0, wx1, wy1 = tile.bounds
        c0, c1 = max(wx0 // PITCH - 1, 0), min(wx1 // PITCH + 1, self.per_row - 1)
        r0, r1 = max(wy0 // PITCH - 1, 0), min(wy1 // PITCH + 1, self.per_row - 1)
        rr, cc = np.meshgrid(np.arange(r0, r1 + 1), np.arange(c0, c1 + 1), indexing="ij")
        index = (rr * self.per_row + cc).ravel()
        index = index[index < self.n]
        meets = (self.x0[index] < wx1) & (self.x1[index] > wx0) & (self.y0[index] < wy1) & (self.y1[index] > wy0)
        return index[meets]

    def polygons(self, index: np.ndarray, variant: np.ndarray) -> np.ndarray:
        """Objects ``index``, as template or variant (``variant`` 0 / 1), in image pixels."""
        which = self.template[index] + variant * (len(self.geometry) // 2)
        counts = np.array([len(self.coords[t]) for t in range(len(self.coords))])[which]
        offset = np.repeat(np.stack([self.x0[index], self.y0[index]], 1), counts, axis=0).astype(float)
        return shapely.transform(self.geometry[which], lambda xy: xy + offset)


def tile_detections(scene: Lattice, tile: Tile, jitter: bool) -> Detections:
    """What a model returns for ``tile``: each object meeting the window, clipped to it (the
    largest part), flagged ``cut`` / ``owned`` like ``pipeline.segment.tile_detections``. With
    ``jitter``, neighbouring tiles see an object as template or variant alternately."""
    index = scene.in_window(tile)
    variant = (index + tile.row + tile.col) % 2 if jitter else np.zeros_like(index)
    geometry = scene.polygons(index, variant)
    wx0, wy0, wx1, wy1 = tile.bounds
    crosses = (scene.x0[index] < wx0) | (scene.y0[index] < wy0) | (scene.x1[index] > wx1) | (scene.y1[index] > wy1)
    clipped = shapely.intersection(geometry[crosses], shapely.box(wx0, wy0, wx1, wy1))
    clipped = np.array([_largest(g) for g in clipped] + [None], dtype=object)[:-1]
    geometry[crosses] = clipped
    keep = ~shapely.is_empty(geometry)
    index, geometry = index[keep], geometry[keep]
    x0, y0, x1, y1 = shapely.bounds(geometry).reshape(-1, 4).T
    left, top, right, bottom = tile.interior
    cut = (left & (x0 == wx0)) | (top & (y0 == wy0)) | (right & (x1 == wx1)) | (bottom & (y1 == wy1))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    k0, l0, k1, l1 = tile.core_bounds
    return Detections(
        geometry=geometry,
        label=(index % 3).astype(np.int16),
        score=(0.5 + 0.5 * ((index * 7919 + tile.index) % 1000) / 1000).astype(np.float32),
        tile=np.full(len(index), tile.index, np.int32),
        cut=cut,
        owned=(cx >= k0) & (cx < k1) & (cy >= l0) & (cy < l1),
    )


def _largest(geometry: shapely.Geometry) -> shapely.Geometry:
    """A clipped mask keeps its largest 4-connected part, as ``mask_to_polygon`` does."""
    parts = [g for g in getattr(geometry, "geoms", [geometry]) if g.geom_type == "Polygon" and g.area > 0]
    return max(parts, key=lambda p: p.area) if parts else shapely.Polygon()


def batch_results(n: int, tile_size: int, overlap: int, batch_size: int, jitter: bool) -> tuple[TileGrid, dict[Span, list[BatchResult]]]:
    """Per-band lists of batch results, batches within bands, as ``pipeline.graph`` forms them."""
    scene = Lattice(n)
    grid = TileGrid(scene.side, scene.side, tile_size, overlap)
    by_band = {}
    for band in grid.row_bands(MIN_BAND_TILES):
        tiles, by_band[band] = grid.tiles_in_rows(band), []
        for start in range(0, len(tiles), batch_size):
            finals, candidates = [], []
            for tile in tiles[start : start + batch_size]:
                final, candidate = split_seam_candidates(tile_detections(scene, tile, jitter), tile)
                finals.append(final)
                candidates.append(candidate)
            chunk = len(tiles[start : start + batch_size])
            by_band[band].append(BatchResult(Detections.concat(finals), Detections.concat(candidates), chunk, 0))
    return grid, by_band


def streamed(grid: TileGrid, by_band: dict[Span, list[BatchResult]], source: RasterSource, out_dir: Path) -> dict:
    """What the graph's ``merge`` chain and ``write`` task run, in order, in this process."""
    parts = out_dir / ".instances-parts.bench"
    stream = start_image(parts, len(CLASSES), grid.height, grid.width, None)
    for band, results in by_band.items():
        stream = merge_step(stream, results, grid, band, 0.5, source, CLASSES, parts, None)
    return finish_image(stream, source, CLASSES, out_dir, parts, {"tiles": len(grid)}, None, None)


def merge_before(results: list[BatchResult], tiles: list[Tile]) -> Detections:
    """``merge_image`` with the frozen pre-optimisation merge (benchmarks/merge_before.py)."""
    import merge_before as before

    candidates = Detections.concat([r.candidates for r in results])
    merged = before.merge_seams(candidates, {t.index: t for t in tiles}, 0.5)
    return before.assign_order(Detections.concat([r.final for r in results] + [merged]))


def identical(a: Detections, b: Detections) -> bool:
    """Same instances, same order, same attributes, same vertices."""
    return (
        len(a) == len(b)
        and all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("label", "score", "tile", "cut", "owned"))
        and bool(shapely.equals_exact(a.geometry, b.geometry, tolerance=0).all())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--identical-copies", action="store_true", help="no jitter: every tile sees an object identically")
    parser.add_argument("--before", action="store_true",
                        help="also time the pre-optimisation merge (benchmarks/merge_before.py) on the same input, "
                             "interleaved, and check both give identical outputs")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats; medians are reported")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile merge + write; print the top N functions")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    start = time.perf_counter()
    grid, by_band = batch_results(args.instances, args.tile_size, args.overlap, args.batch_size, not args.identical_copies)
    results = [r for band in by_band.values() for r in band]
    generated = time.perf_counter() - start
    finals = sum(len(r.final) for r in results)
    candidates = sum(len(r.candidates) for r in results)
    print(f"{args.instances:,} instances on a {grid.width:,}² image, {len(grid):,} tiles of {args.tile_size}² "
          f"(overlap ≥ {args.overlap}) in {len(by_band)} bands: {finals:,} final in their tile, {candidates:,} seam "
          f"candidates (generated in {generated:.1f} s)")
    source = RasterSource(
        path=f"lattice-{args.instances}.tif", height=grid.height, width=grid.width, bands=(1, 2, 3), dtype="uint8",
        value_range=None, transform=Affine(0.5, 0, 430000.0, 0, -0.5, 5420000.0), crs_wkt=DEFAULT_CRS,
    )
    variants = {"merge in memory": lambda: merge_image(results, grid).detections}
    if args.before:
        variants = {"merge before": lambda: merge_before(results, grid.tiles), **variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    growth: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, Detections] = {}
    profiler = cProfile.Profile() if args.profile else None
    for repeat in range(args.repeats):
        names = list(variants) if repeat % 2 == 0 else list(variants)[::-1]  # alternate who goes first
        for name in names:
            outputs.pop(name, None)
            gc.collect()
            with PeakRSS() as memory:
                start = time.perf_counter()
                outputs[name] = variants[name]()
                times[name].append(time.perf_counter() - start)
            growth[name].append(memory.peak - memory.start)
    merged = outputs.pop("merge in memory")
    expected = (len(merged), np.bincount(merged.label, minlength=len(CLASSES)).tolist())
    before = outputs.pop("merge before", None)
    same_before = before is not None and identical(before, merged)
    del merged, before
    gc.collect()
    stream_times, stream_growth = [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp, PeakRSS() as memory:
            if profiler:
                profiler.enable()
            start = time.perf_counter()
            summary = streamed(grid, by_band, source, Path(tmp) / "out")
            stream_times.append(time.perf_counter() - start)
            if profiler:
                profiler.disable()
            gpkg_size = Path(summary["outputs"]["geopackage"]).stat().st_size
        stream_growth.append(memory.peak - memory.start)
    found = summary["instances"]
    same = (found, list(summary["counts"].values())) == expected
    runs = lambda ts: ", ".join(f"{t:.1f}" for t in ts)  # noqa: E731
    rows = [[name, f"{expected[0]:,}", f"{np.median(times[name]):.1f} (runs {runs(times[name])})", "-",
             fmt_bytes(max(growth[name]))] for name in variants]
    total = float(np.median(stream_times))
    rows.append(["streamed merge + GeoPackage (pipeline)", f"{found:,}", f"{total:.1f} (runs {runs(stream_times)})",
                 f"{found / total:,.0f}", fmt_bytes(max(stream_growth))])
    print(table(["run", "instances", "seconds", "instances/s", "RSS growth"], rows))
    print(f"GeoPackage {fmt_bytes(gpkg_size)}; streamed = pipeline.streaming merge_step per band + finish_image "
          f"(Parquet parts, then GPKG + R-tree + counts); the in-memory merge writes nothing")
    print(f"exactly once: {'yes' if found == args.instances else f'NO ({found:,} of {args.instances:,})'}; "
          f"streamed = in memory (instances, counts per class): {'yes' if same else 'NO'}")
    if args.before:
        before_s, now_s = float(np.median(times["merge before"])), float(np.median(times["merge in memory"]))
        print(f"merge speed-up {before_s / now_s:.1f}x; outputs identical to before: {'yes' if same_before else 'NO'}")
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.profile)
        print(text.getvalue())
    if found != args.instances or not same or (args.before and not same_before):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
