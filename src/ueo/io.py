"""Atomic file writes and the adapter file format (safetensors + JSON metadata)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ueo.errors import UeoError

ADAPTER_FILE = "adapter.safetensors"


def atomic_path(path: str | os.PathLike) -> Path:
    """A temporary sibling of `path` (usual file mode); rename it over `path` once written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text so readers never see a half-written file."""
    tmp = atomic_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return Path(path)


def write_json(path: str | os.PathLike, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_adapter(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Only the tuned tensors, with everything needed to rebuild the model in the metadata."""
    tmp = atomic_path(path)
    try:
        flat = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        save_file(flat, str(tmp), metadata={"ueo": json.dumps(metadata, default=_jsonable)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return Path(path)


def load_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an adapter; safetensors never executes code, so any file is safe to open."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise UeoError(f"Adapter file {path} not found.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise UeoError(f"{path} is not a readable safetensors adapter: {exc}") from exc
    if "ueo" not in meta:
        raise UeoError(f"{path} has no ueo metadata; it was not written by `ueo adapt`.")
    return tensors, json.loads(meta["ueo"])
