import math

import numpy as np
import pytest

from pipeline import metrics


def shapes_image(size: int = 120) -> np.ndarray:
    """Ten disjoint instances: rectangles and discs of different sizes."""
    labels = np.zeros((size, size), np.int32)
    rows, cols = np.mgrid[:size, :size]
    rects = [(2, 2, 10, 30), (15, 5, 40, 12), (50, 2, 53, 6), (60, 60, 100, 110), (105, 10, 118, 40)]
    for n, (r0, c0, r1, c1) in enumerate(rects, 1):
        labels[r0:r1, c0:c1] = n
    discs = [(30, 70, 12), (10, 100, 6), (80, 25, 15), (45, 45, 3), (110, 80, 8)]
    for n, (r, c, radius) in enumerate(discs, len(rects) + 1):
        disc = (rows - r) ** 2 + (cols - c) ** 2 <= radius**2
        assert not labels[disc].any()
        labels[disc] = n
    return labels


def hand_case() -> tuple[np.ndarray, np.ndarray]:
    """10×10. Truth: A (id 1) = rows 0–3 × cols 0–3 (16 px), B (id 2) = rows 6–7 × cols 0–4 (10 px).
    Prediction: A shifted right one column (id 5, rows 0–3 × cols 1–4: ∩ 12, ∪ 20, IoU 0.6), B
    missed, a false positive (id 9, rows 7–9 × cols 7–9, 9 px) touching nothing."""
    true = np.zeros((10, 10), np.int32)
    true[0:4, 0:4] = 1
    true[6:8, 0:5] = 2
    pred = np.zeros((10, 10), np.int32)
    pred[0:4, 1:5] = 5
    pred[7:10, 7:10] = 9
    return pred, true


def random_labels(rng: np.random.Generator, shape=(40, 50), n=25) -> np.ndarray:
    """Overlapping rectangles painted in turn: non-convex, partly hidden and vanished instances."""
    labels = np.zeros(shape, np.int32)
    for instance in range(1, n + 1):
        r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        labels[r : r + rng.integers(1, 15), c : c + rng.integers(1, 15)] = instance
    return labels


def reference_aji(pred: np.ndarray, true: np.ndarray) -> float:
    """Kumar et al. AJI by brute force over masks (the common get_fast_aji semantics)."""
    true_ids, pred_ids = np.unique(true[true > 0]), np.unique(pred[pred > 0])
    if len(true_ids) == 0 and len(pred_ids) == 0:
        return 1.0
    c = u = 0
    used = set()
    for t in true_ids:
        g = true == t
        best, best_iou = None, 0.0
        for p in pred_ids:
            s = pred == p
            iou = (g & s).sum() / (g | s).sum()
            if iou > best_iou:
                best, best_iou = p, iou
        if best is None:
            u += g.sum()
        else:
            s = pred == best
            c += (g & s).sum()
            u += (g | s).sum()
            used.add(best)
    u += sum((pred == p).sum() for p in pred_ids if p not in used)
    return c / u


def perfect_coco_item(labels: np.ndarray, classes: dict) -> dict:
    scores = {i: 0.5 + 0.01 * (i % 40) for i in classes}
    return {"pred": labels.copy(), "pred_scores": scores, "pred_classes": dict(classes), "true": labels, "true_classes": dict(classes)}


def test_ground_truth_against_itself_is_perfect():
    true = shapes_image()
    ids = np.unique(true[true > 0])
    classes = {int(i): int(i % 2) for i in ids}
    result = metrics.evaluate_image(true.copy(), true, {i: 1.0 for i in classes}, classes, classes, ["odd", "even"])
    for scores in [result["overall"], *result["per_class"].values()]:
        assert scores["f1"] == scores["precision"] == scores["recall"] == 1.0
        assert scores["pq"] == scores["sq"] == scores["rq"] == 1.0
        assert scores["aji"] == 1.0
        assert scores["count_error"] == 0 and scores["count_error_relative"] == 0.0
    assert result["overall"]["tp"] == len(ids) == 10
    assert result["per_class"]["even"]["tp"] == 5 and result["per_class"]["odd"]["tp"] == 5
    coco = metrics.coco_map([perfect_coco_item(true, classes)])
    assert coco == pytest.approx({k: 1.0 for k in ("mask_map", "mask_ap50", "mask_ap75", "box_map", "box_ap50", "box_ap75")})


