"""The Dask graph of one image: ``read`` and ``segment`` per tile batch, ``merge`` per band of
tile rows (a chain, top to bottom), then ``write``.

Task keys start with the stage name, so the dashboard's task stream and progress read
``read``, ``segment``, ``merge`` and ``write``. The model travels as a directory path; each worker
loads it once (``models.inference.cached_segmenter``) and reuses it.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import dask
from dask.base import tokenize
from dask.delayed import Delayed, delayed

from pipeline.grid import TileGrid
from pipeline.sources import RasterSource, valid_overview
from pipeline.label_store import create_label_store, discard_unfinished
from pipeline.stages import read_batch, resume_batch, segment_and_keep, segment_batch
from pipeline.streaming import LabelRaster, finalise_labels, finish_image, merge_step, start_image, touched_blocks
from pipeline.tissue import tiles_with_tissue, tissue_area_mm2, tissue_mask_at_scale
from pipeline.writers import remove, temporaries


CPU_BATCH_SIZE = 4  # a CPU thread runs a batch's tiles one by one: the batch only sets the task size
GPU_BATCH_SIZE = 16  # an H100 ran 18 ms a 512² tile at batch 1, 7.1 at 8, 6.1 at 16 (README; benchmarks/batch_sweep.py)


@dataclass(frozen=True)
class Tiling:
    tile_size: int
    overlap: int
    batch_size: int | None = None  # None: CPU_BATCH_SIZE, or GPU_BATCH_SIZE where segment tasks run on GPU workers
    match_iou: float = 0.5
    tissue_mask: bool = True  # slides: only tiles over tissue (False: every tile with data)
    test_time_flips: bool | None = None  # None: as the model card says

    def __post_init__(self) -> None:
        if self.tile_size % 32 or not 64 <= self.tile_size <= 4096:
            raise ValueError(f"tile size {self.tile_size} must be a multiple of 32 between 64 and 4096")
        if not 1 <= self.overlap < self.tile_size // 2:  # objects cut by a seam are matched in pixels both tiles see
            raise ValueError(f"overlap {self.overlap} must be in [1, tile size / 2): a seam's halves are matched where tiles overlap")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size {self.batch_size} must be at least 1")
        if not 0 < self.match_iou <= 1:
            raise ValueError(f"match IoU {self.match_iou} must be in (0, 1]")

    def for_workers(self, gpu: bool) -> Tiling:
        """This tiling with its batch size set: the default for CPU or GPU workers if none was given."""
        if self.batch_size is not None:
            return self
        return replace(self, batch_size=GPU_BATCH_SIZE if gpu else CPU_BATCH_SIZE)


@dataclass
class ImageGraph:
    """Delayed handles of one image: ``batches`` (for progress) and ``result`` (the summary)."""

    source: RasterSource
    batches: list[Delayed]
    result: Delayed
    bands: int  # bands of tile rows: the priorities the graph's tiles took


PARTS_PREFIX = ".instances-parts."  # the merge's staged Parquet parts, until the write commits them
MIN_BAND_TILES = 64  # tiles per band of the merge (the last rows taper): the instances held at a time scale with it (16 tried: BENCHMARKS.md)
MERGE_PRIORITY = 2**30  # merge, labels and write tasks run before any tile that is ready too
LABEL_CHUNKS_PER_BLOCK = 4  # labels.zarr is rasterised in blocks of 4 × 4 chunks of a tile side


def foreground_tiles(source, tiles: list, tissue: bool = True) -> tuple[list, dict | None]:
    """Only tiles over tissue (slides: ``pipeline.tissue`` on the thumbnail; without ``tissue``,
    any pixel the slide has) or data (rasters: nodata / alpha mask of an overview); the others are
    never read at full resolution."""
    if not hasattr(source, "thumbnail"):
        mask, scale = valid_overview(source)
        if not mask.any():
            warnings.warn(f"{source.path}: no valid pixel (all nodata, NaN, transparent or masked): nothing to segment", stacklevel=2)
        keep = tiles_with_tissue(tiles, mask, scale)
        return [t for t, k in zip(tiles, keep) if k], {"data_fraction": float(mask.mean())}
    thumbnail, valid, scale = source.thumbnail()
    pixel_um = scale * source.pixel_scale * math.sqrt(source.mpp_sides[0] * source.mpp_sides[1]) if source.mpp else None
    mask = tissue_mask_at_scale(thumbnail, valid, pixel_um) if tissue else valid
    if valid.any() and not mask.any():
        warnings.warn(f"{source.path}: no tissue found on the thumbnail: nothing to segment (--no-tissue reads every tile)", stacklevel=2)
    keep = tiles_with_tissue(tiles, mask, scale)
    info = {"tissue_fraction": float(mask.mean())}
    if pixel_um:
        info["tissue_mm2"] = tissue_area_mm2(mask, pixel_um)
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
    priority: int = 0,
) -> ImageGraph:
    """Build (not run) the graph that segments ``source`` and writes its outputs to ``out_dir``.

    Tiles are read and segmented in batches; a chain of ``merge`` tasks, one per band of tile rows
    from the top, merges each band as soon as its batches are done and stages what it released
    (``pipeline.streaming``), so no task ever holds the whole image's instances; ``write`` commits
    the outputs. With ``resume_dir``, every segmented batch is kept there until the outputs are
    written, and batches already there (from an interrupted run with the same configuration) are
    loaded instead of read and segmented again. With ``labels``, ``labels.zarr`` (instance and
    class rasters with a pyramid, density grids of ``density_cell`` pixels) is written too.

    On a distributed scheduler, band ``k``'s tiles run at ``priority - k`` and the merge as soon
    as it can (the threaded and synchronous schedulers ignore priorities: memory is then not
    bounded by a band). Images of one run take consecutive ranges (``ImageGraph.bands``), so an
    archive goes image by image rather than all at once."""
    out_dir = Path(out_dir)
    tiling = tiling.for_workers(gpu)
    grid = TileGrid(source.height, source.width, tiling.tile_size, tiling.overlap)
    tiles = grid.tiles
    token = tokenize(source, model_dir, tiling, str(out_dir), labels, density_cell)
    foreground, tissue = foreground_tiles(source, tiles, tiling.tissue_mask)
    label_raster = None
    if labels:
        store = delayed(create_label_store, pure=True)(
            out_dir / "labels.zarr", source.height, source.width, tiling.tile_size, class_names, source.transform,
            source.crs_wkt, source.mpp_sides, LABEL_CHUNKS_PER_BLOCK, dask_key_name=f"labels-create-{token}",
        )
        block = tiling.tile_size * LABEL_CHUNKS_PER_BLOCK
        touched = touched_blocks(source.height, source.width, block, foreground)
        label_raster = delayed(LabelRaster, pure=True)(store, block, touched, density_cell, dask_key_name=f"labels-blocks-{token}")
    parts_dir = out_dir / f"{PARTS_PREFIX}{token}"
    stream = delayed(start_image, pure=True)(
        parts_dir, len(class_names), source.height, source.width, label_raster, dask_key_name=f"merge-start-{token}"
    )
    batches, resumed = [], 0
    bands = grid.row_bands(MIN_BAND_TILES)
    # batches run on in row-major order across bands, so only the image's last may be short;
    # each is merged with its first tile's band
    band_tops, batches_by_band = [band.start for band in bands], [[] for _ in bands]
    for start in range(0, len(foreground), tiling.batch_size):
        batch = foreground[start : start + tiling.batch_size]
        batches_by_band[bisect.bisect_right(band_tops, batch[0].row) - 1].append(batch)
    for k, (band, band_tiles) in enumerate(zip(bands, batches_by_band)):
        band_batches = []
        for batch in band_tiles:
            indices = tuple(t.index for t in batch)  # tiles travel as indices
            kept = Path(resume_dir) / f"batch-{indices[0]:08d}-{len(indices)}.npz" if resume_dir else None
            b = len(batches) + len(band_batches)
            with dask.annotate(priority=priority - k):  # bands in order, so the merge can follow them
                if kept is not None and kept.is_file():
                    band_batches.append(delayed(resume_batch, pure=True)(
                        str(kept), source, grid, indices, model_dir, tiling.test_time_flips, dask_key_name=(f"resume-{token}", b)))
                    resumed += 1
                    continue
                pixels = delayed(read_batch, pure=True)(source, grid, indices, dask_key_name=(f"read-{token}", b))
                with dask.annotate(resources={"GPU": 1} if gpu else {}):
                    flips = tiling.test_time_flips
                    segment = (segment_batch, pixels, model_dir, flips) if kept is None else (segment_and_keep, pixels, model_dir, flips, str(kept))
                    band_batches.append(delayed(segment[0], pure=True)(*segment[1:], dask_key_name=(f"segment-{token}", b)))
        batches += band_batches
        with dask.annotate(priority=MERGE_PRIORITY):  # as soon as a band is segmented: it frees its results
            stream = delayed(merge_step, pure=True)(
                stream, band_batches, grid, band, tiling.match_iou, source, class_names, parts_dir, label_raster,
                dask_key_name=(f"merge-{token}", k),
            )
    extra = {
        "tiles": len(tiles), "tiles_skipped": len(tiles) - len(foreground),
        "tiles_background": len(tiles) - len(foreground), "batches_resumed": resumed, **(tissue or {}),
    }
    with dask.annotate(priority=MERGE_PRIORITY):
        labelled = None
        if labels:
            labelled = delayed(finalise_labels, pure=True)(
                stream, label_raster, class_names, out_dir, dask_key_name=f"labels-finalise-{token}"
            )
        result = delayed(finish_image, pure=True)(
            stream, source, class_names, out_dir, parts_dir, extra, labelled, Path(resume_dir) if resume_dir else None,
            dask_key_name=f"write-{token}",
        )
    return ImageGraph(source=source, batches=batches, result=result, bands=len(bands))


def discard_staging(out_dir: Path) -> None:
    """Remove what a failed or interrupted image's graph staged in ``out_dir`` (merge parts, an
    unfinished labels.zarr, files half written under a temporary name); the batches a resumable run
    keeps stay, and so do earlier outputs, a set-aside labels.zarr (``.old``) included. The folder
    goes too when nothing is left in it. Only once no task of the image runs."""
    for parts in out_dir.glob(f"{PARTS_PREFIX}*"):
        shutil.rmtree(parts, ignore_errors=True)
    discard_unfinished(out_dir / "labels.zarr")
    for path in temporaries(out_dir, kinds=("tmp",)):
        remove(path)
    with contextlib.suppress(OSError):
        out_dir.rmdir()
