"""Instance-segmentation scores on label images: detection F1, PQ, AJI, counting error, COCO mAP.

Inputs are instance label images: non-negative integer arrays of one shape, 0 = background, each
positive id one instance. Every score comes from one sparse table of overlapping (prediction,
truth) pairs, built by a single ``np.unique`` over paired labels, so an image with thousands of
instances costs one sort of its pixels.

Conventions: a match needs IoU strictly above its threshold. A ratio whose denominator is zero is
1.0 when both images are empty and 0.0 otherwise; the relative counting error with no true
instances (and some predicted) is NaN, i.e. undefined.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class Overlaps:
    """Sparse overlap table of a predicted and a true label image.

    ``pred_ids`` / ``true_ids``: the sorted positive ids present; ``pred_areas`` / ``true_areas``:
    their pixel counts. ``pair_pred`` / ``pair_true``: indices into those arrays of every pair of
    instances that share pixels; ``pair_inter``: how many.
    """

    pred_ids: np.ndarray
    true_ids: np.ndarray
    pred_areas: np.ndarray
    true_areas: np.ndarray
    pair_pred: np.ndarray
    pair_true: np.ndarray
    pair_inter: np.ndarray

    @property
    def pair_iou(self) -> np.ndarray:
        union = self.pred_areas[self.pair_pred] + self.true_areas[self.pair_true] - self.pair_inter
        return self.pair_inter / union


def _check(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"predicted labels {pred.shape} and true labels {true.shape} differ in shape")
    for name, labels in (("predicted", pred), ("true", true)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name} labels must be an integer label image, not {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise ValueError(f"{name} labels hold negative ids")
    return pred, true


def overlaps(pred: np.ndarray, true: np.ndarray) -> Overlaps:
    """The sparse overlap table of two label images (one sort of the paired pixels)."""
    pred, true = _check(pred, true)
    if pred.size == 0:
        empty = np.zeros(0, np.int64)
        return Overlaps(empty, empty, empty, empty, empty, empty, empty)
    base = int(true.max()) + 1
    if int(pred.max()) >= np.iinfo(np.int64).max // base:
        raise ValueError("label ids too large to pair in 64 bits")
    keys, counts = np.unique(pred.astype(np.int64).ravel() * base + true.ravel(), return_counts=True)
    p, t = np.divmod(keys, base)
    pred_ids, p_index = np.unique(p, return_inverse=True)
    true_ids, t_index = np.unique(t, return_inverse=True)
    pred_areas = np.zeros(len(pred_ids), np.int64)
    true_areas = np.zeros(len(true_ids), np.int64)
    np.add.at(pred_areas, p_index, counts)
    np.add.at(true_areas, t_index, counts)
    # Ids are sorted, so background (0), when present, is entry 0 of each table.
    p_shift, t_shift = int(pred_ids[0] == 0), int(true_ids[0] == 0)
    both = (p > 0) & (t > 0)
    return Overlaps(
        pred_ids=pred_ids[p_shift:], true_ids=true_ids[t_shift:],
        pred_areas=pred_areas[p_shift:], true_areas=true_areas[t_shift:],
        pair_pred=p_index[both] - p_shift, pair_true=t_index[both] - t_shift,
        pair_inter=counts[both].astype(np.int64),
    )


def iou_table(pred: np.ndarray, true: np.ndarray):
    """``(pred_ids, true_ids, intersection, pred_areas, true_areas)``; ``intersection`` is a dense
    (P, T) pixel-count matrix over the positive ids present."""
    ov = overlaps(pred, true)
    intersection = np.zeros((len(ov.pred_ids), len(ov.true_ids)), np.int64)
    intersection[ov.pair_pred, ov.pair_true] = ov.pair_inter
    return ov.pred_ids, ov.true_ids, intersection, ov.pred_areas, ov.true_areas


def _match(ov: Overlaps, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (into ``pred_ids``, ``true_ids``) and IoUs of the one-to-one matches."""
    if not 0 <= threshold < 1:
        raise ValueError(f"IoU threshold {threshold} must be in [0, 1)")
    iou = ov.pair_iou
    keep = iou > threshold
    p, t, iou = ov.pair_pred[keep], ov.pair_true[keep], iou[keep]
    if threshold < 0.5 and len(p):
        # Below 0.5 an instance can clear the threshold with several others: assign the most
        # matches, and among those the largest total IoU (the bonus sums to less than one match).
        rows, r = np.unique(p, return_inverse=True)
        cols, c = np.unique(t, return_inverse=True)
        gain = np.zeros((len(rows), len(cols)))
        gain[r, c] = 1 + iou / (2 * min(len(rows), len(cols)))
        table = np.zeros_like(gain)
        table[r, c] = iou
        r, c = linear_sum_assignment(gain, maximize=True)
        ok = gain[r, c] > 0
        p, t, iou = rows[r[ok]], cols[c[ok]], table[r[ok], c[ok]]
    # At 0.5 or more each instance clears the threshold with at most one other: no assignment.
    order = np.argsort(t, kind="stable")
    return p[order], t[order], iou[order]