def test_hand_checked_case():
    pred, true = hand_case()
    d = metrics.detection_scores(pred, true)
    assert (d["tp"], d["fp"], d["fn"]) == (1, 1, 1)
    assert d["precision"] == d["recall"] == d["f1"] == 0.5
    assert metrics.match(pred, true) == [(5, 1, pytest.approx(0.6))]
    pq = metrics.panoptic_quality(pred, true)
    assert pq["sq"] == pytest.approx(0.6)  # 12 / 20
    assert pq["rq"] == pytest.approx(0.5)  # 1 / (1 + 1/2 + 1/2)
    assert pq["pq"] == pytest.approx(0.3)
    aji = metrics.aggregated_jaccard_index(pred, true)
    # A takes id 5: C = 12, U = 20. B overlaps nothing: U += 10. Id 9 never taken: U += 9.
    # AJI = 12 / (20 + 10 + 9) = 12 / 39.
    assert (aji["aji_c"], aji["aji_u"]) == (12, 39)
    assert aji["aji"] == pytest.approx(12 / 39)
    assert metrics.count_error(pred, true) == {"predicted": 2, "true": 2, "absolute": 0, "relative": 0.0}
    pred_ids, true_ids, inter, pred_areas, true_areas = metrics.iou_table(pred, true)
    assert pred_ids.tolist() == [5, 9] and true_ids.tolist() == [1, 2]
    assert inter.tolist() == [[12, 0], [0, 0]]
    assert pred_areas.tolist() == [16, 9] and true_areas.tolist() == [16, 10]


def test_iou_of_exactly_one_half_does_not_match_at_one_half():
    true = np.zeros((6, 6), np.int32)
    true[0:4, 0:4] = 1  # 16 px
    pred = np.zeros((6, 6), np.int32)
    pred[0:4, 0:2] = 3  # 8 px inside: IoU 8 / 16
    assert metrics.match(pred, true, 0.5) == []
    assert metrics.detection_scores(pred, true)["tp"] == 0
    assert metrics.panoptic_quality(pred, true)["pq"] == 0.0
    assert metrics.match(pred, true, 0.49) == [(3, 1, 0.5)]
    pred[0, 2] = 3  # 9 px: IoU 9 / 16 > 0.5
    assert metrics.match(pred, true, 0.5) == [(3, 1, 9 / 16)]


def test_low_threshold_assignment_maximises_matches():
    # One row. Truth 1 = cols 0–9, truth 2 = cols 10–19. Prediction 7 = cols 4–13 (IoU 6/14 with
    # 1, 4/16 with 2); prediction 8 = cols 0–3 (IoU 4/10 with 1). Greedy best-IoU pairs 7 with 1
    # and leaves 8 alone; the assignment pairs 7–2 and 8–1.
    true = np.zeros((1, 30), np.int32)
    true[0, 0:10], true[0, 10:20] = 1, 2
    pred = np.zeros((1, 30), np.int32)
    pred[0, 4:14], pred[0, 0:4] = 7, 8
    assert metrics.match(pred, true, 0.2) == [(8, 1, pytest.approx(0.4)), (7, 2, pytest.approx(0.25))]
    assert metrics.match(pred, true, 0.3) == [(7, 1, pytest.approx(6 / 14))]  # 8–1 alone would be 0.4 < 6/14
    assert metrics.detection_scores(pred, true, 0.2)["f1"] == 1.0
    assert metrics.match(pred, true, 0.5) == []


def test_empty_prediction_and_empty_images():
    _, true = hand_case()
    empty = np.zeros_like(true)
    d = metrics.detection_scores(empty, true)
    assert (d["tp"], d["fp"], d["fn"]) == (0, 0, 2)
    assert d["recall"] == d["f1"] == d["precision"] == 0.0
    assert metrics.panoptic_quality(empty, true)["pq"] == 0.0
    assert metrics.aggregated_jaccard_index(empty, true) == {"aji": 0.0, "aji_c": 0, "aji_u": 26}
    assert metrics.count_error(empty, true) == {"predicted": 0, "true": 2, "absolute": 2, "relative": 1.0}

    assert metrics.aggregated_jaccard_index(true, empty)["aji"] == 0.0
    assert metrics.detection_scores(true, empty)["precision"] == 0.0
    assert math.isnan(metrics.count_error(true, empty)["relative"])

    d = metrics.detection_scores(empty, empty)
    assert d["precision"] == d["recall"] == d["f1"] == 1.0
    assert metrics.panoptic_quality(empty, empty) == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "iou_sum": 0.0}
    assert metrics.aggregated_jaccard_index(empty, empty)["aji"] == 1.0
    assert metrics.count_error(empty, empty)["relative"] == 0.0


