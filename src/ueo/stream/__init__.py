"""`ueo stream`: adapt while predicting, on images that arrive one batch at a time.

`online` is the engine (predict a batch, then one update on it; the Python API,
`OnlineStream`), `run` writes a stream into its run folder with checkpoints (`stream_job`,
`run_stream`), `source` reads the images as they come, `threshold` keeps Otsu's threshold
over the stream, `tda` is TDA's caches, `settings` says what determines the numbers
(torch-free). The names below are imported on first use, so that `ueo.stream.settings` stays
light for the command line.
"""

import importlib

_API = {
    "OnlineStream": "online",
    "StreamSettings": "settings",
    "TdaSettings": "settings",
    "stream_job": "run",
    "run_stream": "run",
    "stream_entries": "source",
    "RunningOtsu": "threshold",
    "Tda": "tda",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'ueo.stream' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ueo.stream.{_API[name]}"), name)
