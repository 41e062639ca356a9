"""ueo: realistic unsupervised fine-tuning of CLIP-style models with Universal Entropy Optimization.

`from ueo import load_model, adapt, evaluate, predict` gives the Python API (see ueo.api);
it is imported on first use so that `import ueo` stays cheap.
"""

__version__ = "0.1.0"

_API = (
    "AdaptConfig",
    "AdaptResult",
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
