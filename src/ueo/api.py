"""The Python API behind every CLI command: load, adapt, save, evaluate, predict."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ueo import __version__
from ueo.adaptation import AdaptConfig, AdaptResult, adapt
from ueo.clip import load_clip
from ueo.data import BadImages, ImageSet
from ueo.errors import UeoError
from ueo.inference import infer, metrics_of
from ueo.io import ADAPTER_FILE, load_adapter, save_adapter, write_json
from ueo.model import UeoModel
from ueo.prompts import DEFAULT_CTX_INIT
from ueo.runtime import resolve_device

__all__ = [
    "AdaptConfig",
    "AdaptResult",
    "adapt",
    "evaluate",
    "load_adapted",
    "load_model",
    "predict",
    "save_run",
]


def load_model(
    model: str,
    pretrained: str,
    class_names: list[str],
    n_ctx: int | None = None,
    ctx_init: str | None = DEFAULT_CTX_INIT,
    device: str = "cpu",
) -> UeoModel:
    """A zero-shot model ready to adapt: prompts initialised from `ctx_init`."""
    dev = resolve_device(device)
    return UeoModel(load_clip(model, pretrained, dev), class_names, n_ctx, ctx_init).to(dev)


def load_adapted(
    adapter: str | os.PathLike, device: str = "cpu", pretrained: str | None = None
) -> tuple[UeoModel, dict]:
    """Rebuild an adapted model from its adapter file (base weights named in its metadata)."""
    tensors, meta = load_adapter(adapter)
    model = load_model(
        meta["model"],
        pretrained or meta["pretrained"],
        meta["class_names"],
        meta["n_ctx"],
        meta["ctx_init"] or None,
        device,
    )
    model.load_adapter_state(tensors)
    return model, meta


def adapter_metadata(model: UeoModel, result: AdaptResult | None = None) -> dict:
    """Everything needed to rebuild the model and use it, stored inside the adapter."""
    meta = {
        "ueo_version": __version__,
        "model": model.clip.model_name,
        "pretrained": model.clip.pretrained,
        "class_names": model.class_names,
        "n_ctx": model.prompt.n_ctx,
        "ctx_init": model.prompt.ctx_init,
    }
    if result is not None:
        meta["method"] = result.config["method"]
        meta["threshold"] = result.threshold
        meta["threshold_rule"] = "otsu(MCM scores of the adapted model on the unlabeled set)"
    return meta


def save_run(
    out: str | os.PathLike, model: UeoModel, result: AdaptResult, extra: dict | None = None
) -> dict:
    """Write `adapter.safetensors` and `metrics.json` into `out`; returns the metrics record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(out / ADAPTER_FILE, model.adapter_state(), adapter_metadata(model, result))
    record = run_record(model, result, extra)
    write_json(out / "metrics.json", record)
    return record


def run_record(model: UeoModel, result: AdaptResult, extra: dict | None = None) -> dict:
    """The content of metrics.json: metrics before and after, settings, cost."""
    return {
        "ueo_version": __version__,
        "model": model.clip.model_name,
        "pretrained": model.clip.pretrained,
        "num_classes": model.prompt.num_classes,
        "settings": {**result.config, **(extra or {})},
        "zeroshot": result.metrics["zeroshot"],
        "adapted": result.metrics["adapted"],
        "threshold": result.threshold,
        "history": result.history,
        "wall_time_s": round(result.wall_time_s, 3),
        "skipped_images": result.skipped_images,
    }


def evaluate(
    model: UeoModel,
    images: ImageSet,
    device: str = "auto",
    batch_size: int = 256,
    workers: int = 0,
    precision: str = "fp32",
    on_bad_image: str = "skip",
    progress: bool = True,
) -> dict:
    """ACC, GACC, AUROC, FPR95 and H of `model` on a labelled set (OOD = classes not known)."""
    if not images.labelled:
        raise UeoError(f"{images.source} carries no labels; evaluation needs labelled images.")
    dev = resolve_device(device)
    model.to(dev)
    bad = BadImages(on_bad_image)
    out = infer(model, images, dev, batch_size, workers, precision, bad, "evaluate", progress)
    metrics = metrics_of(out, images)
    metrics["skipped_images"] = len(bad)
    return metrics


def predict(
    model: UeoModel,
    images: ImageSet,
    threshold: float,
    device: str = "auto",
    batch_size: int = 256,
    workers: int = 0,
    precision: str = "fp32",
    progress: bool = True,
) -> list[dict]:
    """One row per readable image: predicted known class, its probability, MCM, unknown flag.

    The class probability is the softmax of 100 * cos (the scale used in training); the MCM
    score is the softmax of the raw cosines (T = 1), compared with `threshold`.
    """
    dev = resolve_device(device)
    model.to(dev)
    bad = BadImages("skip")
    out = infer(model, images, dev, batch_size, workers, precision, bad, "predict", progress)
    logits = 100.0 * out.cos
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    rows = []
    for i, path in enumerate(images.paths):
        if not out.valid[i]:
            continue
        k = int(out.pred[i])
        score = float(out.score[i])
        rows.append(
            {
                "path": path,
                "pred": model.class_names[k],
                "prob": float(probs[i, k]),
                "mcm": score,
                "is_unknown": bool(score < threshold),
            }
        )
    return rows
