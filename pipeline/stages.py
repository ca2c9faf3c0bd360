"""The stages of one image, as plain functions: read → segment → merge (→ write, in writers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.detections import Detections
from pipeline.grid import Tile, TileGrid
from pipeline.merge import assign_order, merge_seams
from pipeline.segment import split_seam_candidates, tile_detections
from pipeline.sources import RasterSource


@dataclass
class TileBatch:
    """Pixels of several tiles, each padded with zeros to ``tile_size``², and their validity."""

    tiles: list[Tile]
    pixels: np.ndarray
    has_data: np.ndarray


@dataclass
class BatchResult:
    """What a segment task sends back: polygons only, never masks or pixels."""

    final: Detections
    candidates: Detections
    tiles_segmented: int
    tiles_skipped: int


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
    has_data = np.zeros(len(tiles), bool)
    for i, tile in enumerate(tiles):
        data, valid = source.read(tile.rows, tile.cols)
        pixels[i, : data.shape[0], : data.shape[1]] = data
        has_data[i] = valid.any()
    return TileBatch(tiles=tiles, pixels=pixels, has_data=has_data)


def segment_batch(batch: TileBatch, model_dir: str, flips: bool | None = None, device: str | None = None) -> BatchResult:
    """Run the model (loaded once per process) on the tiles with data; polygonise; split.
    ``flips``: flip test-time augmentation on or off (None: as the model card says)."""
    from models.inference import cached_segmenter  # torch: imported by workers, never by the client

    segmenter = cached_segmenter(model_dir, device, flips)
    run = np.flatnonzero(batch.has_data)
    finals, candidates = [], []
    for k, instances in zip(run, segmenter(batch.pixels[run])):
        tile = batch.tiles[k]
        final, candidate = split_seam_candidates(tile_detections(instances, tile), tile)
        finals.append(final)
        candidates.append(candidate)
    return BatchResult(
        final=Detections.concat(finals),
        candidates=Detections.concat(candidates),
        tiles_segmented=len(run),
        tiles_skipped=len(batch.tiles) - len(run),
    )


def segment_and_keep(batch: TileBatch, model_dir: str, flips: bool | None, keep: str) -> BatchResult:
    """``segment_batch``, then the result saved at ``keep`` so a rerun can skip this batch."""
    from pipeline.batch_cache import save_batch

    result = segment_batch(batch, model_dir, flips)
    save_batch(Path(keep), result)
    return result


def merge_image(results: list[BatchResult], tiles: list[Tile] | TileGrid, min_iou: float = 0.5) -> ImageResult:
    """All instances of one image, merged across seams and in their stable order. ``tiles`` may be
    the grid itself: a slide's 50,000 tiles then never travel through the task graph."""
    tiles = tiles.tiles if isinstance(tiles, TileGrid) else tiles
    candidates = Detections.concat([r.candidates for r in results])
    merged = merge_seams(candidates, {t.index: t for t in tiles}, min_iou)
    detections = assign_order(Detections.concat([r.final for r in results] + [merged]))
    return ImageResult(
        detections=detections,
        tiles=len(tiles),
        tiles_skipped=sum(r.tiles_skipped for r in results),
        seam_candidates=len(candidates),
    )
