"""`ueo stream`: adapt while predicting, on images that arrive one batch at a time.

`online` is the engine (predict a batch, then one update on it; the Python API,
`OnlineStream`): `answers` makes a batch's rows and flags the unknown ones, `updates` is what a
batch does to the model by kind of method (nothing, TDA's caches, a step), `zeroshot` keeps
the zero-shot state beside the adapted one (resets, UEO's weights). `run` writes a stream into
its run folder (`stream_job`, `run_stream`): `history` is what the stream has recorded (counts,
latencies, the online metrics), `resume` its checkpoint, written and read back; `reader`
decodes a batch ahead, `source` reads the images as they come. `threshold` keeps Otsu's
threshold over the stream, `tda` is TDA's caches, `settings` says what determines the numbers
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
