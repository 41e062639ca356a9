"""Decode each image once per run, in memory every loader process shares; per image only what
differs per image.

A transform of the form `[PIL ops..., ToTensor, Normalize]` is split in two (`split_transform`):
the PIL ops run per image and give uint8 pixels, which stay uint8 through the loader, the
worker-to-main queue and the copy to the device; ToTensor's division by 255 and the
normalisation then run once per batch, where the batch is (`Split.finish`). They are elementwise
IEEE operations, so a batch gets the very numbers the per-image transform gives, on any device.

`ImageCache` keeps the decoded RGB images (`ueo.images.open_rgb`) of a run, and the uint8 output
of evaluation's deterministic PIL ops (resize, centre crop), in anonymous shared memory made by
the main process: DataLoader workers are forked from it and map the same pages, so an image
decoded by any process (the zero-shot pass's workers, which end with that pass, the main
process, a training worker) is there for every other, in one copy. A training transform's random
operations (RandomResizedCrop, flip) run on the stored image at every epoch, as on a freshly
decoded one: caching changes no number.

Entries are stored until the byte budget is spent; an image beyond it is decoded each time it is
used (no eviction: a pass visits every image, and evicting under such a scan would decode
everything again anyway). Memory is taken as images arrive (the pages of an anonymous mapping
are given on first write), so no header scan is needed up front: on a large set on network
storage that scan alone would cost what decoding once saves. A worker started by 'spawn' or
'forkserver' (macOS, Windows) cannot map the parent's memory: it gets a private store, as every
worker had before the store was shared (`__setstate__`).
"""

from __future__ import annotations

import bisect
import mmap
import multiprocessing
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from ueo import images
from ueo.launch import share
from ueo.pathkeys import KEY, lookup, path_key, path_keys

MAX_BUDGET = 16 << 30  # bytes: the shared store's default cap
PRIVATE_BUDGET = 2 << 30  # bytes: the cap of a spawned worker's private store
DETERMINISTIC_OPS = (T.Resize, T.CenterCrop)
# PIL ops that keep an RGB image RGB: after them, pil_to_tensor gives ToTensor's uint8 input.
PIL_OPS = (
    *DETERMINISTIC_OPS,
    T.RandomResizedCrop,
    T.RandomCrop,
    T.RandomHorizontalFlip,
    T.RandomVerticalFlip,
)
# One row of the shared table per stored array: its state, where its bytes are, its shape.
EMPTY, WRITING, READY = 0, 1, 2
STATE, OFFSET, NBYTES, SHAPE = 0, 1, 2, slice(3, 6)
ROW = 6
USED, DECODES, STORED = 0, 1, 2  # the shared counters


