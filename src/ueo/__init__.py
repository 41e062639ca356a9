"""ueo: realistic unsupervised fine-tuning of CLIP-style models with Universal Entropy Optimization.

`from ueo import load_model, adapt, evaluate, predict` gives the Python API (see ueo.api,
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

_API = (
    "AdaptResult",
    "Recipe",
    "Runtime",
    "adapt",
    "evaluate",
    "load_adapted",
    "load_model",
    "predict",
    "save_run",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from ueo import api

        return getattr(api, name)
    raise AttributeError(f"module 'ueo' has no attribute {name!r}")
