"""ueo: realistic unsupervised fine-tuning of CLIP-style models with Universal Entropy Optimization.

`from ueo import load_model, adapt, evaluate, predict, discover` gives the Python API (see ueo.api,
and ueo.jobs for what each command does); it is imported on first use so that `import ueo`
and the command line's parser stay free of torch.
"""

import os

__version__ = "0.1.0"

# Two defaults that must be set before PyTorch starts (docs/performance.md has the figures),
# unless the user chose: OpenMP threads that sleep while waiting (spinning ones collapse when
# another process holds a core), and large CPU tensors on 2 MB pages (20x fewer page faults).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

_API = (
    "AdaptResult",
    "DiscoverSettings",
    "Discovery",
    "MemoryImages",
    "Predictions",
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