def match(pred: np.ndarray, true: np.ndarray, threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """One-to-one ``(pred id, true id, IoU)`` matches with IoU > ``threshold``, by true id.

    Unique by construction for thresholds of 0.5 or more; below, a maximum-cardinality,
    maximum-IoU assignment (Hungarian).
    """
    ov = overlaps(pred, true)
    p, t, iou = _match(ov, threshold)
    return [(int(a), int(b), float(c)) for a, b, c in zip(ov.pred_ids[p], ov.true_ids[t], iou)]


def _ratio(num: float, den: float, both_empty: bool) -> float:
    return num / den if den else float(both_empty)


def _detection(ov: Overlaps, threshold: float) -> dict:
    tp = len(_match(ov, threshold)[0])
    n_pred, n_true = len(ov.pred_ids), len(ov.true_ids)
    empty = n_pred + n_true == 0
    return {
        "tp": tp, "fp": n_pred - tp, "fn": n_true - tp,
        "precision": _ratio(tp, n_pred, empty),
        "recall": _ratio(tp, n_true, empty),
        "f1": _ratio(2 * tp, n_pred + n_true, empty),
    }


def detection_scores(pred: np.ndarray, true: np.ndarray, threshold: float = 0.5) -> dict:
    """``tp``, ``fp``, ``fn``, ``precision``, ``recall``, ``f1`` at IoU > ``threshold``."""
    return _detection(overlaps(pred, true), threshold)


def _pq(tp: int, fp: int, fn: int, iou_sum: float) -> dict:
    empty = tp + fp + fn == 0
    sq = _ratio(iou_sum, tp, empty)
    rq = _ratio(tp, tp + 0.5 * fp + 0.5 * fn, empty)
    return {"pq": sq * rq, "sq": sq, "rq": rq, "iou_sum": float(iou_sum)}


def _panoptic(ov: Overlaps) -> dict:
    _, _, iou = _match(ov, 0.5)
    tp = len(iou)
    return _pq(tp, len(ov.pred_ids) - tp, len(ov.true_ids) - tp, float(iou.sum()))


def panoptic_quality(pred: np.ndarray, true: np.ndarray) -> dict:
    """``pq`` = ``sq`` × ``rq`` (Kirillov et al. 2019), matches at IoU > 0.5; class-agnostic.

    SQ: mean IoU of the matches; RQ: TP / (TP + FP/2 + FN/2). Also ``iou_sum`` (for pooling).
    """
    return _panoptic(overlaps(pred, true))


def _aji(ov: Overlaps) -> dict:
    c = u = 0
    if len(ov.pair_inter):
        # Each true object's best prediction: highest IoU, ties to the lowest id (argmax order).
        order = np.lexsort((ov.pair_pred, -ov.pair_iou, ov.pair_true))
        first = order[np.r_[True, np.diff(ov.pair_true[order]) != 0]]
        p, t, inter = ov.pair_pred[first], ov.pair_true[first], ov.pair_inter[first]
        c = int(inter.sum())
        u = int((ov.pred_areas[p] + ov.true_areas[t] - inter).sum())
        paired_true = np.zeros(len(ov.true_ids), bool)
        paired_true[t] = True
        paired_pred = np.zeros(len(ov.pred_ids), bool)
        paired_pred[p] = True
        u += int(ov.true_areas[~paired_true].sum() + ov.pred_areas[~paired_pred].sum())
    else:
        u = int(ov.true_areas.sum() + ov.pred_areas.sum())
    return {"aji": c / u if u else 1.0, "aji_c": c, "aji_u": u}


def aggregated_jaccard_index(pred: np.ndarray, true: np.ndarray) -> dict:
    """AJI (Kumar et al. 2017) as ``aji`` with its sums ``aji_c`` and ``aji_u``.

    Each true object takes the prediction of highest IoU (a prediction may be taken by several):
    their intersection goes to C and their union to U. A true object overlapping nothing adds its
    area to U, and so does every prediction never taken. AJI = C / U; 1.0 when both are empty.
    """
    return _aji(overlaps(pred, true))


def _count(n_pred: int, n_true: int) -> dict:
    absolute = abs(n_pred - n_true)
    relative = absolute / n_true if n_true else (0.0 if n_pred == 0 else float("nan"))
    return {"predicted": n_pred, "true": n_true, "absolute": absolute, "relative": relative}


def count_error(pred: np.ndarray, true: np.ndarray) -> dict:
    """Instance counts: ``predicted``, ``true``, ``absolute`` = |P − T|, ``relative`` = |P − T| / T."""
    pred, true = _check(pred, true)
    return _count(len(np.unique(pred[pred > 0])), len(np.unique(true[true > 0])))


def _scores(ov: Overlaps) -> dict:
    count = _count(len(ov.pred_ids), len(ov.true_ids))
    return {
        **_detection(ov, 0.5), **_panoptic(ov), **_aji(ov),
        "predicted": count["predicted"], "true": count["true"],
        "count_error": count["absolute"], "count_error_relative": count["relative"],
    }


def _class_image(labels: np.ndarray, classes: Mapping, what: str) -> np.ndarray:
    """The class id of every pixel's instance (−1 on background)."""
    if not isinstance(classes, Mapping):
        raise TypeError(f"{what} classes must be a mapping from instance id to class id")
    ids = np.unique(labels)
    missing = [int(i) for i in ids if i > 0 and int(i) not in classes]
    if missing:
        raise KeyError(f"{what} instances without a class: ids {missing[:10]}")
    of_id = np.array([int(classes[int(i)]) if i > 0 else -1 for i in ids], np.int64)
    return of_id[np.searchsorted(ids, labels)]


def evaluate_image(
    pred: np.ndarray,
    true: np.ndarray,
    pred_scores: Mapping,
    pred_classes: Mapping,
    true_classes: Mapping,
    class_names: Sequence[str],
) -> dict:
    """``{"overall": scores, "per_class": {name: scores}}`` for one image.

    ``scores``: detection at IoU > 0.5, PQ/SQ/RQ (+ ``iou_sum``), AJI (+ ``aji_c``, ``aji_u``),
    counts. ``overall`` ignores classes; class ``k`` (``class_names[k]``) keeps only the instances
    of class ``k`` in both images. Classes map instance id → class id; scores are not used here
    (they only rank detections for ``coco_map``).
    """
    pred, true = _check(pred, true)
    pred_class = _class_image(pred, pred_classes, "predicted")
    true_class = _class_image(true, true_classes, "true")
    per_class = {
        name: _scores(overlaps(np.where(pred_class == k, pred, 0), np.where(true_class == k, true, 0)))
        for k, name in enumerate(class_names)
    }
    return {"overall": _scores(overlaps(pred, true)), "per_class": per_class}


IMAGE_MEAN_KEYS = ("precision", "recall", "f1", "pq", "sq", "aji")  # also as means of per-image scores


def _pool(rows: list[dict]) -> dict:
    tp, fp, fn, predicted, true = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn", "predicted", "true"))
    c, u = sum(r["aji_c"] for r in rows), sum(r["aji_u"] for r in rows)
    empty = predicted + true == 0
    relative = [r["count_error_relative"] for r in rows if not np.isnan(r["count_error_relative"])]
    scored = [r for r in rows if r["predicted"] + r["true"]] or rows  # an image with nothing either side scores nothing
    return {
        "images": len(rows), "tp": tp, "fp": fp, "fn": fn,
        "precision": _ratio(tp, tp + fp, empty),
        "recall": _ratio(tp, tp + fn, empty),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, empty),
        **_pq(tp, fp, fn, sum(r["iou_sum"] for r in rows)),
        "aji": c / u if u else 1.0, "aji_c": c, "aji_u": u,
        "predicted": predicted, "true": true,
        "count_error_mean": float(np.mean([r["count_error"] for r in rows])),
        "count_error_relative_mean": float(np.mean(relative)) if relative else float("nan"),
        "image_mean": {k: float(np.mean([r[k] for r in scored])) for k in IMAGE_MEAN_KEYS},
    }


