"""Otsu's threshold over every score seen so far, updated per batch at a cost that does not
grow with the scores seen: the unknown flag of a stream (docs/stream.md, "The threshold").

`ueo.metrics.otsu_threshold` histograms the scores into 256 bins over [min, max] and takes the
edge that best splits them. Over a stream, recomputing it at every batch costs the whole
history each time (quadratic at a batch of one). Here the 256-bin histogram is kept: a batch
adds its scores to it (the same bins `np.histogram` gives, so it stays exact) while the range
holds; when a batch moves the minimum or the maximum, the bins move, and the histogram is
rebuilt from a fixed fine histogram over [0, 1] (2^20 bins, with the sum of the scores in each,
so a fine bin goes where its scores' mean falls). A rebuild costs the fine histogram, a fixed
amount, however many scores it holds. The rebuilt histogram can differ from the exact one only
by the scores of a fine bin that straddles a bin edge (docs/stream.md gives the measured
difference).
"""

from __future__ import annotations

import math

import numpy as np

FINE_BINS = 1 << 20
BINS = 256  # what ueo.metrics.otsu_threshold uses


class RunningOtsu:
    """Otsu's threshold of the scores added so far (`add`), in [0, 1] (MCM scores)."""

    def __init__(self, bins: int = BINS, fine_bins: int = FINE_BINS):
        self.bins, self.fine_bins = bins, fine_bins
        self.fine = np.zeros(fine_bins, dtype=np.int64)
        self.fine_sum = np.zeros(fine_bins, dtype=np.float64)
        self.counts = np.zeros(bins, dtype=np.int64)
        self.lo, self.hi = math.inf, -math.inf
        self.n = 0

    def add(self, scores: np.ndarray) -> float:
        """Add a batch's scores (NaN is an error); returns the threshold over all of them."""
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.size:
            if not np.isfinite(scores).all():
                raise ValueError("a score to threshold is not finite")
            at = np.clip((scores * self.fine_bins).astype(np.int64), 0, self.fine_bins - 1)
            np.add.at(self.fine, at, 1)
            np.add.at(self.fine_sum, at, scores)
            lo, hi = min(self.lo, float(scores.min())), max(self.hi, float(scores.max()))
            self.n += scores.size
            if (lo, hi) != (self.lo, self.hi):
                self.lo, self.hi = lo, hi
                self._rebuild()
            elif hi - lo >= 1e-12:
                self.counts += np.histogram(scores, self.bins, (lo, hi))[0]
        return self.threshold

    def _rebuild(self) -> None:
        """The coarse histogram over the new [lo, hi], from the fine one."""
        if self.hi - self.lo < 1e-12:
            self.counts[:] = 0
            return
        filled = np.flatnonzero(self.fine)
        means = np.clip(self.fine_sum[filled] / self.fine[filled], self.lo, self.hi)
        self.counts = np.histogram(means, self.bins, (self.lo, self.hi), weights=self.fine[filled])[
            0
        ].astype(np.int64)

    @property
    def threshold(self) -> float:
        """`ueo.metrics.otsu_threshold` of the histogram: the edge of largest between-group
        variance (the minimum when every score is equal; NaN before any score)."""
        if self.n == 0:
            return math.nan
        lo, hi = self.lo, self.hi
        if hi - lo < 1e-12:
            return lo
        edges = np.linspace(lo, hi, self.bins + 1)
        centers = (edges[:-1] + edges[1:]) / 2
        w0 = np.cumsum(self.counts)
        w1 = w0[-1] - w0
        m0 = np.cumsum(self.counts * centers)
        mean0 = m0 / np.maximum(w0, 1)
        mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
        between = w0 * w1 * (mean0 - mean1) ** 2
        return float(edges[int(np.argmax(between[:-1])) + 1])

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays (the fine histogram's filled bins only) and numbers, for a checkpoint."""
        filled = np.flatnonzero(self.fine)
        arrays = {
            "fine_bins": filled.astype(np.int64),
            "fine_counts": self.fine[filled],
            "fine_sums": self.fine_sum[filled],
            "counts": self.counts,
        }
        return arrays, {"lo": self.lo, "hi": self.hi, "n": self.n} if self.n else {"n": 0}

    def load(self, arrays: dict[str, np.ndarray], numbers: dict) -> None:
        """Put back what `state` gave."""
        self.__init__(self.bins, self.fine_bins)
        self.fine[arrays["fine_bins"]] = arrays["fine_counts"]
        self.fine_sum[arrays["fine_bins"]] = arrays["fine_sums"]
        self.counts = np.array(arrays["counts"], dtype=np.int64)
        self.n = int(numbers["n"])
        if self.n:
            self.lo, self.hi = float(numbers["lo"]), float(numbers["hi"])