def test_aji_takes_best_iou_not_largest_overlap_and_reuses_predictions():
    # Truth 1 = 10×10 at cols 0–9. Prediction 1 = cols 0–3 (∩ 40, IoU 0.4); prediction 2 =
    # cols 4–29 (∩ 60, area 260, IoU 0.2). Best IoU is prediction 1: C = 40, U = 100; prediction 2
    # is never taken: U += 260. AJI = 40 / 360 (taking the largest overlap would give 60 / 340).
    true = np.zeros((10, 30), np.int32)
    true[:, 0:10] = 1
    pred = np.zeros((10, 30), np.int32)
    pred[:, 0:4], pred[:, 4:30] = 1, 2
    assert metrics.aggregated_jaccard_index(pred, true)["aji"] == pytest.approx(40 / 360)
    # Two 4×4 truths under one 4×8 prediction: both take it (IoU 16/32 each), so its area enters
    # U twice: C = 16 + 16, U = 32 + 32, AJI = 0.5.
    true = np.zeros((4, 8), np.int32)
    true[:, :4], true[:, 4:] = 1, 2
    pred = np.ones((4, 8), np.int32)
    assert metrics.aggregated_jaccard_index(pred, true) == {"aji": 0.5, "aji_c": 32, "aji_u": 64}


@pytest.mark.parametrize("seed", range(5))
def test_overlap_table_and_aji_agree_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    pred, true = random_labels(rng), random_labels(rng)
    pred_ids, true_ids, inter, pred_areas, true_areas = metrics.iou_table(pred, true)
    assert pred_ids.tolist() == np.unique(pred[pred > 0]).tolist()
    assert true_ids.tolist() == np.unique(true[true > 0]).tolist()
    for i, p in enumerate(pred_ids):
        assert pred_areas[i] == (pred == p).sum()
        for j, t in enumerate(true_ids):
            assert inter[i, j] == ((pred == p) & (true == t)).sum()
    assert true_areas.tolist() == [(true == t).sum() for t in true_ids]
    assert metrics.aggregated_jaccard_index(pred, true)["aji"] == pytest.approx(reference_aji(pred, true))
    # Matches at IoU > 0.5 are exactly the pairs above 0.5, each id at most once.
    iou = inter / (pred_areas[:, None] + true_areas[None, :] - inter)
    expected = {(int(pred_ids[i]), int(true_ids[j])) for i, j in zip(*np.nonzero(iou > 0.5))}
    matched = [(p, t) for p, t, _ in metrics.match(pred, true)]
    assert set(matched) == expected
    assert len({p for p, _ in matched}) == len({t for _, t in matched}) == len(matched)


def test_per_class_split():
    # Truth: 1 = class 0, 2 and 3 = class 1. Prediction: exact copies, but 3 labelled class 0.
    true = np.zeros((10, 10), np.int32)
    true[0:3, 0:3], true[5:8, 0:3], true[5:9, 5:9] = 1, 2, 3
    pred = true * 10
    true_classes = {1: 0, 2: 1, 3: 1}
    pred_classes = {10: 0, 20: 1, 30: 0}
    scores = {10: 0.9, 20: 0.8, 30: 0.7}
    result = metrics.evaluate_image(pred, true, scores, pred_classes, true_classes, ["cell", "debris"])
    assert result["overall"]["f1"] == 1.0  # classes ignored
    cell, debris = result["per_class"]["cell"], result["per_class"]["debris"]
    assert (cell["tp"], cell["fp"], cell["fn"]) == (1, 1, 0)
    assert (cell["precision"], cell["recall"]) == (0.5, 1.0)
    assert (debris["tp"], debris["fp"], debris["fn"]) == (1, 0, 1)
    assert (debris["precision"], debris["recall"]) == (1.0, 0.5)
    # Cell: truth 1 takes 10 (C = U = 9); 30 never taken (U += 16). Debris: 2 takes 20 (9, 9);
    # 3 overlaps nothing (U += 16).
    assert cell["aji"] == debris["aji"] == pytest.approx(9 / 25)
    assert (cell["predicted"], cell["true"], debris["predicted"], debris["true"]) == (2, 1, 1, 2)
    with pytest.raises(KeyError):
        metrics.evaluate_image(pred, true, scores, {10: 0, 20: 1}, true_classes, ["cell", "debris"])


