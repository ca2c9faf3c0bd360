"""The Dask graph of one image: ``read`` and ``segment`` per tile batch, then ``merge``, ``write``.

Task keys start with the stage name, so the dashboard's task stream and progress read
``read``, ``segment``, ``merge`` and ``write``. The model travels as a directory path; each worker
loads it once (``models.inference.cached_segmenter``) and reuses it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed, delayed

from pipeline.grid import TileGrid
from pipeline.sources import RasterSource, valid_overview
from pipeline.batch_cache import load_batch
from pipeline.label_store import create_label_store, finalise_label_store, label_blocks, write_label_block
from pipeline.stages import merge_image, read_batch, segment_and_keep, segment_batch
from pipeline.tissue import tiles_with_tissue, tissue_area_mm2, tissue_mask
from pipeline.writers import write_outputs


@dataclass(frozen=True)
class Tiling:
    tile_size: int
    overlap: int
    batch_size: int = 4
    match_iou: float = 0.5
    tissue_mask: bool = True
    test_time_flips: bool | None = None  # None: as the model card says

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size {self.batch_size} must be at least 1")
        if not 0 < self.match_iou <= 1:
            raise ValueError(f"match IoU {self.match_iou} must be in (0, 1]")


@dataclass
class ImageGraph:
    """Delayed handles of one image: ``batches`` (for progress) and ``result`` (the summary)."""

    source: RasterSource
    batches: list[Delayed]
    merged: Delayed
    result: Delayed


def _label_block(store: Path, merged, rows, cols) -> int:
    return write_label_block(store, merged.detections, rows, cols)


def _label_finalise(store: Path, final: Path, merged, class_names: list[str], cell_size: int, *blocks: int) -> dict:
    summary = finalise_label_store(store, final, merged.detections, class_names, cell_size, move=False)
    return {**summary, "staged": str(store)}


def label_graph(source, merged: Delayed, class_names: list[str], out_dir: Path, token: str, tiling: Tiling,
                foreground: list, density_cell: int) -> Delayed:
    """Tasks writing ``labels.zarr``: create, one task per group of chunks that any segmented tile
    touches (in parallel, each its own chunks), then pyramid + density + rename."""
    chunk, per_task = tiling.tile_size, 4
    mpp = source.mpp * source.pixel_scale if source.mpp else None
    store = delayed(create_label_store, pure=True)(
        out_dir / "labels.zarr", source.height, source.width, chunk, class_names, source.transform, source.crs_wkt, mpp,
        per_task, dask_key_name=f"labels-create-{token}",
    )
    blocks = []
    for i, (rows, cols) in enumerate(label_blocks(source.height, source.width, chunk, per_task)):
        if any(t.rows.start < rows.stop and t.rows.stop > rows.start and t.cols.start < cols.stop and t.cols.stop > cols.start
               for t in foreground):
            blocks.append(delayed(_label_block, pure=True)(store, merged, rows, cols, dask_key_name=(f"labels-{token}", i)))
    return delayed(_label_finalise, pure=True)(
        store, out_dir / "labels.zarr", merged, class_names, density_cell, *blocks, dask_key_name=f"labels-finalise-{token}"
    )


def _write(result, source: RasterSource, class_names: list[str], out_dir: str, background: dict,
           resume_dir: str | None = None, labels: dict | None = None) -> dict:
    extra = {
        "tiles": result.tiles,
        "tiles_skipped": result.tiles_skipped + background["tiles_background"],
        "seam_candidates": result.seam_candidates,
        **background,
        **({"labels_zarr": {k: v for k, v in labels.items() if k != "staged"}} if labels else {}),
    }
    if background.get("tissue_mm2"):
        area = background["tissue_mm2"]
        extra["instances_per_mm2"] = len(result.detections) / area
        counts = np.bincount(result.detections.label.astype(np.int64), minlength=len(class_names))
        extra["per_mm2"] = {name: float(n) / area for name, n in zip(class_names, counts)}
    staged = {Path(labels["path"]): Path(labels["staged"])} if labels else {}
    summary = write_outputs(result.detections, source, class_names, Path(out_dir), extra, staged)
    if resume_dir:
        shutil.rmtree(resume_dir, ignore_errors=True)
    return summary


def foreground_tiles(source, tiles: list) -> tuple[list, dict | None]:
    """Only tiles over tissue (slides: Otsu on the thumbnail) or data (rasters: nodata / alpha
    mask of an overview); the others are never read at full resolution."""
    if not hasattr(source, "thumbnail"):
        mask, scale = valid_overview(source)
        keep = tiles_with_tissue(tiles, mask, scale)
        return [t for t, k in zip(tiles, keep) if k], {"data_fraction": float(mask.mean())}
    thumbnail, valid, scale = source.thumbnail()
    mask = tissue_mask(thumbnail, valid)
    keep = tiles_with_tissue(tiles, mask, scale)
    info = {"tissue_fraction": float(mask.mean())}
    if source.mpp:
        info["tissue_mm2"] = tissue_area_mm2(mask, scale * source.pixel_scale * source.mpp)
    return [t for t, k in zip(tiles, keep) if k], info


def image_graph(
    source: RasterSource,
    model_dir: str,
    class_names: list[str],
    out_dir: str | Path,
    tiling: Tiling,
    gpu: bool = False,
    resume_dir: str | Path | None = None,
    labels: bool = False,
    density_cell: int = 256,
) -> ImageGraph:
    """Build (not run) the graph that segments ``source`` and writes its outputs to ``out_dir``.

    With ``resume_dir``, every segmented batch is kept there until the outputs are written, and
    batches already there (from an interrupted run with the same configuration) are loaded
    instead of read and segmented again. With ``labels``, ``labels.zarr`` (instance and class
    rasters with a pyramid, density grids of ``density_cell`` pixels) is written too."""
    grid = TileGrid(source.height, source.width, tiling.tile_size, tiling.overlap)
    tiles = grid.tiles
    token = tokenize(source, model_dir, tiling, str(out_dir), labels, density_cell)
    foreground, tissue = foreground_tiles(source, tiles) if tiling.tissue_mask else (tiles, None)
    batches, resumed = [], 0
    for b, start in enumerate(range(0, len(foreground), tiling.batch_size)):
        kept = Path(resume_dir) / f"batch-{b:06d}.npz" if resume_dir else None
        if kept is not None and kept.is_file():
            batches.append(delayed(load_batch, pure=True)(kept, dask_key_name=(f"resume-{token}", b)))
            resumed += 1
            continue
        indices = tuple(t.index for t in foreground[start : start + tiling.batch_size])  # tiles travel as indices
        pixels = delayed(read_batch, pure=True)(source, grid, indices, dask_key_name=(f"read-{token}", b))
        with dask.annotate(resources={"GPU": 1} if gpu else {}):
            flips = tiling.test_time_flips
            segment = (segment_batch, pixels, model_dir, flips) if kept is None else (segment_and_keep, pixels, model_dir, flips, str(kept))
            batches.append(delayed(segment[0], pure=True)(*segment[1:], dask_key_name=(f"segment-{token}", b)))
    merged = delayed(merge_image, pure=True)(batches, grid, tiling.match_iou, dask_key_name=f"merge-{token}")
    background = {"tiles_background": len(tiles) - len(foreground), "batches_resumed": resumed, **(tissue or {})}
    label_store = (
        label_graph(source, merged, class_names, Path(out_dir), token, tiling, foreground, density_cell) if labels else None
    )
    result = delayed(_write, pure=True)(
        merged, source, class_names, str(out_dir), background, str(resume_dir) if resume_dir else None, label_store,
        dask_key_name=f"write-{token}",
    )
    return ImageGraph(source=source, batches=batches, merged=merged, result=result)
