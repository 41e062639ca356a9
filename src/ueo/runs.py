"""The files of a run: the adapter (tuned tensors + metadata) and metrics.json.

A run is written into a staging folder next to its run folder (`.<name>.partial`), which
also holds its checkpoint and log while it runs, and is swapped in when it is complete
(`publish`): a run folder holds one whole run, never a mix of two.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from ueo import __version__
from ueo.adaptation import AdaptResult
from ueo.checkpoint import CHECKPOINT_FILE
from ueo.io import ADAPTER_FILE, save_adapter, write_json
from ueo.layout import LOG_FILE as LOG_FILE
from ueo.layout import METRICS_FILE as METRICS_FILE
from ueo.model import UeoModel
from ueo.runtime import LOG_FORMAT

THRESHOLD_RULE = "otsu(MCM scores of the adapted model on the unlabeled set)"


def adapter_metadata(model: UeoModel, result: AdaptResult) -> dict:
    """Everything needed to rebuild the model and use it, stored inside the adapter."""
    return {
        "ueo_version": __version__,
        "model": model.clip.model_name,
        "pretrained": model.clip.pretrained,
        "class_names": model.class_names,
        "recipe": asdict(result.recipe),
        "threshold": result.threshold,
        "threshold_rule": THRESHOLD_RULE,
    }


def save_run(
    out: str | os.PathLike, model: UeoModel, result: AdaptResult, extra: dict | None = None
) -> dict:
    """Write `adapter.safetensors` and `metrics.json` into `out`; returns the metrics record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = model.adapter_state(result.recipe.norm_layers)
    save_adapter(out / ADAPTER_FILE, state, adapter_metadata(model, result))
    record = run_record(model, result, extra)
    write_json(out / METRICS_FILE, record)
    return record


def run_record(model: UeoModel, result: AdaptResult, extra: dict | None = None) -> dict:
    """The content of metrics.json: metrics and label-free scores before and after, recipe,
    cost (`timings_s`: where the wall time went, per phase)."""
    return {
        "ueo_version": __version__,
        "model": model.clip.model_name,
        "pretrained": model.clip.pretrained,
        "num_classes": model.prompt.num_classes,
        "recipe": asdict(result.recipe),
        "fingerprint": result.recipe.fingerprint(),
        **(extra or {}),
        "zeroshot": result.metrics["zeroshot"],
        "adapted": result.metrics["adapted"],
        "label_free": result.label_free,
        "threshold": result.threshold,
        "history": result.history,
        "curves": result.curves,
        "wall_time_s": round(result.wall_time_s, 3),
        "timings_s": result.timings,
        "skipped_images": result.skipped_images,
        "skipped_steps": result.skipped_steps,
        **({"identity": result.identity} if result.identity is not None else {}),
    }


def staging_dir(out: str | os.PathLike) -> Path:
    """Where a run of `out` is written until it is complete (and its checkpoint lives)."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def is_finished(out: str | os.PathLike) -> bool:
    """Whether `out` holds the files of a finished run."""
    out = Path(out)
    return (out / ADAPTER_FILE).is_file() or (out / METRICS_FILE).is_file()


def publish(staging: Path, out: Path) -> None:
    """Swap a complete staging folder in for `out` (its checkpoint is no longer needed).

    Two renames: the old run is moved aside, then the new one takes its place, and only then
    is the old one deleted; a reader never sees a folder that mixes the two.
    """
    (staging / CHECKPOINT_FILE).unlink(missing_ok=True)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)


@contextmanager
def logged_to(path: Path, header: str = "") -> Iterator[None]:
    """Append what the `ueo` logger says to `path` as it happens (a run's log.txt), and an
    error or an interrupt that ends the block: the log survives a kill and says why it ended."""
    logger = logging.getLogger("ueo")
    with open(path, "a", encoding="utf-8") as f:
        f.write(header)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(LOG_FORMAT)
    handler.setLevel(logging.INFO)
    level = logger.level
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    except KeyboardInterrupt as exc:
        _to_file(handler, logging.WARNING, f"interrupted: {exc or 'KeyboardInterrupt'}")
        raise
    except BaseException as exc:
        _to_file(
            handler,
            logging.ERROR,
            f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
        )
        raise
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def _to_file(handler: logging.Handler, level: int, message: str) -> None:
    """A line for the log file only: the terminal gets the error from the command line."""
    handler.handle(logging.LogRecord("ueo", level, __file__, 0, message, None, None))
