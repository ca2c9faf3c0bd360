"""Score a model on whole annotated images through the full pipeline (tiling + seam merge)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import dask
from affine import Affine
import numpy as np
import pyogrio
import shapely
from rasterio import features

from models.card import ModelCard
from pipeline import metrics
from pipeline.annotations import AnnotatedImage, pixels_at_resolution
from pipeline.graph import Tiling, image_graph
from pipeline.sources import open_raster
from pipeline.synthetic_raster import write_geotiff
from pipeline.writers import INSTANCES_LAYER, atomic_path


def predicted_labels(gpkg: Path, height: int, width: int) -> tuple[np.ndarray, dict, dict]:
    """Rasterise pipeline polygons (pixel space) to a label image; smaller instances on top."""
    frame = pyogrio.read_dataframe(gpkg, layer=INSTANCES_LAYER)
    labels = np.zeros((height, width), np.int32)
    if len(frame):
        order = np.argsort(-shapely.area(frame.geometry.values), kind="stable")
        shapes = ((frame.geometry.values[i], int(frame["instance_id"].iloc[i])) for i in order)
        labels = features.rasterize(shapes, out_shape=(height, width), dtype="int32")
    scores = dict(zip(frame["instance_id"].astype(int), frame["score"].astype(float)))
    classes = dict(zip(frame["instance_id"].astype(int), frame["class_id"].astype(int)))
    return labels, scores, classes


def without_ignored(pred: np.ndarray, scores: dict, classes: dict, ignore: np.ndarray | None, share: float = 0.5):
    """Predictions less than ``share`` of whose pixels lie in ``ignore`` (COCO's rule for crowd
    regions: a detection on one is neither a true nor a false positive)."""
    if ignore is None or not pred.any():
        return pred, scores, classes
    inside = np.bincount(pred[ignore], minlength=pred.max() + 1)
    total = np.maximum(np.bincount(pred.ravel(), minlength=pred.max() + 1), 1)
    dropped = inside / total >= share
    dropped[0] = False
    pred = np.where(dropped[pred], 0, pred)
    gone = set(np.flatnonzero(dropped).tolist())
    return pred, {k: v for k, v in scores.items() if k not in gone}, {k: v for k, v in classes.items() if k not in gone}


def segment_samples(samples: list[AnnotatedImage], model_dir: Path, card: ModelCard, work: Path, tiling: Tiling) -> list[Path]:
    """Run the pipeline on each sample's pixels (written as 8-bit images, so scaling is identical),
    resampled to the model's resolution when both are known; polygons come back in the sample's pixels."""
    from models.inference import default_device  # the model runs in this process

    tiling = tiling.for_workers(default_device().type == "cuda")
    work.mkdir(parents=True, exist_ok=True)
    graphs = []
    for sample in samples:
        pixels = sample.image
        if card.resolution and sample.resolution and card.resolution_unit == sample.resolution_unit:
            pixels = pixels_at_resolution(sample, card.resolution)
        height, width = sample.labels.shape
        transform = Affine.scale(width / pixels.shape[1], height / pixels.shape[0])
        (work / sample.name).parent.mkdir(parents=True, exist_ok=True)  # a name may be a path (COCO's folders)
        image_path = write_geotiff(pixels, work / f"{sample.name}.tif", crs=None, transform=transform)
        graphs.append(image_graph(open_raster(image_path), str(model_dir), card.classes, work / sample.name, tiling))
    dask.compute([g.result for g in graphs], scheduler="sync")
    return [work / s.name / "instances.gpkg" for s in samples]


def precision_recall_curve(
    per_image: list[tuple[np.ndarray, np.ndarray, dict]], total_true: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at IoU > 0.5 as the score threshold falls, over all images, and the
    score of each point (keeping instances scored at least that)."""
    scores, hits = [], []
    for pred, true, pred_scores in per_image:
        matched = {p for p, _, _ in metrics.match(pred, true, 0.5)}
        for instance, score in pred_scores.items():
            scores.append(score)
            hits.append(instance in matched)
    order = np.argsort(-np.asarray(scores), kind="stable")
    tp = np.cumsum(np.asarray(hits, float)[order])
    precision = tp / np.arange(1, len(tp) + 1)
    recall = tp / max(total_true, 1)
    return precision, recall, np.asarray(scores, float)[order]


def best_threshold(precision: np.ndarray, recall: np.ndarray, thresholds: np.ndarray, floor: float | None = None) -> dict:
    """The score threshold that maximises F1@0.5 along the curve (ties: the higher threshold), to
    3 decimals rounded down; None when no threshold finds a true object. ``floor`` is the threshold
    the predictions were made at: when the best keeps every prediction, nothing here argues for a
    higher one (a clean image whose objects all score 0.999 would otherwise ask for 0.999)."""
    if len(thresholds) == 0:
        return {"score_threshold": None, "f1": 0.0}
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    # only points where the threshold changes are reachable by a cut on score
    last_of_score = np.r_[thresholds[1:] != thresholds[:-1], True]
    best = int(np.flatnonzero(last_of_score)[np.argmax(f1[last_of_score])])
    if f1[best] == 0:  # no true positive at any threshold (no ground truth, or nothing found): nothing to calibrate
        return {"score_threshold": None, "f1": 0.0}
    cut = np.floor(thresholds[best] * 1000) / 1000  # 3 decimals, rounded down: the best cut keeps its predictions
    if floor is not None and best == len(thresholds) - 1:
        cut = min(cut, floor)
    return {"score_threshold": float(cut), "f1": float(f1[best]),
            "precision": float(precision[best]), "recall": float(recall[best])}


