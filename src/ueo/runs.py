"""The files of a run: the adapter (tuned tensors + metadata) and metrics.json."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from ueo import __version__
from ueo.adaptation import AdaptResult
from ueo.io import ADAPTER_FILE, save_adapter, write_json
from ueo.model import UeoModel

METRICS_FILE = "metrics.json"
LOG_FILE = "log.txt"
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
    """The content of metrics.json: metrics before and after, recipe, cost."""
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
        "threshold": result.threshold,
        "history": result.history,
        "curves": result.curves,
        "wall_time_s": round(result.wall_time_s, 3),
        "skipped_images": result.skipped_images,
    }
