"""Atomic file writes and the adapter file format (safetensors + JSON metadata)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ueo.errors import UeoError

ADAPTER_FILE = "adapter.safetensors"


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path` in one step
    (with the usual file mode), on failure it is removed: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
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
    flat = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    with atomic_write(path) as tmp:
        save_file(flat, str(tmp), metadata={"ueo": json.dumps(metadata, default=_jsonable)})
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
