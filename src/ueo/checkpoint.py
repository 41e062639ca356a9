"""Training checkpoints: one safetensors file, tensors plus a JSON state, written atomically.

A checkpoint holds what `ueo.adaptation` needs to continue a run as if it had never stopped:
the tuned tensors, the optimizer's and the scheduler's state, the method's fixed per-sample
values, every random generator (torch's global one, the data order's, numpy's, python's and
CUDA's), the position in the data order (the epoch in progress, the batches done in it, the
data-order generator's state at that epoch's start), the losses and curves so far, and the
run's identity (ueo.fingerprint.run_identity) that a resume must match.

Tensors are stored under prefixed names (`tuned/`, `fixed/`, `optim/`, `rng/`); everything
else is strict JSON in the metadata key `ueo_checkpoint`. One file, replaced in one step, so a
kill at any moment leaves either the previous checkpoint or the new one. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ueo import __version__
from ueo.errors import UeoError
from ueo.fingerprint import describe_changes
from ueo.io import atomic_write
from ueo.layout import CHECKPOINT_FILE as CHECKPOINT_FILE

META_KEY = "ueo_checkpoint"
FORMAT = 1


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during training: a checkpoint was written, the run can be resumed."""


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write tensors and a JSON-able state as one file, atomically."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "ueo_version": __version__, **state}
    with atomic_write(path) as tmp:
        save_file(flat, str(tmp), metadata={META_KEY: json.dumps(meta, allow_nan=False)})
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint; a damaged file is a one-line UeoError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors, json and KeyError: all mean "not a checkpoint"
        raise UeoError(f"{path} is not a readable ueo checkpoint ({exc}); start over.") from None
    if meta.get("format") != FORMAT:
        raise UeoError(f"{path} has checkpoint format {meta.get('format')}, not {FORMAT}.")
    return tensors, meta


def check_identity(path: str | os.PathLike, stored: dict, current: dict) -> None:
    """Refuse to resume a run made with other settings, naming them."""
    changes = describe_changes(stored, current)
    if changes:
        raise UeoError(
            f"Cannot resume from {path}: it was made with other settings: {'; '.join(changes)}. "
            "Use the original settings, or start over."
        )


def sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors stored under `prefix/`, without the prefix."""
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


def pack_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as tensors (`optim/<param>/<key>`) and JSON (the rest)."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unpack_optimizer(tensors: dict[str, torch.Tensor], packed: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in sub(tensors, "optim").items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in packed["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": packed["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every global generator: torch (and CUDA) as uint8 tensors, numpy and python as JSON."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }
    return tensors, state


def set_rng_state(tensors: dict[str, torch.Tensor], state: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sub(tensors, "rng/cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([cuda[k] for k in sorted(cuda, key=int)])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