def test_summary_pools_counts_not_means():
    pred, true = hand_case()
    classes = {1: 0, 2: 0}
    first = metrics.evaluate_image(pred, true, {5: 1.0, 9: 1.0}, {5: 0, 9: 0}, classes, ["a"])
    second = metrics.evaluate_image(true, true, {1: 1.0, 2: 1.0}, classes, classes, ["a"])
    summary = metrics.summarise([first, second])
    # TP 1 + 2, FP 1 + 0, FN 1 + 0: P = R = F1 = 3/4. PQ and AJI are not means of the per-image
    # values: SQ = (0.6 + 1 + 1) / 3, RQ = 3 / (3 + 1/2 + 1/2), AJI = ΣC / ΣU.
    assert (summary["tp"], summary["fp"], summary["fn"]) == (3, 1, 1)
    assert summary["precision"] == summary["recall"] == summary["f1"] == 0.75
    assert summary["sq"] == pytest.approx(2.6 / 3)
    assert summary["rq"] == pytest.approx(0.75)
    assert summary["pq"] == pytest.approx(2.6 / 3 * 0.75)
    assert summary["aji"] == pytest.approx((12 + 26) / (39 + 26))  # second image: C = U = 16 + 10
    assert summary["count_error_mean"] == 0.0
    assert summary["per_class"]["a"]["pq"] == pytest.approx(summary["pq"])
    # The papers' convention beside it: each image's score, then the mean over images.
    means = summary["image_mean"]
    assert means["f1"] == pytest.approx((0.5 + 1) / 2) and means["sq"] == pytest.approx((0.6 + 1) / 2)
    assert means["pq"] == pytest.approx((0.3 + 1) / 2) and means["aji"] == pytest.approx((12 / 39 + 1) / 2)
    assert summary["per_class"]["a"]["image_mean"] == means
    nothing = metrics.evaluate_image(np.zeros_like(true), np.zeros_like(true), {}, {}, {}, ["a"])
    assert metrics.summarise([first, second, nothing])["image_mean"] == means  # scores 1 by itself, but is not scored
    empty = metrics.evaluate_image(np.zeros_like(true), true, {}, {}, classes, ["a"])
    assert metrics.summarise([empty, second])["count_error_relative_mean"] == pytest.approx(0.5)  # (1 + 0) / 2


def test_coco_map_ranks_by_score():
    true = np.zeros((20, 20), np.int32)
    true[0:5, 0:5], true[10:16, 10:18] = 1, 2
    pred = true.copy()
    pred[0:4, 12:19] = 3  # touches no truth
    classes = {1: 0, 2: 0, 3: 0}
    item = {"pred": pred, "true": true, "pred_classes": classes, "true_classes": {1: 0, 2: 0}}
    fp_last = metrics.coco_map([{**item, "pred_scores": {1: 0.9, 2: 0.8, 3: 0.1}}])
    assert fp_last["mask_map"] == pytest.approx(1.0) and fp_last["box_map"] == pytest.approx(1.0)
    # The false positive ranked first: precision 0, 1/2, 2/3 at recall 0, 1/2, 1; interpolated 2/3.
    fp_first = metrics.coco_map([{**item, "pred_scores": {1: 0.5, 2: 0.4, 3: 0.9}}])
    for key in ("mask_map", "mask_ap50", "mask_ap75", "box_map", "box_ap50", "box_ap75"):
        assert fp_first[key] == pytest.approx(2 / 3)
    # Wrong class: a category without truth adds nothing, but class 0 loses an instance
    # (precision 1 up to recall 1/2: 51 of 101 recall points).
    wrong = metrics.coco_map([{**item, "pred_classes": {1: 0, 2: 1, 3: 1}, "pred_scores": {1: 0.9, 2: 0.8, 3: 0.7}}])
    assert wrong["mask_map"] == pytest.approx(51 / 101)
    nothing = metrics.coco_map([{**item, "pred": np.zeros_like(pred), "pred_scores": {}, "pred_classes": {}}])
    assert nothing["mask_map"] == 0.0 and nothing["box_map"] == 0.0