def _finite_or_null(value):
    """``value`` with NaN and infinities as None: JSON has no NaN (strict parsers reject it)."""
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def evaluate(samples: list[AnnotatedImage], model_dir: Path, card: ModelCard, out: Path, tiling: Tiling) -> dict:
    """Per-image and dataset metrics; writes ``report.json``, ``report.md`` and ``pr_curve.png``.

    Dataset classes are matched to the model's by name, in any order; when a dataset class with
    instances in ``samples`` is not among the model's, instances are scored class-agnostically
    (a listed class without instances, as COCO exports keep them, changes nothing).
    """
    out.mkdir(parents=True, exist_ok=True)
    names = samples[0].class_names if samples else []
    present = set(np.concatenate([s.classes for s in samples]).tolist()) if samples else set()
    unmatched = [n for k, n in enumerate(names) if n not in card.classes and k in present]
    agnostic = bool(unmatched)
    if agnostic:
        warnings.warn(
            f"dataset class(es) {', '.join(unmatched)} not among the model's ({', '.join(card.classes)}; names must match "
            "exactly, letter case included): scored class-agnostically", stacklevel=2,
        )
    model_class = [0 if agnostic else card.classes.index(n) if n in card.classes else -1 for n in names]
    class_names = ["instance"] if agnostic else card.classes
    gpkgs = segment_samples(samples, model_dir, card, out / "predictions", tiling)
    per_image, coco_inputs, curves, total_true = [], [], [], 0
    for sample, gpkg in zip(samples, gpkgs):
        pred, scores, classes = without_ignored(*predicted_labels(gpkg, *sample.labels.shape), sample.ignore)
        true_classes = {i + 1: model_class[c] for i, c in enumerate(sample.classes)}
        if agnostic:
            classes, true_classes = {k: 0 for k in classes}, {k: 0 for k in true_classes}
        result = metrics.evaluate_image(pred, sample.labels, scores, classes, true_classes, class_names)
        result["image"] = sample.name
        per_image.append(result)
        coco_inputs.append({"pred": pred, "pred_scores": scores, "pred_classes": classes, "true": sample.labels, "true_classes": true_classes})
        curves.append((pred, sample.labels, scores))
        total_true += len(np.unique(sample.labels[sample.labels > 0]))
    report = {
        "model": card.name,
        "class_agnostic": agnostic,
        "unmatched_classes": unmatched,
        "images": [s.name for s in samples],
        "tiling": {"tile_size": tiling.tile_size, "overlap": tiling.overlap},
        "summary": metrics.summarise(per_image),
        "coco": metrics.coco_map(coco_inputs),
        "per_image": per_image,
    }
    precision, recall, thresholds = precision_recall_curve(curves, total_true)
    report["calibration"] = {"card_score_threshold": card.score_threshold, **best_threshold(precision, recall, thresholds, card.score_threshold)}
    _plot_pr(precision, recall, out / "pr_curve.png")
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(_finite_or_null(report), indent=2, default=float, allow_nan=False))
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown_report(report))
    return report


def markdown_report(report: dict) -> str:
    s, coco = report["summary"], report["coco"]
    lines = [
        f"# Evaluation of `{report['model']}`",
        "",
        f"{len(report['images'])} images, whole-image pipeline (tile {report['tiling']['tile_size']}, "
        f"overlap {report['tiling']['overlap']}, seam merge).",
        "",
        *([f"Classes ignored: the dataset's {', '.join(report['unmatched_classes'])} are not among the model's classes, "
           "so every instance is scored as one class.", ""] if report["class_agnostic"] else []),
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in _flat(s).items()]
    lines += [f"| {k} | {v:.4f} |" for k, v in coco.items()]
    lines += ["", "| image | F1@0.5 | PQ | AJI | predicted | true |", "|---|---|---|---|---|---|"]
    for r in report["per_image"]:
        o = r["overall"]
        lines.append(
            f"| {r['image']} | {o['f1']:.3f} | {o['pq']:.3f} | {o['aji']:.3f} | {o['predicted']} | {o['true']} |"
        )
    return "\n".join(lines) + "\n"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plot_pr(precision: np.ndarray, recall: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.plot(recall, precision, linewidth=1.5)
    axis.set_xlabel("recall")
    axis.set_ylabel("precision")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_title("precision–recall at IoU 0.5")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
