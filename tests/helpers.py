"""Ground truth and scoring helpers shared by the tests (real computations, no fixtures on disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import shapely

from models.card import ModelCard, save_variant
from models.inference import MaskCrop, TileInstances
from models.registry import resolve_model_dir
from pipeline.grid import Tile
from pipeline.polygons import mask_to_polygon


def label_polygons(labels: np.ndarray) -> dict[int, shapely.Polygon]:
    """Exact pixel-edge polygon of every instance of a label image."""
    polygons = {}
    for instance in np.unique(labels[labels > 0]):
        rows, cols = np.nonzero(labels == instance)
        r0, c0 = rows.min(), cols.min()
        crop = labels[r0 : rows.max() + 1, c0 : cols.max() + 1] == instance
        polygons[int(instance)] = mask_to_polygon(crop, int(r0), int(c0))
    return polygons


def four_connected(labels: np.ndarray) -> np.ndarray:
    """``labels`` with every instance cut to its largest 4-connected part: the object as its polygon
    defines it (generated shapes can carry pixels joined only at a corner)."""
    from scipy import ndimage

    out = np.zeros_like(labels)
    for instance, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        parts, count = ndimage.label(labels[found] == instance)
        largest = 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))
        out[found][parts == largest] = instance
    return out


def perfect_tile_instances(labels: np.ndarray, classes: np.ndarray, tile: Tile) -> TileInstances:
    """What a perfect model returns for one tile: every instance's mask inside the window."""
    window = labels[tile.rows.start : tile.rows.stop, tile.cols.start : tile.cols.stop]
    ids = np.unique(window[window > 0])
    masks, boxes = [], []
    for instance in ids:
        rows, cols = np.nonzero(window == instance)
        r0, c0 = rows.min(), cols.min()
        masks.append(MaskCrop(int(r0), int(c0), window[r0 : rows.max() + 1, c0 : cols.max() + 1] == instance))
        boxes.append([c0, r0, cols.max() + 1, rows.max() + 1])
    return TileInstances(
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=classes[ids - 1].astype(np.int16) if len(ids) else np.empty(0, np.int16),
        scores=np.ones(len(ids), np.float32),
        masks=masks,
    )


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Polygon IoU between every geometry of ``a`` and of ``b`` (sparse pairs via STRtree)."""
    out = np.zeros((len(a), len(b)))
    if len(a) == 0 or len(b) == 0:
        return out
    i, j = shapely.STRtree(b).query(a, predicate="intersects")
    inter = shapely.area(shapely.intersection(a[i], b[j]))
    out[i, j] = inter / (shapely.area(a[i]) + shapely.area(b[j]) - inter)
    return out


def match_f1(predicted: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> float:
    """F1 of one-to-one matches at IoU ≥ ``threshold`` (≥ 0.5). An output can match only one of
    several disjoint true objects there, but two overlapping outputs can match the same object:
    only one of them counts."""
    if threshold < 0.5:
        raise ValueError("matches are one-to-one only for IoU thresholds of 0.5 or more")
    hits = iou_matrix(predicted, truth) >= threshold
    tp = min(int((hits.sum(1) > 0).sum()), int((hits.sum(0) > 0).sum()))
    return 2 * tp / max(len(predicted) + len(truth), 1)


def seam_errors(predicted: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """(duplicates, splits): output pairs with IoU > 0.3, and true objects that two outputs cover.

    An output covers an object when at least half of the output lies on it.
    """
    self_iou = iou_matrix(predicted, predicted)
    np.fill_diagonal(self_iou, 0)
    duplicates = int((np.triu(self_iou) > 0.3).sum())
    splits = 0
    if len(predicted) and len(truth):
        i, j = shapely.STRtree(truth).query(predicted, predicate="intersects")
        inter = shapely.area(shapely.intersection(predicted[i], truth[j]))
        covers = inter >= 0.5 * shapely.area(predicted[i])
        per_truth = np.bincount(j[covers], minlength=len(truth))
        splits = int((per_truth >= 2).sum())
    return duplicates, splits


def model_variant(directory: Path, model: str, **changes) -> ModelCard:
    """A model directory at ``directory``: the shipped ``model``'s card with ``changes``, its weights linked."""
    return save_variant(resolve_model_dir(model), directory, **changes)
