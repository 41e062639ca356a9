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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ueo import __version__
from ueo.distributed import current_world
from ueo.errors import UeoError
from ueo.files import atomic_write
from ueo.fingerprint import describe_changes
from ueo.layout import CHECKPOINT_FILE

META_KEY = "ueo_checkpoint"
FORMAT = 1


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during training: a checkpoint was written, the run can be resumed."""


@dataclass
class RunCheckpoint:
    """Where a run's checkpoint goes (None: the run writes none), the identity it carries
    (ueo.fingerprint.run_identity), and the checkpoint it resumes from."""

    path: Path | None
    identity: dict | None = None
    saved: tuple[dict[str, torch.Tensor], dict] | None = None

    @classmethod
    def open(cls, folder: str | os.PathLike | None, identity: dict, resume: bool) -> RunCheckpoint:
        """The checkpoint of a run in `folder`; with `resume`, the one there if any, refused
        when made with another identity. Every process of a run resumes from it, or none."""
        if folder is None:
            return cls(None)
        checkpoint = cls(Path(folder) / CHECKPOINT_FILE, identity)
        if resume and checkpoint.path.is_file():
            checkpoint.saved = load_checkpoint(checkpoint.path)
            check_identity(checkpoint.path, checkpoint.saved[1].get("identity", {}), identity)
        found = [bool(p[0]) for p in current_world().exchange([checkpoint.saved is not None])]
        if len(set(found)) > 1:
            missing = [r for r, f in enumerate(found) if not f]
            raise UeoError(
                f"Process(es) {missing} do not see the checkpoint {checkpoint.path} that process "
                f"{found.index(True)} resumes from: --out must be on storage every machine shares."
            )
        return checkpoint

    def write(self, trainer, state: dict, epoch_start: torch.Tensor) -> None:
        """Save a training run (`ueo.training.Trainer`): its tuned tensors, the method's fixed
        values, optimiser, schedule, generators and the data order's position, with `state`
        (its `TrainState`) and this run's identity."""
        opt_tensors, opt_state = pack_optimizer(trainer.optimizer.state_dict())
        rng_tensors, rng_json = rng_state()
        tuned = trainer.model.adapter_state(trainer.recipe.norm_layers)
        tensors = {f"tuned/{k}": v for k, v in tuned.items()}
        tensors.update({f"fixed/{k}": v for k, v in trainer.fixed_all_images.items()})
        tensors.update(opt_tensors)
        tensors.update(rng_tensors)
        tensors["order/epoch_start"] = epoch_start
        meta = {
            "identity": self.identity,
            **state,
            "batches_per_epoch": trainer.batches,
            "optimizer": opt_state,
            "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
            "rng": rng_json,
        }
        save_checkpoint(self.path, tensors, meta)

    def restore(self, trainer) -> dict:
        """Put a training run back where this checkpoint left it: tuned tensors, optimiser,
        schedule, the data order's generator, every RNG. Returns the saved state's fields."""
        tensors, meta = self.saved
        trainer.model.load_adapter_state(under_prefix(tensors, "tuned"), trainer.recipe.norm_layers)
        trainer.optimizer.load_state_dict(unpack_optimizer(tensors, meta["optimizer"]))
        trainer.scheduler.load_state_dict(meta["scheduler"])
        if trainer.scaler is not None and meta.get("scaler"):
            trainer.scaler.load_state_dict(meta["scaler"])
        trainer.order.generator.set_state(tensors["order/epoch_start"])
        set_rng_state(tensors, meta["rng"])
        return meta

    def kept_note(self) -> str:
        """The end of an error message: where the last good checkpoint is, if there is one."""
        if self.path is not None and self.path.is_file():
            return f"; the last good checkpoint is kept in {self.path}"
        return ""


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


def under_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
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
    for name, value in under_prefix(tensors, "optim").items():
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
    cuda = under_prefix(tensors, "rng/cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([cuda[k] for k in sorted(cuda, key=int)])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
