"""Instance-segmentation scores on label images: F1, PQ, AJI, counting error, COCO mAP.

Inputs are instance label images (int, 0 = background, one id per instance). Matching at IoU
> 0.5 is one-to-one by construction, so no assignment step is needed there.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np


def iou_table(pred: np.ndarray, true: np.ndarray):
    """(pred_ids, true_ids, intersection (P×T), pred_areas, true_areas) from one pass over pixels."""
    pred_ids, pred_inverse = np.unique(pred, return_inverse=True)
    true_ids, true_inverse = np.unique(true, return_inverse=True)
    pairs = pred_inverse.ravel().astype(np.int64) * len(true_ids) + true_inverse.ravel()
    counts = np.bincount(pairs, minlength=len(pred_ids) * len(true_ids)).reshape(len(pred_ids), len(true_ids))
    pred_areas, true_areas = counts.sum(1), counts.sum(0)
    keep_p, keep_t = pred_ids > 0, true_ids > 0
    return (pred_ids[keep_p], true_ids[keep_t], counts[np.ix_(keep_p, keep_t)], pred_areas[keep_p], true_areas[keep_t])


def _iou(table) -> np.ndarray:
    _, _, inter, pa, ta = table
    union = pa[:, None] + ta[None, :] - inter
    return np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)


def match(pred: np.ndarray, true: np.ndarray, threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """One-to-one (pred id, true id, IoU) pairs with IoU > ``threshold`` (≥ 0.5)."""
    if threshold < 0.5:
        raise ValueError("matching is one-to-one only for thresholds of 0.5 or more")
    table = iou_table(pred, true)
    iou = _iou(table)
    p, t = np.nonzero(iou > threshold)
    return [(int(table[0][i]), int(table[1][j]), float(iou[i, j])) for i, j in zip(p, t)]


def detection_scores(pred: np.ndarray, true: np.ndarray, threshold: float = 0.5) -> dict:
    """TP, FP, FN, precision, recall and F1 at IoU > ``threshold``."""
    tp = len(match(pred, true, threshold))
    n_pred, n_true = len(np.unique(pred[pred > 0])), len(np.unique(true[true > 0]))
    fp, fn = n_pred - tp, n_true - tp
    return {
        "tp": tp, "fp": fp, "fn": fn,
        "precision": tp / n_pred if n_pred else float(n_true == 0),
        "recall": tp / n_true if n_true else float(n_pred == 0),
        "f1": 2 * tp / (n_pred + n_true) if n_pred + n_true else 1.0,
    }


def panoptic_quality(pred: np.ndarray, true: np.ndarray) -> dict:
    """PQ = SQ × RQ (Kirillov et al. 2019) with matches at IoU > 0.5."""
    matches = match(pred, true, 0.5)
    tp = len(matches)
    fp = len(np.unique(pred[pred > 0])) - tp
    fn = len(np.unique(true[true > 0])) - tp
    if tp + fp + fn == 0:
        return {"pq": 1.0, "sq": 1.0, "rq": 1.0, "iou_sum": 0.0}
    iou_sum = sum(m[2] for m in matches)
    sq = iou_sum / tp if tp else 0.0
    rq = tp / (tp + 0.5 * fp + 0.5 * fn)
    return {"pq": sq * rq, "sq": sq, "rq": rq, "iou_sum": iou_sum}


def aggregated_jaccard_index(pred: np.ndarray, true: np.ndarray) -> dict:
    """AJI (Kumar et al. 2017): each true object with its best-IoU prediction; unused predictions
    add their area to the union. Returns ``aji`` and the sums ``c`` and ``u``."""
    table = iou_table(pred, true)
    _, true_ids, inter, pred_areas, true_areas = table
    if len(true_ids) == 0:
        u = float(pred_areas.sum())
        return {"aji": 1.0 if u == 0 else 0.0, "c": 0.0, "u": u}
    iou = _iou(table)
    c = u = 0.0
    used = np.zeros(len(pred_areas), bool)
    for j in range(len(true_ids)):
        if len(pred_areas) and iou[:, j].max() > 0:
            i = int(iou[:, j].argmax())
            c += inter[i, j]
            u += pred_areas[i] + true_areas[j] - inter[i, j]
            used[i] = True
        else:
            u += true_areas[j]
    u += pred_areas[~used].sum()
    return {"aji": c / u if u else 1.0, "c": float(c), "u": float(u)}


def count_error(pred: np.ndarray, true: np.ndarray) -> dict:
    n_pred, n_true = len(np.unique(pred[pred > 0])), len(np.unique(true[true > 0]))
    return {"predicted": n_pred, "true": n_true, "absolute": abs(n_pred - n_true),
            "relative": abs(n_pred - n_true) / n_true if n_true else float(n_pred > 0)}


def _restrict(labels: np.ndarray, classes: dict, wanted: int) -> np.ndarray:
    ids = [i for i, c in classes.items() if c == wanted]
    return np.where(np.isin(labels, ids), labels, 0)


def score_pair(pred: np.ndarray, true: np.ndarray) -> dict:
    return {**detection_scores(pred, true), **panoptic_quality(pred, true), **aggregated_jaccard_index(pred, true), **count_error(pred, true)}


def evaluate_image(pred, true, pred_scores: dict, pred_classes: dict, true_classes: dict, class_names: list[str]) -> dict:
    """Overall scores and the same per class (both images restricted to that class)."""
    per_class = {
        name: score_pair(_restrict(pred, pred_classes, k), _restrict(true, true_classes, k))
        for k, name in enumerate(class_names)
    }
    return {"overall": score_pair(pred, true), "per_class": per_class}


def _pooled(results: list[dict]) -> dict:
    tp, fp, fn = (sum(r[k] for r in results) for k in ("tp", "fp", "fn"))
    iou_sum = sum(r["iou_sum"] for r in results)
    c, u = sum(r["c"] for r in results), sum(r["u"] for r in results)
    sq = iou_sum / tp if tp else 0.0
    rq = tp / (tp + 0.5 * fp + 0.5 * fn) if tp + fp + fn else 1.0
    return {
        "tp": tp, "fp": fp, "fn": fn,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "pq": sq * rq, "sq": sq, "rq": rq,
        "aji": c / u if u else 1.0,
        "count_error_mean_relative": float(np.mean([r["relative"] for r in results])) if results else 0.0,
    }


def summarise(per_image: list[dict]) -> dict:
    """Dataset scores pooled over images (TP/FP/FN, IoU sums and AJI sums added up)."""
    summary = _pooled([r["overall"] for r in per_image])
    names = per_image[0]["per_class"].keys() if per_image else []
    summary["per_class"] = {n: _pooled([r["per_class"][n] for r in per_image]) for n in names}
    return summary


def coco_map(images: list[dict]) -> dict:
    """COCO mask and box mAP (pycocotools), with up to 10,000 detections per image.

    Each item: ``pred``, ``pred_scores``, ``pred_classes``, ``true``, ``true_classes``.
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    categories = sorted({c for im in images for c in list(im["true_classes"].values()) + list(im["pred_classes"].values())})
    truth = {"images": [], "annotations": [], "categories": [{"id": c + 1, "name": str(c)} for c in categories]}
    detections = []
    for n, im in enumerate(images, 1):
        height, width = im["true"].shape
        truth["images"].append({"id": n, "height": height, "width": width})
        for kind, labels, classes in (("true", im["true"], im["true_classes"]), ("pred", im["pred"], im["pred_classes"])):
            for instance in np.unique(labels[labels > 0]):
                rle = mask_utils.encode(np.asfortranarray((labels == instance).astype(np.uint8)))
                rle["counts"] = rle["counts"].decode()
                entry = {"image_id": n, "category_id": int(classes[int(instance)]) + 1, "segmentation": rle,
                         "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist()}
                if kind == "true":
                    truth["annotations"].append({**entry, "id": len(truth["annotations"]) + 1, "iscrowd": 0})
                else:
                    detections.append({**entry, "score": float(im["pred_scores"][int(instance)])})
    results = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = truth
        gt.createIndex()
        dt = gt.loadRes(detections) if detections else None
        for iou_type, prefix in (("segm", "mask"), ("bbox", "box")):
            if dt is None:
                results.update({f"{prefix}_map": 0.0, f"{prefix}_ap50": 0.0, f"{prefix}_ap75": 0.0})
                continue
            evaluator = COCOeval(gt, dt, iou_type)
            evaluator.params.maxDets = [1, 100, 10000]
            evaluator.evaluate()
            evaluator.accumulate()
            precision = evaluator.eval["precision"][:, :, :, 0, 2]  # IoU × recall × class, area all, maxDets 10000
            mean = lambda p: float(p[p > -1].mean()) if (p > -1).any() else 0.0
            results.update({f"{prefix}_map": mean(precision), f"{prefix}_ap50": mean(precision[0]), f"{prefix}_ap75": mean(precision[5])})
    return results
