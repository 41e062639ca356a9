"""Evaluation metrics on hand-made arrays with known answers."""

import numpy as np
import pytest

from ueo.metrics import compute_metrics, harmonic_mean, otsu_threshold

pytestmark = pytest.mark.usefixtures("single_thread")


def test_metrics_by_hand():
    # Known classes 0..3; class 3 has no ID sample, so ACC averages classes 0, 1 and 2.
    label = np.array([0, 0, 1, 1, 2, -1, -1])
    pred = np.array([0, 1, 1, 1, 0, 3, 2])
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.5, 0.1])
    m = compute_metrics(pred, score, label)
    assert (m["n"], m["n_id"], m["n_ood"]) == (7, 5, 2)
    assert m["acc"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m["gacc"] == pytest.approx(3 / 5)
    # ID is positive: of the 10 (ID, OOD) pairs, 9 rank the ID sample higher.
    assert m["auroc"] == pytest.approx(0.9)
    # TPR >= 95% needs every ID sample (threshold 0.3): OOD 0.5 passes, 0.1 does not.
    assert m["fpr95"] == pytest.approx(0.5)
    assert m["h"] == pytest.approx(2 * 0.5 * 0.9 / (0.5 + 0.9))


def test_acc_is_per_class_mean_not_overall():
    # 9 samples of class 0 all right, 1 sample of class 1 wrong.
    label = np.array([0] * 9 + [1])
    pred = np.array([0] * 9 + [0])
    m = compute_metrics(pred, np.linspace(0, 1, 10), label)
    assert m["acc"] == pytest.approx(0.5)
    assert m["gacc"] == pytest.approx(0.9)


def test_auroc_orientation_id_positive():
    label = np.array([0, 1, 0, -1, -1])
    pred = np.array([0, 1, 0, 0, 0])
    high_id = compute_metrics(pred, np.array([0.9, 0.8, 0.7, 0.2, 0.1]), label)
    assert high_id["auroc"] == 1.0 and high_id["fpr95"] == 0.0 and high_id["h"] == 1.0
    low_id = compute_metrics(pred, np.array([0.1, 0.2, 0.3, 0.8, 0.9]), label)
    assert low_id["auroc"] == 0.0 and low_id["fpr95"] == 1.0 and low_id["h"] == 0.0


def test_fpr95_with_tied_scores():
    # 20 ID, 20 OOD. 17 ID samples score high; then three ties of one ID + one OOD at
    # 0.5, 0.4 and 0.3; 17 OOD samples score low. At threshold 0.4 TPR = 19/20 = 95% with
    # 2 OOD samples above it: FPR95 = 0.1 exactly.
    id_scores = list(np.linspace(0.9, 0.6, 17)) + [0.5, 0.4, 0.3]
    ood_scores = [0.5, 0.4, 0.3] + list(np.linspace(0.2, 0.0, 17))
    score = np.array(id_scores + ood_scores)
    label = np.array([0] * 20 + [-1] * 20)
    m = compute_metrics(np.zeros(40, int), score, label)
    assert m["fpr95"] == pytest.approx(0.1)


def test_fpr95_threshold_rule():
    # 100 ID samples; TPR 95% is reached at the 95th ID score; the OOD above it count.
    id_scores = np.arange(100, 0, -1) / 100.0  # 1.00 .. 0.01
    ood_scores = np.array([0.99 + 0.001, 0.5, 0.07, 0.055, 0.02])  # 0.06 = 95th ID score
    score = np.concatenate([id_scores, ood_scores])
    label = np.array([0] * 100 + [-1] * 5)
    m = compute_metrics(np.zeros(105, int), score, label)
    assert m["fpr95"] == pytest.approx(3 / 5)  # 0.991, 0.5 and 0.07 are >= 0.06


def test_no_ood_leaves_detection_undefined():
    m = compute_metrics(np.array([0, 1, 1]), np.array([0.5, 0.6, 0.7]), np.array([0, 1, 0]))
    assert m["acc"] == pytest.approx((0.5 + 1) / 2)  # class 0: 1 of 2 right, class 1: 1 of 1
    assert m["gacc"] == pytest.approx(2 / 3)
    assert m["auroc"] is None and m["fpr95"] is None and m["h"] is None
    assert m["n_ood"] == 0


def test_no_id_leaves_accuracy_undefined():
    m = compute_metrics(np.array([0, 1]), np.array([0.5, 0.6]), np.array([-1, -1]))
    assert m["acc"] is None and m["gacc"] is None
    assert m["auroc"] is None and m["h"] is None


def test_harmonic_mean():
    assert harmonic_mean(0.6, 0.9) == pytest.approx(0.72)
    assert harmonic_mean(None, 0.9) is None
    assert harmonic_mean(0.5, None) is None
    assert harmonic_mean(0.0, 0.0) is None


def test_otsu_splits_bimodal_scores():
    rng = np.random.default_rng(0)
    low = rng.normal(0.2, 0.02, 300)
    high = rng.normal(0.8, 0.03, 100)
    t = otsu_threshold(np.concatenate([low, high]))
    assert low.max() < t < high.min()
    # Unequal group sizes and a shifted range.
    few, many = rng.normal(0.26, 0.002, 50), rng.normal(0.3, 0.002, 500)
    t2 = otsu_threshold(np.concatenate([few, many]))
    assert few.max() < t2 < many.min()


def test_otsu_degenerate():
    assert otsu_threshold(np.full(10, 0.3)) == pytest.approx(0.3)
    assert 0.1 < otsu_threshold(np.array([0.1, 0.9])) < 0.9
