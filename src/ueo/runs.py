"""The files of a run: the adapter (tuned tensors + metadata) and metrics.json.

A run is written into a staging folder next to its run folder (`.<name>.partial`), which
also holds its checkpoint and log while it runs, and is swapped in when it is complete
(`publish`): a run folder holds one whole run, never a mix of two.

The adapter file is safetensors (which never executes code when read) with the metadata key
`ueo`, strict JSON: what rebuilds the model (`model`, `pretrained`, `class_names`, `recipe`),
`threshold`, and `tensors_sha256`, a checksum of the tensors; all checked when it is read
(`load_adapter`): a file changed after it was written is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ueo import __version__
from ueo.adaptation import AdaptResult
from ueo.errors import UeoError
from ueo.files import atomic_write, jsonable, write_json
from ueo.layout import ADAPTER_FILE, CHECKPOINT_FILE, LOG_FILE, METRICS_FILE
from ueo.logs import logged_to
from ueo.model import UeoModel
from ueo.recipe import Recipe

log = logging.getLogger("ueo")

THRESHOLD_RULE = "otsu(MCM scores of the adapted model on the unlabeled set)"


def build_adapter_metadata(model: UeoModel, result: AdaptResult) -> dict:
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
    save_adapter(out / ADAPTER_FILE, state, build_adapter_metadata(model, result))
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
        "environment": result.environment,
        **({"identity": result.identity} if result.identity is not None else {}),
    }


def adapt_into(
    out: Path,
    model: UeoModel,
    run: Callable[[Path], AdaptResult],
    extra: dict,
    *,
    log_header: str = "",
    writes: bool = True,
    also: Callable[[Path, AdaptResult], None] | None = None,
) -> dict:
    """One adaptation written into `out` as one whole run: staging folder, run, save, publish.

    `run(staging)` adapts `model` with its checkpoints in the staging folder, which also gets
    the log as it goes (after `log_header`); then adapter.safetensors and metrics.json (with
    `extra`) and whatever `also` writes there, and the folder is swapped in for `out`. A
    process that `writes` nothing (not the main one of a torchrun world) only runs. Returns
    the metrics record. Whether an earlier staging folder is resumed or discarded is the
    caller's policy (`ueo adapt` refuses, a sweep discards).
    """
    staging = staging_dir(out)
    if writes:
        staging.mkdir(parents=True, exist_ok=True)
    with logged_to(staging / LOG_FILE, log_header) if writes else nullcontext():
        result = run(staging)
        if not writes:
            return run_record(model, result, extra)
        if also is not None:
            also(staging, result)
        record = save_run(staging, model, result, extra)
        log.info("wrote %s (%.1f s)", out, result.wall_time_s)
    publish(staging, out)
    return record


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


REQUIRED_METADATA = {
    "ueo_version": str,
    "model": str,
    "pretrained": str,
    "class_names": list,
    "recipe": dict,
    "threshold": (int, float),
    "tensors_sha256": str,
}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_adapter(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Only the tuned tensors, with everything needed to rebuild the model in the metadata.

    Non-finite tensors or metadata are refused: an adapter is always usable."""
    flat = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    bad = [k for k, v in flat.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise UeoError(f"Refusing to write {path}: tensor {bad[0]} holds NaN or Inf.")
    meta = {**metadata, "tensors_sha256": tensors_sha256(flat)}
    with atomic_write(path) as tmp:
        text = json.dumps(meta, default=jsonable, allow_nan=False)
        save_file(flat, str(tmp), metadata={"ueo": text})
    return Path(path)


def load_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an adapter; safetensors never executes code, so any file is safe to open."""
    path = Path(path)
    try:
        if path.is_dir():
            path = path / ADAPTER_FILE
        found = path.is_file()
    except OSError as exc:  # e.g. a name too long for the file system
        raise UeoError(f"Adapter {path}: {exc.strerror}.") from None
    if not found:
        raise UeoError(f"Adapter file {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UeoError(f"{path} is not a readable safetensors adapter: {reason}") from exc
    if "ueo" not in meta:
        raise UeoError(f"{path} has no ueo metadata; it was not written by `ueo adapt`.")
    try:
        info = json.loads(meta["ueo"], parse_constant=_reject_constant)
    except ValueError as exc:
        raise UeoError(f"{path}: its ueo metadata is not valid JSON ({exc}).") from None
    _check_metadata(path, info, tensors)
    return tensors, info


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _check_metadata(path: Path, info, tensors: dict[str, torch.Tensor]) -> None:
    """Keys, types, a valid recipe, finite threshold and the tensors' checksum; each failure
    is one line."""
    if not isinstance(info, dict):
        raise UeoError(f"{path}: its ueo metadata is not a JSON object.")
    missing = [k for k in REQUIRED_METADATA if k not in info]
    if missing:
        raise UeoError(f"{path}: its ueo metadata misses {', '.join(missing)}.")
    for key, kind in REQUIRED_METADATA.items():
        value = info[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UeoError(f"{path}: metadata {key} has the wrong type ({type(value).__name__}).")
    names = info["class_names"]
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise UeoError(f"{path}: metadata class_names must be a non-empty list of names.")
    if not math.isfinite(info["threshold"]) or not 0.0 <= info["threshold"] <= 1.0:
        raise UeoError(f"{path}: its threshold {info['threshold']} is not a number in [0, 1].")
    for key in ("model", "pretrained"):
        if not info[key].strip():
            raise UeoError(f"{path}: metadata {key} is empty.")
    try:
        Recipe.from_dict(info["recipe"]).validate()
    except (UeoError, TypeError) as exc:
        raise UeoError(f"Adapter {path} stores an invalid recipe: {exc}") from None
    if tensors_sha256(tensors) != info["tensors_sha256"]:
        raise UeoError(
            f"{path}: its tensors do not match the checksum in its metadata (the file was "
            "changed or damaged after it was written)."
        )
