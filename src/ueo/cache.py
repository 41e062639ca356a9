"""Decode once, and do per image only what differs per image.

A transform of the form `[PIL ops..., ToTensor, Normalize]` is split in two (`split_transform`):
the PIL ops run per image and give uint8 pixels; ToTensor's division by 255 and the
normalisation run once per batch (`Split.finish`). They are elementwise, so a batch gets the
very numbers the per-image transform gives, at a fraction of the per-image overhead.

Evaluation's PIL ops (resize, centre crop) are deterministic: their uint8 output is the same
at every pass, so it is kept per image. A training transform draws random numbers
(RandomResizedCrop, flip); only the decoded RGB image is kept, and the random operations run on
it at every epoch, as on a freshly decoded image: the same draws give the same crops, so
caching changes no number.

Entries are stored until the byte budget is spent; an image beyond it is decoded each time it
is used (no eviction: a pass visits every image, and evicting under such a scan would decode
everything again anyway). Data-loading worker processes each fill their own copy, which lives
as long as the worker (a training loader's workers last for the whole run).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms as T

from ueo import images

DEFAULT_BUDGET = 2 << 30  # bytes
DETERMINISTIC_OPS = (T.Resize, T.CenterCrop)
# PIL ops that keep an RGB image RGB: after them, pil_to_tensor gives ToTensor's uint8 input.
PIL_OPS = (
    *DETERMINISTIC_OPS,
    T.RandomResizedCrop,
    T.RandomCrop,
    T.RandomHorizontalFlip,
    T.RandomVerticalFlip,
)


def default_budget() -> int:
    """2 GiB, or a quarter of the machine's memory when that is less."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return DEFAULT_BUDGET
    return min(DEFAULT_BUDGET, memory // 4)


@dataclass(frozen=True)
class Split:
    """A transform as PIL ops per image, then ToTensor's scaling and Normalize per batch."""

    ops: tuple
    normalize: T.Normalize | None

    @property
    def deterministic(self) -> bool:
        return all(type(op) in DETERMINISTIC_OPS for op in self.ops)

    def pixels(self, img: Image.Image) -> torch.Tensor:
        """The PIL ops on one RGB image: uint8 pixels, channels first."""
        for op in self.ops:
            img = op(img)
        return T.functional.pil_to_tensor(img)

    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (one image or a batch) to the tensor the whole transform gives."""
        x = pixels.to(torch.get_default_dtype()).div(255)
        if self.normalize is None:
            return x
        return T.functional.normalize(x, self.normalize.mean, self.normalize.std, inplace=True)


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

    def pixels(self, path: str, split: Split) -> torch.Tensor:
        """`split.pixels(open_rgb(path))`, kept when the split's ops are deterministic."""
        if not split.deterministic:
            return split.pixels(self.image(path))
        key = (path, repr(split.ops))
        pixels = self._pixels.get(key)
        if pixels is None:
            pixels = split.pixels(self.image(path)).contiguous()
            if self._fits(pixels.numel()):
                self._pixels[key] = pixels
        return pixels
