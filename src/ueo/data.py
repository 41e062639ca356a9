"""Unlabeled and labelled image sets: folders, image lists and loose images, read robustly.

Labels are stored per image as the index of its class in the *known* list, `OOD` (-1) for an
image of a class that is not on the list, or `UNLABELED` (-2). They are used for evaluation
and the oracle variant only.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from ueo.errors import UeoError

log = logging.getLogger(__name__)

OOD = -1
UNLABELED = -2
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def normalize_name(name: str) -> str:
    """Compare class names the way folders are matched: case-insensitive, `_` == space."""
    return " ".join(name.replace("_", " ").lower().split())


def parse_classes(spec: str) -> list[str]:
    """Class names from a text file (one per line) or a comma-separated list."""
    path = Path(spec)
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        names = [line.strip() for line in lines]
        where = [f"{path}:{i + 1}" for i in range(len(names))]
    elif "," in spec or (spec.strip() and not path.suffix):
        names = [n.strip() for n in spec.split(",")]
        where = [f"item {i + 1} of --classes" for i in range(len(names))]
    else:
        raise UeoError(f"Class file {spec} not found (give a file or a comma-separated list).")
    if not names:
        raise UeoError(f"No class names in {spec}.")
    for name, loc in zip(names, where, strict=True):
        if not name:
            raise UeoError(f"Empty class name at {loc}.")
    seen: dict[str, str] = {}
    for name, loc in zip(names, where, strict=True):
        key = normalize_name(name)
        if key in seen:
            raise UeoError(f"Duplicated class name '{name}' at {loc} (same as '{seen[key]}').")
        seen[key] = name
    return names


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


@dataclass
class ImageSet:
    """A list of image paths with known-class labels (see module docstring)."""

    paths: list[str]
    labels: np.ndarray
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise ValueError("paths and labels differ in length")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return bool(len(self)) and bool((self.labels != UNLABELED).all())

    def subset(self, keep: np.ndarray) -> ImageSet:
        keep = np.asarray(keep)
        idx = np.flatnonzero(keep) if keep.dtype == bool else keep
        return ImageSet([self.paths[i] for i in idx], self.labels[idx], self.source)


def load_image_set(
    data: str | os.PathLike,
    class_names: list[str],
    data_root: str | os.PathLike | None = None,
    check_exists: bool = True,
) -> ImageSet:
    """Read an image folder, an image-list file or a folder of loose unlabeled images."""
    path = Path(data)
    if path.is_file():
        return _read_list(
            path, len(class_names), Path(data_root) if data_root else path.parent, check_exists
        )
    if not path.is_dir():
        raise UeoError(f"Data path {path} does not exist.")
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if any(p.is_file() and is_image(p) for p in entries):
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and is_image(p))
        return ImageSet(files, np.full(len(files), UNLABELED), str(path))
    folders = [p for p in entries if p.is_dir()]
    index = {normalize_name(n): i for i, n in enumerate(class_names)}
    paths, labels = [], []
    for folder in folders:
        label = index.get(normalize_name(folder.name), OOD)
        for f in sorted(folder.rglob("*")):
            if f.is_file() and is_image(f):
                paths.append(str(f))
                labels.append(label)
    if not paths:
        raise UeoError(
            f"No images found in {path} (expected root/<class>/<image>, loose images, "
            f"or an image-list file; extensions {', '.join(IMAGE_EXTENSIONS)})."
        )
    return ImageSet(paths, np.array(labels), str(path))


def _read_list(path: Path, n_known: int, root: Path, check_exists: bool) -> ImageSet:
    """`relative/path label` per line; labels >= number of known classes are OOD."""
    paths, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rstrip().rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UeoError(f"{path}:{number}: expected 'relative/path label', got {line!r}.")
        label = int(parts[1])
        if label < 0:
            raise UeoError(f"{path}:{number}: negative label {label}.")
        paths.append(str(root / parts[0]))
        labels.append(label if label < n_known else OOD)
    if not paths:
        raise UeoError(f"Image list {path} has no entries.")
    if check_exists:
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise UeoError(
                f"{len(missing)} image(s) listed in {path} do not exist under {root} "
                f"(set --data-root), e.g. {missing[0]}"
            )
    return ImageSet(paths, np.array(labels), str(path))


def open_rgb(path: str) -> Image.Image:
    """Open any image as RGB (grayscale, palette, RGBA and CMYK included)."""
    with Image.open(path) as img:
        img.load()
        if img.mode == "P" or img.mode == "LA":
            img = img.convert("RGBA")
        return img.convert("RGB")


class ImageDataset(Dataset):
    """Yields (image, index, error); an unreadable image gives an error string, not a crash."""

    def __init__(self, images: ImageSet, transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        path = self.images.paths[i]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = open_rgb(path)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            return None, i, f"{path}: {exc}"
        return self.transform(img), i, None


class BadImages:
    """Collects unreadable images across epochs and sets; fatal when the user asked for it.

    An image is identified by its message, which starts with its path: a dataset index is not
    enough, since one tracker serves both the unlabeled and the test set.
    """

    def __init__(self, policy: str = "skip"):
        if policy not in ("skip", "error"):
            raise UeoError(f"--on-bad-image must be 'skip' or 'error', not {policy!r}.")
        self.policy = policy
        self.seen: dict[str, int] = {}

    def report(self, index: int, message: str) -> None:
        if self.policy == "error":
            raise UeoError(f"Unreadable image: {message}")
        if message not in self.seen:
            self.seen[message] = index
            log.warning("Skipping unreadable image %s", message)

    def __len__(self) -> int:
        return len(self.seen)


def collate(batch):
    """Stack the readable images; pass the unreadable ones on as (index, message)."""
    good = [(x, i) for x, i, err in batch if err is None]
    bad = [(i, err) for _, i, err in batch if err is not None]
    images = torch.stack([x for x, _ in good]) if good else None
    index = torch.tensor([i for _, i in good], dtype=torch.long)
    return images, index, bad


def make_loader(
    images: ImageSet,
    transform,
    batch_size: int,
    shuffle: bool,
    workers: int,
    device: torch.device,
    seed: int = 0,
) -> DataLoader:
    """A loader that keeps an accelerator fed: worker processes, pinned memory, reuse."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        ImageDataset(images, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=generator,
    )
