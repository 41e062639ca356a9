"""What made a result, besides its recipe and data: the software and the hardware.

"I can't reproduce your numbers" is most often answered by package versions and devices.
Every result ueo writes (`metrics.json` of adapt and eval, `discover.json`, a bench cell and
the bench report) records `environment()`; `differences` names what two records differ in,
for `ueo diagnose` and the bench report.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "open_clip_torch", "numpy")
# How each recorded field is named to the user.
FIELD_NAMES = {
    "python": "Python",
    "torch": "torch",
    "open_clip_torch": "open_clip",
    "numpy": "numpy",
    "ueo": "ueo",
    "ueo_commit": "ueo's commit",
    "device": "the device",
    "threads": "CPU threads",
    "precision": "the precision",
}


def environment(device: str = "cpu", precision: str = "fp32") -> dict:
    """Python and package versions, ueo's version and commit (from a git checkout, else
    None), the device `device` names (`auto` resolved: a CPU's model, or the GPU's name and
    how many this machine has), this process's CPU threads and the autocast `precision`."""
    import torch

    from ueo import __version__
    from ueo.runtime import resolve_device

    record = {"python": platform.python_version()}
    record.update({name: _version(name) for name in PACKAGES})
    record.update(ueo=__version__, ueo_commit=_commit())
    dev = resolve_device(str(device))
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev.index or 0)
        record["device"] = f"{name} x{torch.cuda.device_count()}"
    elif dev.type == "mps":
        record["device"] = f"Apple MPS ({_cpu_model()})"
    else:
        record["device"] = _cpu_model()
    record["threads"] = torch.get_num_threads()
    record["precision"] = precision
    return record


def differences(records: list[dict | None], names: list[str], shown: int = 3) -> list[str]:
    """One phrase per field in which the records' environments differ, with each value and
    the records that hold it (at most `shown` named): "torch: 2.14.1 (a, b), 2.13.0 (c)".
    Records without one (made by an older ueo) are said once."""
    found = []
    missing = [n for r, n in zip(records, names, strict=True) if not r]
    present = [(r, n) for r, n in zip(records, names, strict=True) if r]
    for field, title in FIELD_NAMES.items():
        holders: dict[str, list[str]] = {}
        for record, name in present:
            holders.setdefault(str(record.get(field)), []).append(name)
        if len(holders) > 1:
            values = ", ".join(f"{v} ({_few(n, shown)})" for v, n in holders.items())
            found.append(f"{title}: {values}")
    if missing and present:
        found.append(f"no record of the software (made by an older ueo): {_few(missing, shown)}")
    return found


def _few(names: list[str], shown: int) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def _commit() -> str | None:
    """The commit of the git checkout ueo runs from (`+dirty` with uncommitted changes), or
    None for an installed package."""
    source = Path(__file__).resolve().parent
    try:
        head = _git(source, "rev-parse", "HEAD")
        if head is None or _git(source, "ls-files", "--error-unmatch", "__init__.py") is None:
            return None  # not ueo's own checkout (a venv inside another repository, say)
        dirty = _git(source, "status", "--porcelain", "--untracked-files=no", ".")
        return head + ("+dirty" if dirty else "")
    except OSError:  # no git on this machine
        return None


def _git(folder: Path, *args: str) -> str | None:
    done = subprocess.run(
        ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10
    )
    return done.stdout.strip() if done.returncode == 0 else None


@lru_cache(maxsize=1)
def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or sys.platform
