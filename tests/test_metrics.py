import numpy as np
import pytest

from models.synthetic import make_scene
from pipeline import metrics


def small_case():
    true = np.zeros((10, 10), np.int32)
    true[1:5, 1:5] = 1  # A: 16 px
    true[6:8, 2:7] = 2  # B: 10 px
    pred = np.zeros((10, 10), np.int32)
    pred[1:5, 2:6] = 7  # A shifted one column: intersection 12, union 20, IoU 0.6
    pred[8:10, 8:10] = 3  # a false positive of 4 px
    return pred, true


def test_ground_truth_against_itself_is_perfect():
    scene = make_scene(4, 300, 300, density=2)
    labels = scene.labels
    classes = {i + 1: int(c) for i, c in enumerate(scene.classes)}
    result = metrics.evaluate_image(labels, labels, {i: 1.0 for i in classes}, classes, classes, ["a", "b", "c"])
    for key in ("f1", "pq", "sq", "rq", "aji", "precision", "recall"):
        assert result["overall"][key] == pytest.approx(1.0)
    assert result["overall"]["absolute"] == 0
    coco = metrics.coco_map([{"pred": labels, "pred_scores": {i: 1.0 for i in classes}, "pred_classes": classes,
                              "true": labels, "true_classes": classes}])
    assert coco["mask_map"] == pytest.approx(1.0) and coco["box_map"] == pytest.approx(1.0)


def test_hand_checked_case():
    pred, true = small_case()
    s = metrics.score_pair(pred, true)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 1)
    assert s["precision"] == s["recall"] == s["f1"] == 0.5
    assert s["sq"] == pytest.approx(0.6) and s["rq"] == 0.5 and s["pq"] == pytest.approx(0.3)
    # AJI: C = 12 (A with its best match); U = 20 (A ∪ match) + 10 (B, unmatched) + 4 (unused FP) = 34
    assert s["aji"] == pytest.approx(12 / 34)
    assert (s["predicted"], s["true"], s["absolute"]) == (2, 2, 0)


def test_iou_of_exactly_half_does_not_match():
    true = np.zeros((4, 4), np.int32)
    true[0:2, 0:2] = 1
    pred = np.zeros((4, 4), np.int32)
    pred[0:2, 0:1] = 1  # intersection 2, union 4
    assert metrics.match(pred, true) == []


def test_empty_cases():
    true = np.zeros((5, 5), np.int32)
    true[1:3, 1:3] = 1
    empty = np.zeros_like(true)
    s = metrics.score_pair(empty, true)
    assert s["recall"] == 0 and s["f1"] == 0 and s["aji"] == 0
    both = metrics.score_pair(empty, empty)
    assert both["f1"] == both["pq"] == both["aji"] == 1.0


def test_per_class_and_pooled_summary():
    pred, true = small_case()
    result = metrics.evaluate_image(pred, true, {7: 0.9, 3: 0.8}, {7: 0, 3: 1}, {1: 0, 2: 1}, ["a", "b"])
    assert result["per_class"]["a"]["f1"] == 1.0  # A found, nothing else of class a
    assert result["per_class"]["b"]["tp"] == 0 and result["per_class"]["b"]["fp"] == 1
    summary = metrics.summarise([result, result])
    assert (summary["tp"], summary["fp"], summary["fn"]) == (2, 2, 2)
    assert summary["aji"] == pytest.approx(24 / 68)


def test_coco_map_penalises_a_confident_false_positive():
    pred, true = small_case()
    worse = metrics.coco_map([{"pred": pred, "pred_scores": {7: 0.1, 3: 0.9}, "pred_classes": {7: 0, 3: 0},
                               "true": true, "true_classes": {1: 0, 2: 0}}])
    assert 0 < worse["mask_ap50"] < 1
