"""Decode each image once: decoded images and test-transform pixels kept in memory, bounded.

Evaluation uses a deterministic transform (resize, centre crop, to tensor, normalise), so its
output before normalisation, a uint8 tensor, is the same at every pass: it is kept per image
and normalised again when used, which gives the very tensor the whole transform gives (the
division by 255 and the normalisation are the same operations in the same order).

A training transform draws random numbers (RandomResizedCrop, flip); only the decoded RGB
image is kept, and the random operations run on it at every epoch, as on a freshly decoded
image: the same draws give the same crops, so caching changes no number.

Entries are stored until the byte budget is spent; an image beyond it is decoded each time it
is used (no eviction: a pass visits every image, and evicting under such a scan would decode
everything again anyway). Data-loading worker processes each fill their own copy, which lives
as long as the worker (a training loader's workers last for the whole run).
"""

from __future__ import annotations

import os
import warnings

import torch
from PIL import Image
from torchvision import transforms as T

from ueo import images

DEFAULT_BUDGET = 2 << 30  # bytes
DETERMINISTIC_OPS = (T.Resize, T.CenterCrop)


def default_budget() -> int:
    """2 GiB, or a quarter of the machine's memory when that is less."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return DEFAULT_BUDGET
    return min(DEFAULT_BUDGET, memory // 4)


def split_deterministic(transform) -> tuple[list, T.Normalize | None] | None:
    """(pixel ops, normalisation) of a `Compose` of resizes/crops, ToTensor and Normalize;
    None for a transform that is not such a chain (a random one, for instance)."""
    ops = getattr(transform, "transforms", None)
    if not ops or not any(isinstance(op, T.ToTensor) for op in ops):
        return None
    at = next(i for i, op in enumerate(ops) if isinstance(op, T.ToTensor))
    pixel_ops, tail = ops[:at], ops[at + 1 :]
    if not all(type(op) in DETERMINISTIC_OPS for op in pixel_ops):
        return None
    if len(tail) > 1 or (tail and not isinstance(tail[0], T.Normalize)):
        return None
    return pixel_ops, tail[0] if tail else None


class ImageCache:
    """Decoded images and test-transform pixels of the images a run uses (module docstring).

    `budget` bytes at most (default `default_budget()`); 0 keeps nothing. `decodes` counts the
    images decoded through this cache.
    """

    def __init__(self, budget: int | None = None):
        self.budget = default_budget() if budget is None else budget
        self.used = 0
        self.decodes = 0
        self._decoded: dict[str, Image.Image] = {}
        self._pixels: dict[tuple[str, str], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._decoded) + len(self._pixels)

    def __getstate__(self) -> dict:
        """A worker process started by pickling gets an empty cache of the same budget."""
        return {"budget": self.budget}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["budget"])

    def _fits(self, nbytes: int) -> bool:
        if self.used + nbytes > self.budget:
            return False
        self.used += nbytes
        return True

    def image(self, path: str) -> Image.Image:
        """The decoded RGB image (`ueo.images.open_rgb`); callers must not modify it."""
        img = self._decoded.get(path)
        if img is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = images.open_rgb(path)
            self.decodes += 1
            if self._fits(img.width * img.height * len(img.getbands())):
                self._decoded[path] = img
        return img

    def transformed(self, path: str, transform) -> torch.Tensor:
        """`transform(open_rgb(path))`, from the cached pixels when the transform is
        deterministic, from the cached decoded image otherwise."""
        split = split_deterministic(transform)
        if split is None:
            return transform(self.image(path))
        pixel_ops, normalize = split
        key = (path, repr(pixel_ops))
        pixels = self._pixels.get(key)
        if pixels is None:
            img = self.image(path)
            for op in pixel_ops:
                img = op(img)
            pixels = T.functional.pil_to_tensor(img).contiguous()
            if self._fits(pixels.numel()):
                self._pixels[key] = pixels
        x = pixels.to(torch.get_default_dtype()).div(255)
        return normalize(x) if normalize is not None else x
