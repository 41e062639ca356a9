"""What a stream has done so far: where it is in its source and its CSV, its counts and
latencies, and one number per row for the online metrics (ueo.stream.run).

A checkpoint records all of it but the rows' numbers, which a resume reads back from the kept
rows of the CSV (ueo.stream.resume); metrics.json reports it at the end.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ueo.metrics import compute_metrics
from ueo.names import UNLABELED
from ueo.stream.reader import START


class Column:
    """A growing array of numbers (amortised O(1) appends): one value per row, no object."""

    def __init__(self, dtype):
        self.data = np.zeros(1024, dtype=dtype)
        self.n = 0

    def extend(self, values) -> None:
        values = np.asarray(values, dtype=self.data.dtype)
        while self.n + len(values) > len(self.data):
            self.data = np.concatenate([self.data, np.zeros_like(self.data)])
        self.data[self.n : self.n + len(values)] = values
        self.n += len(values)

    @property
    def values(self) -> np.ndarray:
        return self.data[: self.n]


class Durations:
    """Quantiles of many durations at a fixed cost: a histogram of 400 bins per decade from
    1 microsecond to 10^4 s (a quantile is its bin's geometric middle, within 0.3%)."""

    PER_DECADE, LOW, DECADES = 400, -6, 10

    def __init__(self, counts: np.ndarray | None = None):
        size = self.PER_DECADE * self.DECADES
        self.counts = np.zeros(size, np.int64) if counts is None else counts.astype(np.int64)

    def add(self, seconds: float) -> None:
        at = math.floor((math.log10(max(seconds, 1e-12)) - self.LOW) * self.PER_DECADE)
        self.counts[min(max(at, 0), len(self.counts) - 1)] += 1

    def quantile(self, q: float) -> float | None:
        total = int(self.counts.sum())
        if not total:
            return None
        at = int(np.searchsorted(np.cumsum(self.counts), q * total, side="left"))
        return 10 ** (self.LOW + (at + 0.5) / self.PER_DECADE)


class History:
    """A stream's record so far: the entries of the source done and their chained digest,
    the unreadable ones, the CSV's length, the time, the sessions and the latencies; the
    rows' predictions, MCM scores and labels, their runs of one domain, and how many were
    flagged unknown when they were made."""

    def __init__(self):
        self.consumed = 0  # entries of the source done (readable or not)
        self.digest = START  # of the entries done (ueo.stream.reader.chain)
        self.skipped = 0
        self.csv_bytes = 0  # the CSV's length after the last row written
        self.elapsed = 0.0  # seconds of the stream before this session
        self.sessions = 1
        self.latency = Durations()  # last entry of a batch read -> its rows flushed
        self.step_time = Durations()  # a batch's rows -> its update done
        self.pred, self.mcm = Column(np.int32), Column(np.float64)
        self.label = Column(np.int64)
        self.segments: list[list] = []  # [domain, first row], one per run of one domain
        self.flagged = 0  # rows flagged unknown when they were made

    @property
    def rows(self) -> int:
        return self.pred.n

    def add(self, pred, mcm, labels, domain: str | None, flagged: int) -> None:
        """Rows' values for the online metrics (a segment starts where the domain changes),
        `flagged` of them unknown."""
        if not self.segments or self.segments[-1][0] != domain:
            self.segments.append([domain, self.rows])
        self.pred.extend(pred)
        self.mcm.extend(mcm)
        self.label.extend(labels)
        self.flagged += flagged

    def state(self, start: float) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays and plain data for a checkpoint, this session having begun at `start`
        (`time.perf_counter`); `load` reads them back (the rows' values are not in them)."""
        arrays = {"latency": self.latency.counts, "step": self.step_time.counts}
        meta = {
            "consumed": self.consumed,
            "rows": self.rows,
            "skipped": self.skipped,
            "digest": self.digest.hex(),
            "csv_bytes": self.csv_bytes,
            "elapsed_s": self.elapsed + time.perf_counter() - start,
            "sessions": self.sessions,
        }
        return arrays, meta

    def load(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Put back what `state` recorded, as a new session of the stream; the rows' values
        stay to be added, and the digest to be checked (ueo.stream.resume)."""
        self.consumed, self.skipped = meta["consumed"], meta["skipped"]
        self.csv_bytes = meta["csv_bytes"]
        self.elapsed, self.sessions = meta["elapsed_s"], meta["sessions"] + 1
        self.latency = Durations(arrays["latency"])
        self.step_time = Durations(arrays["step"])

    def online(self) -> dict | None:
        """ACC, AUROC, FPR95, H (and counts) of the rows as they were made, over the whole
        stream and each run of one domain; None when the images carry no labels."""
        labels = self.label.values
        if not self.rows or (labels == UNLABELED).any():
            return None
        pred, mcm = self.pred.values, self.mcm.values
        ends = [start for _, start in self.segments[1:]] + [self.rows]
        segments = [
            {
                "domain": domain,
                "first_row": start,
                "rows": end - start,
                "metrics": compute_metrics(pred[start:end], mcm[start:end], labels[start:end]),
            }
            for (domain, start), end in zip(self.segments, ends, strict=True)
        ]
        return {"all": compute_metrics(pred, mcm, labels), "segments": segments}
