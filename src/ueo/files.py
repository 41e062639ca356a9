"""Files written so that readers never see half of one, and strict JSON. Torch-free.

Every JSON file ueo writes is strict JSON: NaN and Infinity are refused, not written. A place
that cannot be written is a one-line error naming it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ueo.errors import UeoError


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path` in one step
    (with the usual file mode), on failure it is removed: readers never see half a file.

    A place that cannot be written (a folder under a file, a read-only or full disk) is a
    one-line UeoError naming `path`, not a traceback."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UeoError(f"Cannot write {path}: {exc.strerror or exc}.") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        raise UeoError(f"Cannot write {path}: {exc.strerror or exc}.") from None
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text so readers never see a half-written file."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data) -> Path:
    """Strict JSON (a NaN or Inf is a ValueError, never written), atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, default=jsonable, allow_nan=False)
    return write_text(path, text + "\n")


def jsonable(obj):
    """What `json` cannot write itself: numpy and torch scalars and arrays, paths."""
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
