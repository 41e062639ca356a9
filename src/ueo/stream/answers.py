"""A stream's answers: each batch's rows, as `ueo predict` makes them, and the unknown flag.

An image is flagged unknown when its MCM score lies below the threshold: the fixed one, or
Otsu's over the MCM scores of every row made so far, the batch's own included, kept at a fixed
cost per batch by `ueo.stream.threshold.RunningOtsu` (docs/stream.md, "The unknown flag").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ueo.checkpoint import under_prefix
from ueo.errors import UeoError
from ueo.objectives import mcm_score
from ueo.predictions import Predictions
from ueo.stream.threshold import RunningOtsu


class Answers:
    """The rows of each batch from its cosines, and the threshold they are flagged by
    (`fixed`, or Otsu's over the scores so far when it is None)."""

    def __init__(self, class_names: Sequence[str], fixed: float | None):
        self.class_names, self.fixed = class_names, fixed
        self.otsu = RunningOtsu()

    def rows(self, cos: torch.Tensor, names: Sequence[str], number: int) -> Predictions:
        """What `ueo.api.predict` computes from the cosines of batch `number`, with the
        threshold so far (its scores added to it first)."""
        cos = cos.float().cpu().numpy()
        if not np.isfinite(cos).all():
            raise UeoError(
                f"The model gives non-finite scores at batch {number}: the stream diverged "
                "(lower the learning rates)."
            )
        mcm = mcm_score(torch.from_numpy(cos)).numpy()
        threshold = self.fixed
        if threshold is None:
            threshold = self.otsu.add(mcm)
        rows = np.arange(len(cos))
        return Predictions.from_cosines(list(names), rows, self.class_names, cos, mcm, threshold)

    @property
    def threshold(self) -> float:
        """The unknown threshold now: the fixed one, or Otsu's over the scores so far."""
        return self.fixed if self.fixed is not None else self.otsu.threshold

    def save(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Add the running threshold's histograms to a checkpoint's tensors and plain data."""
        arrays, meta["otsu"] = self.otsu.state()
        tensors.update({f"otsu/{k}": torch.from_numpy(v) for k, v in arrays.items()})

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Put the running threshold back from a checkpoint (`save`)."""
        arrays = {k: v.numpy() for k, v in under_prefix(tensors, "otsu").items()}
        self.otsu.load(arrays, meta["otsu"])