def test_coco_map_counts_more_than_100_detections_per_image():
    labels = np.zeros((65, 65), np.int32)
    n = 0
    for r in range(0, 65, 5):
        for c in range(0, 60, 5):
            n += 1
            labels[r : r + 4, c : c + 4] = n
    assert n == 156
    coco = metrics.coco_map([perfect_coco_item(labels, {i: 0 for i in range(1, n + 1)})])
    assert coco["mask_map"] == pytest.approx(1.0) and coco["box_map"] == pytest.approx(1.0)


def test_rejects_mismatched_or_non_label_inputs():
    with pytest.raises(ValueError):
        metrics.match(np.zeros((3, 3), np.int32), np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError):
        metrics.match(np.zeros((3, 3), np.float32), np.zeros((3, 3), np.int32))
    with pytest.raises(ValueError):
        metrics.match(-np.ones((3, 3), np.int32), np.zeros((3, 3), np.int32))


def test_best_score_threshold_is_read_off_the_pr_curve():
    from workflows.evaluate import best_threshold

    # four predictions by falling score: hit, hit, miss, hit; four true objects
    precision = np.array([1, 1, 2 / 3, 3 / 4])
    recall = np.array([1, 2, 2, 3]) / 4
    best = best_threshold(precision, recall, np.array([0.9, 0.8, 0.7, 0.6]))
    assert best["score_threshold"] == 0.6 and best["f1"] == pytest.approx(0.75)
    tied = best_threshold(precision[:3], recall[:3], np.array([0.9, 0.8, 0.8]))  # 0.8 keeps both 0.8s
    assert tied["score_threshold"] == 0.8 and tied["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert best_threshold(np.array([]), np.array([]), np.array([]))["score_threshold"] is None
    assert best_threshold(np.zeros(2), np.zeros(2), np.array([0.9, 0.5]))["score_threshold"] is None  # no true object found
    top = best_threshold(np.array([1.0]), np.array([1.0]), np.array([0.99987]))
    assert top["score_threshold"] == 0.999  # rounded down: 1.0 would drop the one prediction that scores
    # the best keeps every prediction: nothing argues for more than the threshold they were made at
    assert best_threshold(np.array([1.0]), np.array([1.0]), np.array([0.99987]), floor=0.5)["score_threshold"] == 0.5
    assert best_threshold(precision, recall, np.array([0.9, 0.8, 0.7, 0.6]), floor=0.5)["score_threshold"] == 0.5
    assert best_threshold(np.array([1, 0.5]), np.array([1.0, 1.0]), np.array([0.9, 0.8]), floor=0.5)["score_threshold"] == 0.9


def test_helper_f1_counts_a_duplicated_output_once():
    import shapely

    from tests.helpers import match_f1

    truth = np.array([shapely.box(0, 0, 10, 10), shapely.box(20, 0, 30, 10)])
    doubled = np.array([shapely.box(0, 0, 10, 10), shapely.box(0, 0, 10, 9), shapely.box(20, 0, 30, 10)])
    assert match_f1(doubled, truth) == 2 * 2 / 5


def test_report_json_has_null_where_a_metric_is_undefined():
    from workflows.evaluate import _finite_or_null

    report = {"coco": {"mask_map": np.float64("nan")}, "per_image": [{"count_error": float("inf"), "f1": 0.5}], "n": 3}
    assert _finite_or_null(report) == {"coco": {"mask_map": None}, "per_image": [{"count_error": None, "f1": 0.5}], "n": 3}


def test_detections_on_crowd_regions_are_not_scored():
    """COCO's crowd regions: a prediction half or more inside one is dropped before scoring; the
    others, and predictions hidden under others (no pixel), stay."""
    from workflows.evaluate import without_ignored

    pred = np.zeros((20, 20), np.int32)
    pred[0:4, 0:4] = 1  # all inside the crowd region
    pred[0:4, 8:12] = 2  # half inside
    pred[10:14, 10:14] = 3  # outside
    ignore = np.zeros((20, 20), bool)
    ignore[0:6, 0:10] = True
    scores, classes = {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6}, {1: 0, 2: 1, 3: 0, 4: 1}
    kept, kept_scores, kept_classes = without_ignored(pred, scores, classes, ignore)
    assert set(np.unique(kept)) == {0, 3} and kept_scores == {3: 0.7, 4: 0.6} and kept_classes == {3: 0, 4: 1}
    assert without_ignored(pred, scores, classes, None)[0] is pred
