"""Checks of a command's inputs and outputs that need no heavy library (torch-free).

The command line runs them before it imports torch, so that a mistyped path or value is
answered at once; the jobs (ueo.jobs, ueo.bench.jobs, ueo.demo.runner) run the same checks
for Python callers, before any model or data is loaded.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from ueo.errors import UeoError
from ueo.launch import launch_from_env

STDIN = "-"  # `--data -`: the image list comes from standard input


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Fail early, in one line, unless `path` is (or can be made) a writable directory.

    Writability is tested by creating and removing a temporary file in the directory, or in
    its nearest existing ancestor when it does not exist yet (nothing is left behind).
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise UeoError(f"{what} {path} is a file, not a directory.")
        _check_writable(_existing_folder(path, path, what), path, what)
    except OSError as exc:  # e.g. a name too long for the file system
        raise UeoError(f"{what} {path}: {exc.strerror or exc}.") from None
    return path


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """Fail early, in one line, unless `path` can be written as a regular file (replaced
    atomically if it exists): not a directory (nor a name ending in a slash, which means
    one), a device or a pipe, in a writable place."""
    if str(path).endswith(("/", os.sep)):
        example = Path(path) / "predictions.csv"
        raise UeoError(f"{what} {path} names a folder; give a file name, e.g. {example}.")
    path = Path(path)
    try:
        if path.is_dir():
            raise UeoError(f"{what} {path} is a directory; give a file name.")
        if path.exists() and not path.is_file():
            raise UeoError(f"{what} {path} exists and is not a regular file.")
        _check_writable(_existing_folder(path.parent, path, what), path, what)
    except OSError as exc:
        raise UeoError(f"{what} {path}: {exc.strerror or exc}.") from None
    return path


def check_input_path(path: str | os.PathLike, what: str = "Data path") -> Path:
    """`path` must exist (a file or a folder); what it holds is read later."""
    path = Path(path)
    try:
        found = path.exists()
    except OSError as exc:  # e.g. a name too long for the file system
        raise UeoError(f"{what} {path}: {exc.strerror or exc}.") from None
    if not found:
        raise UeoError(f"{what} {path} does not exist.")
    return path


def check_data(data: str | os.PathLike, what: str = "Data path") -> None:
    """`--data`: a path that exists, or `-`, standard input, which only a process alone can
    read (torchrun's processes would each take a part of it)."""
    if str(data) != STDIN:
        check_input_path(data, what)
    elif launch_from_env().size > 1:
        raise UeoError(
            "--data - reads the image list from standard input, which torchrun's processes "
            "cannot share: write the list to a file and give its name."
        )


def check_resume_overwrite(resume: bool, overwrite: bool) -> None:
    """A run folder is continued (`--resume`) or replaced (`--overwrite`), not both."""
    if resume and overwrite:
        raise UeoError("Give --resume or --overwrite, not both.")


def check_eval_source(adapter: bool, zeroshot: bool, model: bool, classes: bool) -> None:
    """`ueo eval` evaluates an adapter (which names its model and classes) or the zero-shot
    model of `--model` and `--classes`."""
    if adapter == zeroshot:
        raise UeoError("Give either --adapter or --zeroshot (with --model and --classes).")
    if adapter and (model or classes):
        raise UeoError("--model and --classes go with --zeroshot; an adapter names its own.")
    if zeroshot and not (model and classes):
        raise UeoError(
            "A zero-shot evaluation needs --model and --classes (--pretrained: default openai)."
        )


def check_threshold(threshold: float | None) -> None:
    """An MCM threshold is a softmax probability: a number in [0, 1] (None: the adapter's)."""
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise UeoError(f"--threshold must be a number in [0, 1], not {threshold!r}.")
    if not 0.0 <= threshold <= 1.0:  # NaN fails both comparisons
        raise UeoError(f"--threshold must be in [0, 1] (an MCM score), not {threshold}.")


def _existing_folder(start: Path, path: Path, what: str) -> Path:
    """`start` if it is a directory, else its nearest existing ancestor, which must be one."""
    for folder in (start, *start.absolute().parents):
        if folder.exists():
            if not folder.is_dir():
                raise UeoError(f"{what} {path}: {folder} is a file, not a directory.")
            return folder
    raise UeoError(f"{what} {path}: no existing parent directory.")


def _check_writable(folder: Path, path: Path, what: str) -> None:
    """Create and remove a temporary file in `folder`: the one sure test of writability."""
    try:
        fd, name = tempfile.mkstemp(prefix=".ueo-write-test.", dir=folder)
    except OSError as exc:
        raise UeoError(f"{what} {path} is not writable ({folder}: {exc.strerror}).") from None
    os.close(fd)
    os.unlink(name)


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """An option's value must be an integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UeoError(f"--{name} must be an integer >= {low}, not {value!r}.")
    if high is not None and value > high:
        raise UeoError(f"--{name} must be an integer <= {high}, not {value!r}.")


def check_float(name: str, value, high: float | None = None) -> None:
    """An option's value must be a finite number >= 0 (and <= high)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UeoError(f"--{name} must be a number, not {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise UeoError(f"--{name} must be a finite number >= 0, not {value!r}.")
    if high is not None and value > high:
        raise UeoError(f"--{name} must be at most {high:.4g} (fp32's range), not {value!r}.")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    """An option's value must be one of `choices`."""
    if value not in choices:
        raise UeoError(f"--{name} must be one of {', '.join(choices)}, not {value!r}.")
