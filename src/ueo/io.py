"""Atomic file writes and the adapter file format (safetensors + JSON metadata).

Every JSON file ueo writes is strict JSON: NaN and Infinity are refused, not written.
An adapter's metadata records `tensors_sha256`, a checksum of its tensors, and is checked
when read (`load_adapter`): a file changed after it was written is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# The output-path checks live in the torch-free ueo.checks (the command line runs them before
# it imports torch); re-exported here, where writing files is.
from ueo.checks import check_output_dir as check_output_dir
from ueo.checks import check_output_file as check_output_file
from ueo.errors import UeoError
from ueo.layout import ADAPTER_FILE as ADAPTER_FILE
from ueo.recipe import Recipe


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path` in one step
    (with the usual file mode), on failure it is removed: readers never see half a file.

    A place that cannot be written (a folder under a file, a read-only or full disk) is a
    one-line UeoError naming `path`, not a traceback."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UeoError(f"Cannot write {path}: {exc.strerror or exc}.") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        raise UeoError(f"Cannot write {path}: {exc.strerror or exc}.") from None
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text so readers never see a half-written file."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data) -> Path:
    """Strict JSON (a NaN or Inf is a ValueError, never written), atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_jsonable, allow_nan=False)
    return write_text(path, text + "\n")


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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
        text = json.dumps(meta, default=_jsonable, allow_nan=False)
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
