"""Device, precision, CPU share and seeding choices shared by adaptation and inference."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from ueo.cpus import available_cpus
from ueo.errors import UeoError
from ueo.launch import share
from ueo.recipe import Runtime

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise UeoError(f"Unknown device '{device}' (use cpu, cuda, cuda:N or auto).") from exc
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UeoError(f"Unsupported device '{device}' (use cpu, cuda, cuda:N or auto).")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UeoError(f"--device {device} was asked for but no CUDA GPU is available.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UeoError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) exist."
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UeoError("--device mps was asked for but MPS is not available.")
    return dev


def checked_runtime(runtime: Runtime | None = None, precision: str = "fp32") -> Runtime:
    """`runtime` validated, its device resolved and able to run `precision`, so that a missing
    GPU is reported before any data or model is loaded."""
    runtime = (runtime or Runtime()).validate()
    autocast(resolve_device(runtime.device), precision)
    return runtime


def autocast(device: torch.device, precision: str):
    """Low-precision compute for the forward pass; parameters and the loss stay fp32."""
    if precision not in DTYPES:
        raise UeoError(f"--precision must be one of {', '.join(DTYPES)}, not {precision!r}.")
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if device.type != "cuda" and dtype == torch.float16:
        raise UeoError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU.")
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_available_cpus() -> int:
    """Never more intra-op threads than the CPUs this process may use; returns the count."""
    cpus = available_cpus()
    if torch.get_num_threads() > cpus:
        torch.set_num_threads(cpus)
    return torch.get_num_threads()


def default_workers() -> int:
    """Data-loading processes when none are asked for: one per spare CPU, at most 4; under
    torchrun, of this process's share of the machine's CPUs."""
    return max(0, min(4, share(available_cpus()) - 1))
