"""Evaluation metrics of docs/spec.md (ACC, GACC, AUROC) and ours (FPR95, H-score)."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

METRIC_NAMES = ("acc", "gacc", "auroc", "fpr95", "h")


def compute_metrics(pred: np.ndarray, score: np.ndarray, label: np.ndarray) -> dict:
    """Metrics of one evaluated set.

    `pred` is the predicted known class, `score` the MCM score (higher = ID; only its order
    counts, so +-inf are fine and NaN is an error), `label` the known class index of ID samples
    and -1 for OOD samples (classes not on the known list).
    Values are in [0, 1]; a metric that is undefined for the set is None.
    """
    pred, score, label = np.asarray(pred), np.asarray(score, dtype=np.float64), np.asarray(label)
    is_id = label >= 0
    out: dict = {"n": int(label.size), "n_id": int(is_id.sum()), "n_ood": int((~is_id).sum())}
    if is_id.any():
        correct = pred[is_id] == label[is_id]
        classes, at = np.unique(label[is_id], return_inverse=True)
        per_class = np.bincount(at, weights=correct) / np.bincount(at)  # one pass, any K
        out["acc"] = float(np.mean(per_class))
        out["gacc"] = float(correct.mean())
    else:
        out["acc"] = out["gacc"] = None
    if is_id.any() and (~is_id).any():
        if np.isnan(score).any():
            raise ValueError(f"{int(np.isnan(score).sum())} score(s) are NaN: no order to rank.")
        # Only the order of the scores counts: ranks (ties kept) let +-inf through scikit-learn.
        rank = np.unique(score, return_inverse=True)[1].reshape(-1)
        out["auroc"] = float(roc_auc_score(is_id.astype(int), rank))
        # Every threshold kept: dropped collinear points could hide the first one at 95% TPR.
        fpr, tpr, _ = roc_curve(is_id.astype(int), rank, drop_intermediate=False)
        out["fpr95"] = float(fpr[np.searchsorted(tpr, 0.95, side="left")])
    else:
        out["auroc"] = out["fpr95"] = None
    out["h"] = harmonic_mean(out["acc"], out["auroc"])
    return out


def harmonic_mean(acc: float | None, auroc: float | None) -> float | None:
    """H-score of ACC and AUROC: high only when both classification and detection are good."""
    if acc is None or auroc is None or acc + auroc == 0:
        return None
    return 2 * acc * auroc / (acc + auroc)


def otsu_threshold(scores: np.ndarray, bins: int = 256) -> float:
    """Score that best splits the scores into two groups (maximal between-group variance).

    Used as the default unknown threshold: computed from the unlabeled scores at adaptation
    time, where ID and OOD images tend to form two modes.
    """
    scores = np.asarray(scores, dtype=np.float64)
    lo, hi = float(scores.min()), float(scores.max())
    if not math.isfinite(lo) or hi - lo < 1e-12:
        return lo
    hist, edges = np.histogram(scores, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])
