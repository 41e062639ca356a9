"""ueo: realistic unsupervised fine-tuning of CLIP-style models with Universal Entropy Optimization.

`from ueo import load_model, adapt, evaluate, predict, discover` gives the Python API (see ueo.api,
and ueo.jobs for what each command does); it is imported on first use so that `import ueo`
and the command line's parser stay free of torch.
"""

import os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting for each other collapse when another process holds
# a core (measured: a tiny model's forward 10-20x slower with two spinning threads on two
# busy cores); sleeping waits cost nothing when the cores are free. It must be set before
# PyTorch starts its thread pool, so it is set here, unless the user chose a policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# A training step frees and reallocates gigabytes of activations. glibc hands blocks over
# 32 MB back to the kernel, which faults them in again 4 KB at a time at the next step (RN50,
# 345 classes, batch 32: ~800,000 page faults and ~2 s of system time per step). PyTorch's
# THP_MEM_ALLOC_ENABLE backs large CPU tensors with 2 MB pages: 20x fewer faults, half the
# system time, ~10% off the step (docs/performance.md). PyTorch reads it once, at its first
# allocation after import (checked: setting it after `import torch` works), so ueo sets it
# here, before any model is built, unless the user chose.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

_API = (
    "AdaptResult",
    "DiscoverSettings",
    "Discovery",
    "Recipe",
    "Runtime",
    "Vocabulary",
    "adapt",
    "discover",
    "evaluate",
    "load_adapted",
    "load_model",
    "load_vocabulary",
    "predict",
    "save_run",
    "without_known",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from ueo import api

        return getattr(api, name)
    raise AttributeError(f"module 'ueo' has no attribute {name!r}")
