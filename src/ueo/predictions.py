"""What `predict` answers, one row per readable image, held as columns; and its CSV file.

A million images are a few arrays of a million numbers, not a million dicts: the rows are
made only when they are read (indexing, iterating) or written (`write_csv`, in chunks).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ueo.files import atomic_write
from ueo.objectives import LOGIT_SCALE

PREDICTION_FIELDS = ("path", "pred", "prob", "mcm", "is_unknown")
CSV_CHUNK = 65536  # rows turned into Python values at a time


@dataclass(frozen=True, eq=False)
class Predictions(Sequence):
    """The rows of `ueo predict`, as columns; `predictions[i]` is row i as a dict of
    `PREDICTION_FIELDS`.

    `paths` are the image set's paths (shared, not copied) and `rows` the positions in it of
    the readable images, in order. `prob` is the predicted class's probability (softmax of
    100 * cos), `mcm` the MCM score (softmax of the cosines, T = 1), `is_unknown` whether it
    lies below `threshold` (compared in float64, as a Python float would be).
    """

    paths: Sequence[str]
    rows: np.ndarray
    class_names: Sequence[str]
    pred: np.ndarray
    prob: np.ndarray
    mcm: np.ndarray
    threshold: float

    @classmethod
    def from_cosines(
        cls,
        paths: Sequence[str],
        rows: np.ndarray,
        class_names: Sequence[str],
        cos: np.ndarray,
        mcm: np.ndarray,
        threshold: float,
    ) -> Predictions:
        """The rows of the readable images `rows` of `paths`, from their cosines (`cos`,
        len(rows) x K, float32) and MCM scores: the predicted class is the argmax, its
        probability the softmax of 100 * cos, computed in float32."""
        pred = cos.argmax(axis=1)
        logits = LOGIT_SCALE * cos
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        prob = probs[np.arange(len(cos)), pred]
        return cls(paths, rows, class_names, pred, prob, mcm, float(threshold))

    @property
    def is_unknown(self) -> np.ndarray:
        return self.mcm.astype(np.float64) < self.threshold

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(self._chunk(*i.indices(len(self))))
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        return next(self._chunk(i % len(self), i % len(self) + 1))

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self), CSV_CHUNK):
            yield from self._chunk(start, min(start + CSV_CHUNK, len(self)))

    def _chunk(self, start: int, stop: int, step: int = 1) -> Iterator[dict]:
        for values in self._values(slice(start, stop, step)):
            yield dict(zip(PREDICTION_FIELDS, values, strict=True))

    def _values(self, part: slice) -> Iterator[tuple]:
        """The rows of `part` as tuples of Python values (str, str, float, float, bool)."""
        rows, pred = self.rows[part].tolist(), self.pred[part].tolist()
        prob, mcm = self.prob[part].tolist(), self.mcm[part].tolist()
        unknown = self.is_unknown[part].tolist()
        for j, r in enumerate(rows):
            yield self.paths[r], self.class_names[pred[j]], prob[j], mcm[j], unknown[j]

    def write_csv(self, path: str | os.PathLike) -> Path:
        """The rows as CSV (header `PREDICTION_FIELDS`), written atomically, in chunks."""
        with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(PREDICTION_FIELDS)
            for start in range(0, len(self), CSV_CHUNK):
                writer.writerows(self._values(slice(start, start + CSV_CHUNK)))
        return Path(path)