def summarise(per_image: list[dict]) -> dict:
    """Dataset scores from ``evaluate_image`` results, pooled over images.

    P/R/F1 from summed TP/FP/FN (micro); PQ from summed TP/FP/FN and IoU; AJI = ΣC / ΣU; mean
    absolute and mean relative counting error (the latter over images with true instances).
    ``image_mean``: P/R/F1, PQ, SQ and AJI per image, then averaged, as nuclei papers (HoVer-Net,
    MoNuSeg) report them, over images with an instance found or true. Same under ``per_class``.
    """
    if not per_image:
        raise ValueError("no images to summarise")
    summary = _pool([r["overall"] for r in per_image])
    names = list(dict.fromkeys(n for r in per_image for n in r["per_class"]))
    summary["per_class"] = {n: _pool([r["per_class"][n] for r in per_image if n in r["per_class"]]) for n in names}
    return summary


def _instance_rles(labels: np.ndarray):
    """``(id, rle)`` of every instance, encoded as a full-image mask."""
    from pycocotools import mask as mask_utils

    mask = np.zeros(labels.shape, np.uint8, order="F")
    for instance, window in enumerate(ndimage.find_objects(labels), 1):
        if window is None:
            continue
        mask[window] = labels[window] == instance
        yield instance, mask_utils.encode(mask)
        mask[window] = 0


