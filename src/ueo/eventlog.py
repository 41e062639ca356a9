"""Learning curves as TensorBoard events (`--log tensorboard`), beside a run's plain files.

Evaluations (metrics where labels exist, label-free scores) are written as they happen, so a
long run can be watched with `tensorboard --logdir`; the training loss and learning rates of
every epoch are written when training ends. Events go to `<run folder>/tensorboard/`; the
run's metrics.json holds the same numbers.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

from ueo.errors import UeoError
from ueo.recipe import Runtime

EVENTS_DIR = "tensorboard"
SETS = ("unlabeled", "test")


class EventLog:
    """Scalars of one run, step = epoch (0 = zero-shot)."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self._writer = SummaryWriter(str(folder))
        self._closed = weakref.finalize(self, self._writer.close)  # also if the run fails

    def evaluation(self, point: dict) -> None:
        """One curves entry of metrics.json: per set its metrics, and the label-free scores."""
        epoch = point["epoch"]
        for name in SETS:
            for metric, value in (point.get(name) or {}).items():
                if isinstance(value, float):
                    self._writer.add_scalar(f"{name}/{metric}", value, epoch)
        for key, value in (point.get("label_free") or {}).items():
            if value is not None:
                self._writer.add_scalar(f"label_free/{key}", value, epoch)
        self._writer.flush()

    def history(self, history: list[dict]) -> None:
        """Each epoch's mean training loss and the learning rate per parameter group it
        started with."""
        for record in history:
            if record["loss"] is not None:
                self._writer.add_scalar("train/loss", record["loss"], record["epoch"])
            for group, (first, _) in record["lr"].items():
                self._writer.add_scalar(f"train/lr_{group}", first, record["epoch"])
        self._writer.flush()

    def close(self) -> None:
        self._closed()


class NoEventLog:
    """`--log files`: nothing beyond metrics.json and log.txt."""

    def evaluation(self, point: dict) -> None:
        pass

    def history(self, history: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


def open_event_log(runtime: Runtime, run_folder: str | os.PathLike | None) -> EventLog | NoEventLog:
    """The event log `runtime.log` asks for; TensorBoard events need a run folder."""
    if runtime.log != "tensorboard":
        return NoEventLog()
    if run_folder is None:
        raise UeoError("--log tensorboard writes into the run folder: give adapt a checkpoint_dir.")
    return EventLog(Path(run_folder) / EVENTS_DIR)
