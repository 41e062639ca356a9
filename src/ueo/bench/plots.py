"""Figures a person would rather look at than read: methods compared, ROC curves, histograms.

Every figure is written atomically as PNG with the non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from ueo.errors import UeoError
from ueo.files import atomic_write

try:
    import matplotlib
except ImportError as exc:  # an extra: the core runs without it
    raise UeoError(
        "The benchmark report draws figures with matplotlib: pip install 'ueo[bench]'."
    ) from exc
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

TABLE_METRICS = ("acc", "auroc", "h")
CURVE_METRICS = ("acc", "auroc")
METRIC_TITLES = {"acc": "ACC", "gacc": "GACC", "auroc": "AUROC", "fpr95": "FPR95", "h": "H-score"}


def save_figure(fig, path: Path) -> Path:
    """PNG written atomically."""
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def method_plot(summary_mean: dict, scenario: str, path: Path):
    """Grouped bars: ACC, AUROC and H-score of each method, averaged over domains."""
    methods = list(summary_mean[scenario])
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(methods), 3.4))
    width = 0.8 / len(TABLE_METRICS)
    x = np.arange(len(methods))
    for j, metric in enumerate(TABLE_METRICS):
        vals = [summary_mean[scenario][m][metric] for m in methods]
        heights = [100 * v if v is not None else 0 for v in vals]
        bars = ax.bar(x + (j - 1) * width, heights, width, label=METRIC_TITLES[metric])
        for b, v in zip(bars, vals, strict=True):
            if v is not None:
                ax.text(
                    b.get_x() + b.get_width() / 2,
                    b.get_height() + 0.5,
                    f"{100 * v:.0f}",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks(x, methods)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_title(f"{scenario}: methods compared (test set, mean over domains)")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def curve_plot(lines: dict[str, dict[int, dict]], scenario: str, path: Path) -> Path:
    """ACC and AUROC (test set, mean over domains) against epochs, one line per method.

    `lines[method][epoch][metric]`; a method evaluated only before training (zero-shot) is a
    dashed horizontal line.
    """
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(4.2 * len(CURVE_METRICS), 3.3))
    for ax, metric in zip(axes, CURVE_METRICS, strict=True):
        _epoch_lines(ax, lines, metric, 100)
        ax.set_title(
            f"{scenario}: {METRIC_TITLES[metric]} (test set, mean over domains)", fontsize=9
        )
        ax.set_ylabel("%")
    return save_figure(fig, path)


def score_plot(
    lines: dict[str, dict[int, dict]], scenario: str, titles: dict[str, str], path: Path
) -> Path:
    """Label-free scores of the unlabeled set against epochs, one panel per score (`titles`:
    key -> panel title), one line per method, as `curve_plot` draws ACC and AUROC."""
    cols = 3
    rows = -(-len(titles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.8 * rows), squeeze=False)
    for i, (ax, (key, title)) in enumerate(zip(axes.flat, titles.items(), strict=False)):
        _epoch_lines(ax, lines, key, 1, legend=i == 0)
        ax.set_title(f"{scenario}: {title}", fontsize=9)
    for ax in list(axes.flat)[len(titles) :]:
        ax.set_visible(False)
    return save_figure(fig, path)


def _epoch_lines(
    ax, lines: dict[str, dict[int, dict]], key: str, scale: float, legend: bool = True
) -> None:
    last = max(e for points in lines.values() for e in points)
    for method, points in lines.items():
        xs = [e for e, v in points.items() if v.get(key) is not None]
        ys = [scale * points[e][key] for e in xs]
        if len(xs) == 1:
            ax.plot([0, last], ys * 2, "--", lw=1.2, label=method)
        elif xs:
            ax.plot(xs, ys, "-o", ms=3, lw=1.4, label=method)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if legend:
        ax.legend(fontsize=7)


def roc_plot(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], path: Path) -> Path:
    """One panel per scenario; `curves[scenario][label] = (is_id, score)` of the test images."""
    fig, axes = plt.subplots(1, len(curves), figsize=(3.3 * len(curves), 3.3), squeeze=False)
    for ax, (scenario, lines) in zip(axes[0], curves.items(), strict=True):
        for label, (is_id, score) in lines.items():
            if is_id.all() or not is_id.any():
                continue
            fpr, tpr, _ = roc_curve(is_id.astype(int), score)
            style = "--" if label == "zero-shot" else "-"
            ax.plot(fpr, tpr, style, label=label, lw=1.4)
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
        ax.set_title(f"{scenario}: ID vs OOD (MCM)")
        ax.set_xlabel("false positive rate (OOD kept)")
        if ax is axes[0][0]:
            ax.set_ylabel("true positive rate (ID kept)")
        ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def histogram_plot(panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], path: Path) -> Path:
    """Rows = scenarios, columns = phases; each panel overlays MCM scores of ID and OOD images."""
    rows = list(panels)
    cols = list(next(iter(panels.values())))
    fig, axes = plt.subplots(
        len(rows), len(cols), figsize=(3.6 * len(cols), 2.4 * len(rows)), squeeze=False
    )
    for r, scenario in enumerate(rows):
        for c, phase in enumerate(cols):
            ax = axes[r][c]
            is_id, score = panels[scenario][phase]
            bins = np.linspace(score.min(), score.max(), 40)
            ax.hist(score[is_id], bins=bins, alpha=0.6, density=True, label="ID (known classes)")
            ax.hist(score[~is_id], bins=bins, alpha=0.6, density=True, label="OOD (unknown)")
            ax.set_title(f"{scenario}, {phase}", fontsize=9)
            ax.set_yticks([])
            ax.locator_params(axis="x", nbins=4)
            if r == len(rows) - 1:
                ax.set_xlabel("MCM score (max softmax of cosines, T=1)")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)
