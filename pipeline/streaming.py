"""One image's merge and writes, a band of tile rows at a time: the chain of ``merge`` tasks.

Each step merges a band's batch results with what the bands above left pending
(``stages.merge_grid_band``), stages the instances it released as a Parquet part, adds them to
the counts and the density grid, and rasterises the rows of ``labels.zarr`` that no later
instance can reach. So memory holds about one band of instances, however large the image.
labels.zarr and the final GeoPackage are written in the worker's side process
(``pipeline.side_process``): in the merge's thread those calls would hold the GIL that the
inference threads beside them need (the next image's, for the GeoPackage of an archive's image).
``finalise_labels`` completes labels.zarr; ``finish_image`` streams the parts into the GeoPackage
and commits every output at once. A step that runs again (a retry, a lost worker) rewrites the same part and blocks: steps are
idempotent.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline import side_process
from pipeline.detections import Detections
from pipeline.grid import Span, Tile, TileGrid
from pipeline.label_store import density_grid, finalise_label_store, label_blocks, write_label_blocks
from pipeline.sources import RasterSource
from pipeline.stages import BatchResult, SeamState, merge_grid_band
from pipeline.writers import write_outputs, write_part


@dataclass(frozen=True)
class LabelRaster:
    """Where ``labels.zarr`` is staged and which of its blocks (``block`` pixels square, the
    regions of ``label_store.label_blocks``) any segmented tile touches."""

    store: Path
    block: int
    touched: np.ndarray  # (block rows, block columns) bool: ``touched_blocks``
    cell_size: int  # of the density grid


def touched_blocks(height: int, width: int, block: int, tiles: list[Tile]) -> np.ndarray:
    """(block rows, block columns): does any of ``tiles``' windows meet the block?"""
    touched = np.zeros((-(-height // block), -(-width // block)), bool)
    for t in tiles:
        touched[t.rows.start // block : -(-t.rows.stop // block), t.cols.start // block : -(-t.cols.stop // block)] = True
    return touched


@dataclass
class ImageStream:
    """What the chain carries from one band to the next: small, whatever the image's size."""

    seams: SeamState
    counts: np.ndarray  # instances released, per class
    density: np.ndarray | None  # their density grid, when labels.zarr is written
    parts: list[str]
    unlabelled: Detections  # released instances that reach below the label rows written
    unlabelled_ids: np.ndarray
    labelled_rows: int = 0
    tiles_skipped: int = 0
    seam_candidates: int = 0
    segment_seconds: float = 0.0  # its batches' own time, summed (over threads and runs resumed)


def start_image(parts_dir: Path, n_classes: int, height: int, width: int, labels: LabelRaster | None) -> ImageStream:
    """An empty stream, with a fresh (hidden) directory for the parts."""
    for stale in parts_dir.parent.glob(".instances-parts.*"):  # left by a run that died before writing
        shutil.rmtree(stale, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    density = None
    if labels:
        density = np.zeros((n_classes, -(-height // labels.cell_size), -(-width // labels.cell_size)), np.uint32)
    return ImageStream(SeamState.start(), np.zeros(n_classes, np.int64), density, [], Detections.empty(), np.empty(0, np.int64))


def _label_rows(stream: ImageStream, labels: LabelRaster, ready: float, height: int, width: int) -> int:
    """Rasterise the blocks of whole block rows above ``ready`` (``inf``: all the rest); return
    how far the written rows now reach."""
    reach = height if math.isinf(ready) else min(int(ready) // labels.block * labels.block, height)
    blocks = [
        (rows, cols) for rows, cols in label_blocks(height, width, labels.block, 1)
        if stream.labelled_rows <= rows.start < reach and labels.touched[rows.start // labels.block, cols.start // labels.block]
    ]
    if blocks:
        reaching = np.flatnonzero(stream.unlabelled.bounds[:, 1] < reach)  # the others start below these blocks
        side_process.call(write_label_blocks, labels.store, stream.unlabelled.take(reaching), stream.unlabelled_ids[reaching], blocks)
    return max(reach, stream.labelled_rows)


def merge_step(
    stream: ImageStream, results: list[BatchResult], grid: TileGrid, band: Span, min_iou: float,
    source: RasterSource, class_names: list[str], parts_dir: Path, labels: LabelRaster | None,
) -> ImageStream:
    """Merge tile rows ``band`` (after every band above it), stage what it released, and write the
    label rows nothing later can reach."""
    seams, released = merge_grid_band(stream.seams, results, grid, band, min_iou)
    first_id = stream.seams.numbered + 1
    part = write_part(released, first_id, source, class_names, parts_dir / f"part-{band.start:07d}.parquet")
    n_classes = len(class_names)
    stream = replace(
        stream,
        seams=seams,
        counts=stream.counts + np.bincount(released.label.astype(np.int64), minlength=n_classes),
        parts=[*stream.parts, str(part)],
        tiles_skipped=stream.tiles_skipped + sum(r.tiles_skipped for r in results),
        seam_candidates=stream.seam_candidates + sum(len(r.candidates) for r in results),
        segment_seconds=stream.segment_seconds + sum(r.seconds for r in results),
    )
    if labels is None:
        return stream
    stream.density = stream.density + density_grid(released, n_classes, grid.height, grid.width, labels.cell_size)
    stream.unlabelled = Detections.concat([stream.unlabelled, released])
    stream.unlabelled_ids = np.concatenate([stream.unlabelled_ids, np.arange(first_id, first_id + len(released))])
    stream.labelled_rows = _label_rows(stream, labels, seams.settled_rows, grid.height, grid.width)
    still = np.flatnonzero(stream.unlabelled.bounds[:, 3] > stream.labelled_rows)
    stream.unlabelled, stream.unlabelled_ids = stream.unlabelled.take(still), stream.unlabelled_ids[still]
    return stream


def finalise_labels(stream: ImageStream, labels: LabelRaster, class_names: list[str], out_dir: Path) -> dict:
    """The rest of ``labels.zarr`` (coarser levels, density, metadata), left staged for
    ``finish_image`` to move into place with the other outputs."""
    final = out_dir / "labels.zarr"
    summary = side_process.call(finalise_label_store, labels.store, final, stream.density, class_names, labels.cell_size, False)
    return {**summary, "staged": str(labels.store)}


def finish_image(
    stream: ImageStream, source: RasterSource, class_names: list[str], out_dir: Path, parts_dir: Path,
    extra: dict, labels: dict | None, resume_dir: Path | None,
) -> dict:
    """Stream the parts into the outputs and commit them all at once, with ``labels.zarr`` when
    ``labels`` (``finalise_labels``) says where it is staged (``writers.write_outputs``); then drop
    the parts and the kept batches."""
    if len(stream.seams.pending) or len(stream.seams.held):
        raise RuntimeError(f"{source.path}: the merge ended with instances not released (bands out of order?)")
    extra = {**extra, "tiles_skipped": extra.get("tiles_skipped", 0) + stream.tiles_skipped,
             "seam_candidates": stream.seam_candidates, "segment_seconds": round(stream.segment_seconds, 2)}
    staged = {}
    if labels is not None:
        extra["labels_zarr"] = {k: v for k, v in labels.items() if k != "staged"}
        staged[Path(labels["path"])] = Path(labels["staged"])
    if extra.get("tissue_mm2"):
        area = extra["tissue_mm2"]
        extra["instances_per_mm2"] = float(stream.counts.sum()) / area
        extra["per_mm2"] = {name: float(n) / area for name, n in zip(class_names, stream.counts)}
    parts = [Path(p) for p in stream.parts]
    summary = side_process.call(write_outputs, parts, stream.counts, source, class_names, out_dir, extra, staged)
    shutil.rmtree(parts_dir, ignore_errors=True)
    if resume_dir:
        shutil.rmtree(resume_dir, ignore_errors=True)
    return summary