def default_budget() -> int:
    """A quarter of the memory this process may use (cgroup limit included), at most 16 GiB;
    under torchrun, of this process's share of the machine (each process keeps its own)."""
    memory = available_memory()
    return share(MAX_BUDGET if memory is None else min(MAX_BUDGET, memory // 4))


def available_memory() -> int | None:
    """Physical memory, capped by a cgroup v2 `memory.max` (or v1 limit); None if unknown."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():
            memory = min(memory, int(value))
    return memory


@dataclass(frozen=True)
class Split:
    """A transform as PIL ops per image, then ToTensor's scaling and Normalize per batch."""

    ops: tuple
    normalize: T.Normalize | None
    key: str = field(init=False, compare=False, repr=False)
    _constants: dict = field(init=False, compare=False, repr=False, default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "key", repr(self.ops))  # names the ops' output in the cache
        if self.normalize is not None and any(s == 0 for s in self.normalize.std):
            raise ValueError(f"{self.normalize}: a std of 0 would divide by zero.")

    def __getstate__(self) -> dict:
        """Pickled without the device constants (a spawned worker makes its own)."""
        return {"ops": self.ops, "normalize": self.normalize}

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "ops", state["ops"])
        object.__setattr__(self, "normalize", state["normalize"])
        object.__setattr__(self, "_constants", {})
        self.__post_init__()

    @property
    def deterministic(self) -> bool:
        return all(type(op) in DETERMINISTIC_OPS for op in self.ops)

    def pixels(self, img: Image.Image) -> torch.Tensor:
        """The PIL ops on one RGB image: uint8 pixels, channels first."""
        for op in self.ops:
            img = op(img)
        return T.functional.pil_to_tensor(img)

    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (one image or a batch, on any device) to what the whole transform gives.

        ToTensor's `x / 255` and Normalize's `(x - mean) / std`, each one IEEE operation per
        element, so the result is bit for bit the per-image transform's on a CPU or a GPU. The
        divisors are tensors on the pixels' device: CUDA multiplies by the reciprocal of a
        Python-number divisor, which differs from `x / 255` for 126 of the 256 values. They are
        made once per device (no copy, hence no synchronisation, per batch).
        """
        x = pixels.to(torch.get_default_dtype())
        scale, mean, std = self._on(x.device, x.dtype)
        x = x.div_(scale)
        if self.normalize is None:
            return x
        return x.sub_(mean).div_(std)

    def _on(self, device: torch.device, dtype: torch.dtype) -> tuple:
        """255, the mean and the std as `dtype` tensors on `device` (what Normalize builds)."""
        key = (str(device), dtype)
        if key not in self._constants:
            scale = torch.full((), 255, dtype=dtype, device=device)
            mean = std = None
            if self.normalize is not None:
                mean = torch.as_tensor(self.normalize.mean, dtype=dtype).view(-1, 1, 1)
                std = torch.as_tensor(self.normalize.std, dtype=dtype).view(-1, 1, 1)
                mean, std = mean.to(device), std.to(device)
            self._constants[key] = scale, mean, std
        return self._constants[key]


def split_transform(transform) -> Split | None:
    """The `Split` of a `Compose` of `PIL_OPS`, ToTensor and at most a Normalize; None for
    any other transform (it then runs whole, per image)."""
    ops = getattr(transform, "transforms", None)
    if not ops or not any(type(op) is T.ToTensor for op in ops):
        return None
    at = next(i for i, op in enumerate(ops) if type(op) is T.ToTensor)
    pixel_ops, tail = ops[:at], ops[at + 1 :]
    if not all(type(op) in PIL_OPS for op in pixel_ops):
        return None
    if len(tail) > 1 or (tail and type(tail[0]) is not T.Normalize):
        return None
    return Split(tuple(pixel_ops), tail[0] if tail else None)


def _shared(nbytes: int) -> mmap.mmap:
    """Anonymous memory that processes forked after this call share (pages given on write)."""
    if os.name == "nt":
        return mmap.mmap(-1, nbytes)
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_NORESERVE", 0))


class RowIndex:
    """Where each registered path's arrays have their table rows: per kind of array (None:
    decoded images; a Split's key: its pixels), the sorted keys of the paths (ueo.pathkeys)
    and their rows. A million images cost a few arrays of numbers, not a million dict
    entries. The tables are shared memory made by the process that registers; a copy of the
    index unpickled elsewhere (a spawned worker) gets tables of its own."""

    def __init__(self):
        self.index: dict[str | None, tuple[np.ndarray, np.ndarray]] = {}
        self.tables: list[np.ndarray] = []  # one per registration that added rows
        self.starts: list[int] = []  # the first row of each table
        self.rows = 0  # rows assigned

    def __getstate__(self) -> dict:
        return {"index": self.index, "rows": self.rows}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.index = state["index"]
        if state["rows"]:
            self._claim(state["rows"])

    def add(self, kind: str | None, paths: np.ndarray) -> None:
        """Rows in `kind`'s index for the path keys it does not hold yet."""
        keys, rows = self.index.get(kind, (np.zeros(0, KEY), np.zeros(0, np.int64)))
        new = np.unique(paths)
        new = new[lookup(keys, new) < 0]
        if not len(new):
            return
        first = self._claim(len(new))
        keys = np.concatenate([keys, new])
        rows = np.concatenate([rows, np.arange(first, first + len(new))])
        order = np.argsort(keys, kind="stable")
        self.index[kind] = keys[order], rows[order]

    def _claim(self, n: int) -> int:
        """`n` new rows, in a shared table of their own; the first row's number."""
        self.tables.append(np.frombuffer(_shared(n * ROW * 8), np.int64).reshape(n, ROW))
        self.starts.append(self.rows)
        self.rows += n
        return self.starts[-1]

    def find(self, kind: str | None, path: str) -> tuple[np.ndarray, int] | None:
        """The table and row of `path`'s array of `kind`, if it was registered."""
        keys, rows = self.index.get(kind, (None, None))
        if keys is None:
            return None
        found = int(lookup(keys, np.array([path_key(path)], dtype=KEY))[0])
        if found < 0:
            return None
        row = int(rows[found])
        t = bisect.bisect_right(self.starts, row) - 1
        return self.tables[t], row - self.starts[t]


class ImageCache:
    """Decoded images and test-transform pixels of the images a run uses (module docstring).

    Made in the main process before any loader that uses it starts its workers. `budget`
    bytes at most (default `default_budget()`); 0 keeps nothing. `decodes` counts the images
    decoded through this store by every process that shares it; `used` and `len()` are the
    bytes and arrays stored.

    Each stored array has a row in a shared table (its state, offset and shape); the rows are
    assigned by the process that made the store (`register`, called by `ImageDataset` when a
    loader is built), so a worker forked afterwards knows where every image of its set goes.
    A row is found by its path's key (`RowIndex`). A lock orders the claims and the ready
    flags; an array is written once and never moves.
    """

    def __init__(self, budget: int | None = None):
        self.budget = default_budget() if budget is None else int(budget)
        self._lock = multiprocessing.Lock()
        self._counters = np.frombuffer(_shared(3 * 8), np.int64)
        self._arena = _shared(self.budget) if self.budget > 0 else None
        self._rows = RowIndex()

    def __getstate__(self) -> dict:
        """A worker started by pickling ('spawn', 'forkserver') cannot map this memory..."""
        return {"budget": self.budget, "rows": self._rows}

    def __setstate__(self, state: dict) -> None:
        """...so it gets a private store of its own, capped as a worker's store was before,
        with rows (tables of its own) for the images registered so far."""
        self.__init__(min(state["budget"], PRIVATE_BUDGET))
        if self._arena is not None:
            self._rows = state["rows"]

    def __len__(self) -> int:
        return int(self._counters[STORED])

    @property
    def used(self) -> int:
        return int(self._counters[USED])

    @property
    def decodes(self) -> int:
        return int(self._counters[DECODES])

    def register(self, paths: Iterable[str], split: Split | None = None) -> None:
        """Rows for the decoded images of `paths` (and their pixels under `split`, when its ops
        are deterministic), so that loader workers forked from now on can store them."""
        if self._arena is None:
            return
        keys = path_keys(paths)
        self._rows.add(None, keys)
        if split is not None and split.deterministic:
            self._rows.add(split.key, keys)

    def _get(self, kind: str | None, path: str) -> np.ndarray | None:
        """The stored array of `kind` for `path` (read-only, shared), or None if not stored."""
        row = self._rows.find(kind, path)
        if row is None:
            return None
        table, i = row
        with self._lock:  # the writer set READY under the lock, after writing the bytes
            state, offset, nbytes, *shape = table[i].tolist()
        if state != READY:
            return None
        stored = np.frombuffer(self._arena, np.uint8, nbytes, offset).reshape(shape)
        stored.flags.writeable = False
        return stored

    def _put(self, kind: str | None, path: str, array: np.ndarray) -> None:
        """Store `array` (uint8, 3-D) as `path`'s of `kind` if it has a row and fits."""
        row = self._rows.find(kind, path)
        if row is None:
            return
        table, i = row
        with self._lock:
            used = int(self._counters[USED])
            if table[i, STATE] != EMPTY or used + array.nbytes > self.budget:
                return
            self._counters[USED] = used + array.nbytes
            table[i, STATE] = WRITING
        np.frombuffer(self._arena, np.uint8, array.nbytes, used)[:] = array.reshape(-1)
        with self._lock:
            table[i, OFFSET], table[i, NBYTES] = used, array.nbytes
            table[i, SHAPE] = array.shape
            table[i, STATE] = READY
            self._counters[STORED] += 1

    def image(self, path: str) -> Image.Image:
        """The decoded RGB image (`ueo.images.open_rgb`), decoded once for every process."""
        stored = self._get(None, path)
        if stored is not None:
            return Image.fromarray(stored)  # RGB is copied: the store is never written through
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = images.open_rgb(path)
        with self._lock:
            self._counters[DECODES] += 1
        if img.mode == "RGB":
            self._put(None, path, np.asarray(img))
        return img

    def pixels(self, path: str, split: Split) -> torch.Tensor:
        """`split.pixels(open_rgb(path))`, kept when the split's ops are deterministic."""
        if not split.deterministic:
            return split.pixels(self.image(path))
        stored = self._get(split.key, path)
        if stored is not None:
            return torch.from_numpy(stored.copy())
        pixels = split.pixels(self.image(path)).contiguous()
        self._put(split.key, path, pixels.numpy())
        return pixels
