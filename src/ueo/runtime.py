"""Device, precision and seeding choices shared by adaptation and inference."""

from __future__ import annotations

import contextlib
import io
import logging
import random
from collections.abc import Iterator

import numpy as np
import torch

from ueo.errors import UeoError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UeoError(f"Unknown device '{device}' (use cpu, cuda, cuda:N or auto).") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UeoError("--device cuda was asked for but no CUDA GPU is available.")
    return dev


def autocast(device: torch.device, precision: str):
    """Low-precision compute for the forward pass; parameters and the loss stay fp32."""
    if precision not in PRECISIONS:
        raise UeoError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}.")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if device.type != "cuda" and dtype == torch.float16:
        raise UeoError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU.")
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")


@contextlib.contextmanager
def captured_log(name: str = "ueo") -> Iterator[io.StringIO]:
    """What `name` and its children log (INFO and up) while the block runs: a run's log.txt."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(LOG_FORMAT)
    logger = logging.getLogger(name)
    level = logger.level
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield buffer
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """Silence open_clip's messages, which go to the root logger (and, with no handler there,
    make `logging` install one on stderr): ueo says what matters in its own words."""
    root = logging.getLogger()
    level = root.level
    silence = logging.NullHandler()
    root.addHandler(silence)
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.removeHandler(silence)
        root.setLevel(level)
