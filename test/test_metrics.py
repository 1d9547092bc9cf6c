"""Confusion matrix / IoU against values computed by hand."""
import numpy as np
import pytest

from clip2scene_core.metrics import ConfusionMatrix


def test_iou_hand_computed():
    gt = np.array([0, 0, 0, 1, 1, 2, 2, 2, -1])
    pred = np.array([0, 0, 1, 1, 2, 2, 2, 0, 1])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    # class 0: TP 2, FP 1 (a gt-2 point), FN 1 → 2/4
    # class 1: TP 1, FP 1, FN 1 → 1/3 ; class 2: TP 2, FP 1, FN 1 → 2/4
    np.testing.assert_allclose(cm.iou(), [0.5, 1 / 3, 0.5])
    assert cm.miou() == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)
    assert cm.accuracy() == pytest.approx(5 / 8)


def test_absent_class_is_nan_and_excluded():
    cm = ConfusionMatrix(4)
    cm.update(np.array([0, 1]), np.array([0, 1]))
    iou = cm.iou()
    assert np.isnan(iou[2]) and np.isnan(iou[3])
    assert cm.miou() == 1.0


def test_dropped_points_count_as_false_negatives():
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, -1, 1]), np.array([0, 0, 1]))
    np.testing.assert_allclose(cm.iou(), [0.5, 1.0])
    assert "mIoU" in cm.table(["road", "car"])


def test_merge_equals_single_update():
    rng = np.random.default_rng(0)
    gt, pred = rng.integers(0, 5, 1000), rng.integers(0, 5, 1000)
    a, b, whole = ConfusionMatrix(5), ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(pred[:400], gt[:400])
    b.update(pred[400:], gt[400:])
    whole.update(pred, gt)
    a.merge(b)
    np.testing.assert_array_equal(a.matrix, whole.matrix)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        ConfusionMatrix(2).update(np.zeros(3), np.zeros(4))