def coco_map(images: list[dict]) -> dict:
    """COCO mask and box AP (pycocotools ``COCOeval``), up to 10,000 detections per image.

    Each item: ``pred``, ``true`` (label images), ``pred_scores``, ``pred_classes``,
    ``true_classes`` (instance id → value). Categories: the classes present. Returns ``mask_map``
    (AP@[.5:.95]), ``mask_ap50``, ``mask_ap75`` and the same for ``box``: class means over
    categories with true instances (area 'all', maxDets 10,000); NaN when there are none.
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    entries, truth, found = [], [], []
    for n, im in enumerate(images, 1):
        pred, true = _check(im["pred"], im["true"])
        entries.append({"id": n, "height": true.shape[0], "width": true.shape[1]})
        for labels, classes, out, what in ((true, im["true_classes"], truth, "true"), (pred, im["pred_classes"], found, "predicted")):
            for instance, rle in _instance_rles(labels):
                if instance not in classes:
                    raise KeyError(f"{what} instance {instance} of image {n} has no class")
                annotation = {
                    "id": len(out) + 1, "image_id": n, "category_id": int(classes[instance]), "iscrowd": 0,
                    "segmentation": rle, "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(),
                }
                if out is found:
                    if instance not in im["pred_scores"]:
                        raise KeyError(f"predicted instance {instance} of image {n} has no score")
                    annotation["score"] = float(im["pred_scores"][instance])
                out.append(annotation)
    categories = sorted({a["category_id"] for a in truth + found})
    cat_id = {c: k for k, c in enumerate(categories, 1)}  # COCO ids from 1, whatever the class ids
    for a in truth + found:
        a["category_id"] = cat_id[a["category_id"]]

    def dataset(annotations: list[dict]) -> COCO:
        coco = COCO()
        coco.dataset = {"images": entries, "annotations": annotations,
                        "categories": [{"id": k, "name": str(c)} for c, k in cat_id.items()]}
        coco.createIndex()
        return coco

    results = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt, dt = dataset(truth), dataset(found)
        for iou_type, prefix in (("segm", "mask"), ("bbox", "box")):
            evaluator = COCOeval(gt, dt, iou_type)
            params = evaluator.params
            params.maxDets = [1, 100, 10000]
            # Only area 'all' is reported: skipping the small/medium/large passes quarters the time.
            params.areaRng, params.areaRngLbl = [params.areaRng[params.areaRngLbl.index("all")]], ["all"]
            evaluator.evaluate()
            evaluator.accumulate()
            # precision: [IoU threshold, recall, category, area range, maxDets]; −1 = no true instances
            precision = evaluator.eval["precision"][:, :, :, 0, params.maxDets.index(10000)]
            at = lambda iou: precision[int(np.argmin(np.abs(params.iouThrs - iou)))]
            for key, p in (("map", precision), ("ap50", at(0.5)), ("ap75", at(0.75))):
                results[f"{prefix}_{key}"] = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
    return results
