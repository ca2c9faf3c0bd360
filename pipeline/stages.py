"""The stages of one image, as plain functions: read → segment → merge (→ write, in writers)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.detections import Detections
from pipeline.grid import Span, Tile, TileGrid
from pipeline.merge import assign_order, box_centres, merge_seams
from pipeline.segment import split_seam_candidates, tile_detections
from pipeline.sources import RasterSource


@dataclass
class TileBatch:
    """Pixels of several tiles, each padded with zeros to ``tile_size``², and their validity:
    ``valid`` per pixel (padding invalid; None when every pixel is valid), ``has_data`` per tile."""

    tiles: list[Tile]
    pixels: np.ndarray
    has_data: np.ndarray
    valid: np.ndarray | None = None


@dataclass
class BatchResult:
    """What a segment task sends back: polygons only, never masks or pixels."""

    final: Detections
    candidates: Detections
    tiles_segmented: int
    tiles_skipped: int
    seconds: float = 0.0  # the segment task's own time: model and polygons


@dataclass
class ImageResult:
    detections: Detections
    tiles: int
    tiles_skipped: int
    seam_candidates: int
    stats: dict = field(default_factory=dict)


def read_batch(source: RasterSource, grid: TileGrid, indices: Sequence[int]) -> TileBatch:
    """Read the windows of the grid's tiles ``indices``; a tile with no valid pixel is flagged,
    not dropped."""
    tiles = [grid.tile(i) for i in indices]
    channels = len(source.bands)
    pixels = np.zeros((len(tiles), grid.tile_size, grid.tile_size, channels), np.uint8)
    valid = np.zeros(pixels.shape[:3], bool)
    for i, tile in enumerate(tiles):
        data, valid_part = source.read(tile.rows, tile.cols)
        pixels[i, : data.shape[0], : data.shape[1]] = data
        valid[i, : data.shape[0], : data.shape[1]] = valid_part
    has_data = valid.any(axis=(1, 2))
    return TileBatch(tiles=tiles, pixels=pixels, has_data=has_data, valid=None if valid.all() else valid)


def load_model(model_dir: str, flips: bool | None = None) -> str:
    """Load the model as ``segment_batch`` does (kept for the process's tiles); its device."""
    from models.inference import cached_segmenter

    return str(cached_segmenter(model_dir, None, flips).device)


def segment_batch(batch: TileBatch, model_dir: str, flips: bool | None = None, device: str | None = None) -> BatchResult:
    """Run the model (loaded once per process) on the tiles with data; polygonise; split.
    ``flips``: flip test-time augmentation on or off (None: as the model card says)."""
    from models.inference import cached_segmenter  # torch: imported by workers, never by the client

    began = time.perf_counter()
    segmenter = cached_segmenter(model_dir, device, flips)
    run = np.flatnonzero(batch.has_data)
    finals, candidates = [], []
    for k, instances in zip(run, segmenter(batch.pixels[run])):
        tile = batch.tiles[k]
        valid = None if batch.valid is None or batch.valid[k].all() else batch.valid[k]
        final, candidate = split_seam_candidates(tile_detections(instances, tile, valid), tile)
        finals.append(final)
        candidates.append(candidate)
    return BatchResult(
        final=Detections.concat(finals),
        candidates=Detections.concat(candidates),
        tiles_segmented=len(run),
        tiles_skipped=len(batch.tiles) - len(run),
        seconds=time.perf_counter() - began,
    )


def segment_and_keep(batch: TileBatch, model_dir: str, flips: bool | None, keep: str) -> BatchResult:
    """``segment_batch``, then the result saved at ``keep`` so a rerun can skip this batch."""
    from pipeline.batch_cache import save_batch

    result = segment_batch(batch, model_dir, flips)
    save_batch(Path(keep), result)
    return result


def resume_batch(kept: str, source: RasterSource, grid: TileGrid, indices: Sequence[int], model_dir: str, flips: bool | None) -> BatchResult:
    """The batch an interrupted run kept at ``kept``; read, segmented and kept again when that
    file cannot be loaded (damaged on disk): a bad cache entry never fails the image."""
    from pipeline.batch_cache import load_batch

    try:
        return load_batch(Path(kept))
    except Exception:  # truncated or corrupt archive, arrays or WKB: whatever it is, it is only a cache
        Path(kept).unlink(missing_ok=True)
        return segment_and_keep(read_batch(source, grid, indices), model_dir, flips, kept)


@dataclass
class SeamState:
    """What an image's merge carries from one band of tile rows to the next."""

    pending: Detections  # seam candidates whose group a later band may still join
    held: Detections  # merged instances that one from a later band may still sort before
    numbered: int = 0  # instances released so far: the next one released has id ``numbered + 1``
    horizon: float = 0.0  # top row of every window still to come (``inf``: none)

    @classmethod
    def start(cls) -> "SeamState":
        return cls(Detections.empty(), Detections.empty())

    @property
    def settled_rows(self) -> float:
        """Pixel rows above which every instance is released: nothing held, pending or to come
        reaches above it (``inf`` once the last band is merged)."""
        tops = [d.bounds[:, 1].min() for d in (self.pending, self.held) if len(d)]
        return min([self.horizon, *tops])


def merge_band(
    state: SeamState, results: list[BatchResult], tiles: dict[int, Tile], horizon: float = np.inf, min_iou: float = 0.5
) -> tuple[SeamState, Detections]:
    """Merge one band's batch results with what the bands above left pending; release, in their
    stable order (``assign_order``), the instances no later band can change or sort before.

    ``horizon`` is the top row of every window still to come (``inf``: this is the last band).
    ``tiles`` must hold the tiles of every candidate and of the rows around them. Released over
    all bands, the instances are exactly ``merge_image``'s, in the same order, while memory holds
    about one band: everything merged later lies at or below the horizon or a pending candidate's
    top, and so does its box centre.
    """
    candidates = Detections.concat([state.pending] + [r.candidates for r in results])
    merged, pending = merge_seams(candidates, tiles, min_iou, horizon)
    held = Detections.concat([state.held] + [r.final for r in results] + [merged])
    limit = np.floor(min(horizon, pending.bounds[:, 1].min(initial=np.inf)))
    ready = box_centres(held)[1] < limit
    released = assign_order(held.take(np.flatnonzero(ready)))
    return SeamState(pending, held.take(np.flatnonzero(~ready)), state.numbered + len(released), horizon), released


def merge_grid_band(
    state: SeamState, results: list[BatchResult], grid: TileGrid, band: Span, min_iou: float = 0.5
) -> tuple[SeamState, Detections]:
    """``merge_band`` for the tile rows ``band`` of ``grid`` (bands taken top to bottom): its
    horizon is the next band's top, and its tiles are the rows within two of any candidate's
    (windows three rows apart never overlap: the grid keeps the overlap under half a tile).
    ``results`` may hold tiles of later rows too (a batch that starts in this band and ends in
    the next): they lie below the horizon, so they wait, pending or held, like any instance
    that reaches it."""
    n_rows, n_cols = grid.shape
    horizon = grid.row_top(band.stop) if band.stop < n_rows else np.inf
    rows = np.concatenate([state.pending.tile] + [r.candidates.tile for r in results]) // n_cols
    first, last = int(rows.min(initial=band.start)), int(rows.max(initial=band.stop - 1))
    tiles = {t.index: t for t in grid.tiles_in_rows(Span(first - 2, last + 3))}
    return merge_band(state, results, tiles, horizon, min_iou)


def merge_image(results: list[BatchResult], tiles: list[Tile] | TileGrid, min_iou: float = 0.5) -> ImageResult:
    """All instances of one image, merged across seams and in their stable order, in memory (one
    band: ``merge_band`` with nothing to come). ``tiles`` may be the grid itself."""
    tiles = tiles.tiles if isinstance(tiles, TileGrid) else tiles
    _, detections = merge_band(SeamState.start(), results, {t.index: t for t in tiles}, np.inf, min_iou)
    return ImageResult(
        detections=detections,
        tiles=len(tiles),
        tiles_skipped=sum(r.tiles_skipped for r in results),
        seam_candidates=sum(len(r.candidates) for r in results),
    )
