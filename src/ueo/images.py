"""Turning an image file into an RGB PIL image, safely: any mode, any bit depth, bounded memory.

The rules, chosen so that every file gives the image a person would see, or a clear error:

- Transparency (an alpha channel, a transparent palette entry or colour key) is composited on
  a white background, as a viewer or a web page shows it: the colour stored under transparent
  pixels is arbitrary (often black) and would otherwise leak into the image.
- 16-bit grayscale (`I;16`, `I;16B`, `I;16L`) is scaled by 255/65535. 32-bit integer (`I`)
  carries no bit depth, so it is scaled from the narrowest of the 8-, 16- or 31-bit ranges
  that holds its largest value; negative values are clipped to 0.
- Float (`F`) values are taken in [0, 1] when the largest finite value is at most 1, else in
  [0, 255]; values outside are clipped and NaN reads as 0.
- A JPEG is decoded at a reduced scale (DCT scaling, a power of two) while both sides stay at
  least `DRAFT_SIZE`, twice the largest model input (448): the transforms shrink it anyway.
- An image larger than `MAX_PIXELS` after that, or one that PIL's own decompression-bomb guard
  flags (`Image.MAX_IMAGE_PIXELS`), is refused with `BadImageError` before it is decoded.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

DRAFT_SIZE = 896
MAX_PIXELS = 64_000_000
BACKGROUND = (255, 255, 255)
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


class BadImageError(OSError):
    """A file that is an image, but not one we decode (too large)."""


def open_rgb(path: str) -> Image.Image:
    """Open any image as RGB, checking its size from the header before decoding it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(str(exc)) from None
    with img:
        img.draft("RGB", (DRAFT_SIZE, DRAFT_SIZE))
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise BadImageError(
                f"{width}x{height} pixels exceed the limit of {MAX_PIXELS / 1e6:g} megapixels"
            )
        img.load()
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """The RGB image a viewer would show for a decoded image of any mode (rules above)."""
    if img.mode.startswith("I;16"):
        return _gray(np.asarray(img, dtype=np.float64) / 257.0)
    if img.mode == "I":
        values = np.asarray(img, dtype=np.float64)
        top = values.max(initial=0.0)
        full = 255.0 if top <= 255 else 65535.0 if top <= 65535 else 2.0**31 - 1
        return _gray(values * (255.0 / full))
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.max() <= 1 else 1.0
        return _gray(np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0))
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _gray(values: np.ndarray) -> Image.Image:
    """An RGB image from gray levels on the 0-255 scale (rounded, clipped)."""
    levels = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(levels).convert("RGB")
