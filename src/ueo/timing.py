"""Where a command's wall time goes: seconds per named phase, as `metrics.json` records them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Clock:
    """Seconds per phase (`with clock("training"): ...`); a phase inside another counts for
    itself only, and `phases()` names the rest of the time since the clock started `other`."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.open: list[str] = []

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self.open.append(phase)
        try:
            yield
        finally:
            self.open.pop()
            elapsed = time.perf_counter() - t0
            self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed
            if self.open:
                self.seconds[self.open[-1]] = self.seconds.get(self.open[-1], 0.0) - elapsed

    def total(self) -> float:
        return time.perf_counter() - self.start

    def phases(self, other: bool = True) -> dict[str, float]:
        """Seconds per phase, rounded to the millisecond, and (`other`) the rest of the time."""
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        if other:
            out["other"] = round(self.total() - sum(self.seconds.values()), 3)
        return out
