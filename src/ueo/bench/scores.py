"""A cell's per-image test scores before and after adaptation (scores.npz), from which the
report draws its ROC curves and histograms: plain arrays, never a pickle."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ueo.adaptation import AdaptResult
from ueo.data import ImageSet
from ueo.errors import UeoError
from ueo.files import atomic_write

SCORES_FILE = "scores.npz"


def save_scores(staging: Path, result: AdaptResult, test: ImageSet) -> None:
    """Per-image test scores before and after adaptation, for ROC curves and histograms."""
    zs, ad = result.outputs["zeroshot"]["test"], result.outputs["adapted"]["test"]
    with atomic_write(staging / SCORES_FILE) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            label=test.labels,
            valid=ad.valid & zs.valid,
            zeroshot_score=zs.score,
            zeroshot_pred=zs.pred,
            adapted_score=ad.score,
            adapted_pred=ad.pred,
        )


def load_scores(run_dir: Path) -> dict[str, np.ndarray]:
    """Read a cell's scores.npz (plain arrays: no pickle is ever loaded)."""
    path = run_dir / SCORES_FILE
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # object arrays: ValueError
        raise UeoError(f"{path} is not a file of plain score arrays: {exc}") from None
