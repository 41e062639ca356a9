"""Unlabeled and labelled image sets: folders, image lists and loose images, read robustly.

Labels are stored per image as the index of its class in the *known* list, `OOD` (-1) for an
image of a class that is not on the list, or `UNLABELED` (-2). They are used for evaluation
and the oracle variant only. This module needs no torch (`ueo.deploy` reads images with it);
`ueo.loader` takes a set to the model.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress
from pathlib import Path
from typing import TextIO

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ueo.checks import STDIN, check_data
from ueo.deprecated import forwarding
from ueo.errors import UeoError
from ueo.images import to_rgb
from ueo.names import OOD, UNLABELED, normalize_name, read_lines, read_stream

log = logging.getLogger(__name__)

# Names this module held before the loader had a module of its own (and two it re-exported):
# still importable from here, with a DeprecationWarning, until the next release.
__getattr__ = forwarding(
    "ueo.data",
    {
        **dict.fromkeys(
            (
                "AUGMENTATION_DRAWS",
                "BadImages",
                "EpochOrder",
                "ImageDataset",
                "collate",
                "draw_seed",
                "keyed_draws",
                "make_loader",
            ),
            "ueo.loader",
        ),
        "open_rgb": "ueo.images",
        "parse_classes": "ueo.names",
    },
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


@dataclass
class ImageSet:
    """A list of image paths with known-class labels (see module docstring)."""

    paths: list[str]
    labels: np.ndarray
    source: str = ""

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise ValueError("paths and labels differ in length")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return bool(len(self)) and bool((self.labels != UNLABELED).all())

    def without_labels(self) -> ImageSet:
        """The same images, every label UNLABELED (`--unlabeled`)."""
        return ImageSet(self.paths, np.full(len(self), UNLABELED), self.source)

    def subset(self, keep: np.ndarray) -> ImageSet:
        keep = np.asarray(keep)
        idx = np.flatnonzero(keep) if keep.dtype == bool else keep
        return ImageSet([self.paths[i] for i in idx], self.labels[idx], self.source)


class MemoryImages(ImageSet):
    """Images a program already holds, read as ueo reads files: a list of PIL images (any
    mode, converted by `ueo.images.to_rgb`, transparency on white) or an N x H x W x 3 uint8
    array of RGB pixels. `paths` names them in the rows of `predict` (default: their
    positions, "0", "1", ...); they carry no labels."""

    def __init__(self, images, names: Sequence[str] | None = None):
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise UeoError(
                    f"An image array must be N x H x W x 3 uint8 (RGB), not {images.shape} "
                    f"{images.dtype}."
                )
        elif not all(isinstance(img, Image.Image) for img in images):
            raise UeoError("Images in memory are PIL images or an N x H x W x 3 uint8 array.")
        names = [str(i) for i in range(len(images))] if names is None else list(names)
        if len(names) != len(images):
            raise UeoError(f"{len(names)} names for {len(images)} images.")
        super().__init__(names, np.full(len(images), UNLABELED), "images in memory")
        self.images = images

    def rgb(self, i: int) -> Image.Image:
        """Image `i` as the RGB image ueo reads from a file holding it."""
        img = self.images[i]
        return Image.fromarray(img, "RGB") if isinstance(img, np.ndarray) else to_rgb(img)

    def subset(self, keep: np.ndarray) -> MemoryImages:
        keep = np.asarray(keep)
        idx = np.flatnonzero(keep) if keep.dtype == bool else keep
        images = self.images[idx] if isinstance(self.images, np.ndarray) else None
        if images is None:
            images = [self.images[i] for i in idx]
        return MemoryImages(images, [self.paths[i] for i in idx])


def load_image_set(
    data: str | os.PathLike,
    class_names: list[str],
    data_root: str | os.PathLike | None = None,
    check_exists: bool = True,
    *,
    unlabeled: bool = False,
    progress: bool = False,
    stdin: TextIO | None = None,
) -> ImageSet:
    """Read a class-folder tree, a folder of loose images, an image list or one image.

    A folder is a class-folder tree (`root/<class>/.../<image>`) when a subfolder holds images;
    images at its top are then left out, with a warning. Otherwise its top-level images form
    an unlabeled set. A file is one unlabeled image when its extension says so or PIL
    recognises it, else an image list (`read_image_list`); `data` "-" is a list read from
    `stdin` (default: standard input), its relative paths under `data_root` or the working
    folder.

    `unlabeled` reads the data without labels: a folder is every image under it, at any depth,
    in sorted order, whatever its subfolders are called; a list's labels are dropped.
    `progress` shows a counter while a large folder is listed.

    Symbolic links: a link (to a file or a folder) whose target lies inside the tree, or holds
    it, is not followed (the tree is read where it is, once); a folder link leading out of the
    tree is followed, at most once per target, so loops end; broken links are ignored.
    """
    if str(data) == STDIN:
        check_data(data)
        lines = read_stream(stdin or sys.stdin, "Standard input")
        root = Path(data_root) if data_root else Path()
        images = read_image_list(lines, "standard input", len(class_names), root, check_exists)
        return images.without_labels() if unlabeled else images
    path = Path(data)
    try:
        is_file = path.is_file()
    except OSError as exc:
        raise UeoError(f"Data path {path}: {exc.strerror}.") from None
    if is_file:
        if _is_image_file(path):
            return ImageSet([str(path)], np.array([UNLABELED]), str(path))
        root = Path(data_root) if data_root else path.parent
        lines = read_lines(path, "Image list")
        images = read_image_list(lines, str(path), len(class_names), root, check_exists)
        return images.without_labels() if unlabeled else images
    if not path.exists():
        raise UeoError(f"Data path {path} does not exist.")
    if not path.is_dir():
        raise UeoError(f"Data path {path} is not a file or a folder.")
    with _Walk(path, progress) as walk:
        try:
            entries = walk.entries(path)
        except OSError as exc:
            raise UeoError(f"Cannot read folder {path}: {exc.strerror}.") from None
        if unlabeled:
            paths = walk.below(entries)
            if not paths:
                raise UeoError(
                    f"No images found under {path} (extensions {', '.join(IMAGE_EXTENSIONS)})."
                )
            return ImageSet(paths, np.full(len(paths), UNLABELED), str(path))
        strays, folders = [], []
        for entry in entries:
            (folders if entry.is_dir() else strays).append(Path(entry.path))
        found = [(folder, walk.images(folder)) for folder in folders]
    if not any(files for _, files in found):
        if not strays:
            raise UeoError(
                f"No images found in {path} (expected root/<class>/<image>, loose images, "
                f"or an image-list file; extensions {', '.join(IMAGE_EXTENSIONS)})."
            )
        return ImageSet([str(p) for p in strays], np.full(len(strays), UNLABELED), str(path))
    if strays:
        log.warning(
            "Leaving out %d image(s) at the top of class-folder tree %s, e.g. %s: only images "
            "inside a class folder are used.",
            len(strays),
            path,
            strays[0].name,
        )
    index = {normalize_name(n): i for i, n in enumerate(class_names)}
    paths, labels = [], []
    for folder, files in found:
        paths += files
        labels.append(np.full(len(files), index.get(normalize_name(folder.name), OOD)))
    return ImageSet(paths, np.concatenate(labels), str(path))


def _is_image_file(path: Path) -> bool:
    """An image by its extension, or by a header PIL recognises (a too-large one included)."""
    if is_image(path):
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(path).close()
    except Image.DecompressionBombError:
        return True
    except Exception:  # PIL's format probes fail on other files with many exception types
        return False
    return True


class _Walk:
    """The image files of one tree, each folder read once (links: see `load_image_set`),
    with a counter of the images found once listing takes a while."""

    def __init__(self, top: Path, progress: bool):
        self.top = top
        self.root = os.path.realpath(top)
        self.visited: set[str] = set()
        self.links: list[str] = []
        self.bar = tqdm(desc=f"listing {top}", unit=" images", delay=2, disable=not progress)

    def __enter__(self) -> _Walk:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.links:
            log.warning(
                "Not following %d link(s) that lead back into %s, e.g. %s",
                len(self.links),
                self.top,
                self.links[0],
            )

    def entries(self, folder: str | Path) -> list[os.DirEntry]:
        """Sorted visible subfolders and image files of a folder, links into the tree set
        aside."""
        kept = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if os.path.commonpath([target, self.root]) in (target, self.root):
                    self.links.append(entry.path)  # inside, or holds, the tree
                    continue
            if entry.is_dir() or (entry.is_file() and is_image(Path(entry.path))):
                kept.append(entry)
        return kept

    def images(self, folder: Path) -> list[str]:
        """The image files under `folder` (none if it was read before)."""
        return self.below(self._unread(folder) or [])

    def below(self, entries: list[os.DirEntry]) -> list[str]:
        """The image files among `entries` and under their folders, depth first through
        sorted entries: in the order of their paths' parts."""
        found: list[str] = []
        stack = [iter(entries)]
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
            elif not entry.is_dir():
                found.append(entry.path)
                self.bar.update()
            elif (inner := self._unread(entry.path)) is not None:
                stack.append(iter(inner))
        return found

    def _unread(self, folder: str | Path) -> list[os.DirEntry] | None:
        """The entries of a folder not read before (by its real path); None when it was, or
        when it cannot be read (with a warning)."""
        real = os.path.realpath(folder)
        if real in self.visited:
            return None
        self.visited.add(real)
        try:
            return self.entries(folder)
        except OSError as exc:
            log.warning("Skipping unreadable folder %s: %s", folder, exc.strerror)
            return None


def read_image_list(
    lines: list[str], where: str, n_known: int, root: Path, check_exists: bool = True
) -> ImageSet:
    """An image list: `relative/path label` per line (a labelled list), or one path per line
    (an unlabeled list, `find photos -name '*.jpg'`), never the two mixed.

    A label is a whole number in ASCII digits; labels >= `n_known` are OOD. Blank lines and
    lines starting with # are skipped; relative paths are taken under `root`. A labelled list
    names images that must exist (a benchmark's list must be whole); from an unlabeled one,
    paths that do not exist are left out with one warning.
    """
    paths, labels = [], []
    first = None  # (line number, labelled) of the first entry
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = line.rstrip().rsplit(maxsplit=1)
        labelled = len(parts) == 2 and parts[1].isascii() and parts[1].isdigit()
        if first is None:
            first = number, labelled
        elif labelled != first[1]:
            raise UeoError(_mixed_list(where, number, line, labelled, first[0]))
        if labelled:
            label = int(parts[1])
            paths.append(str(root / parts[0]))
            labels.append(label if label < n_known else OOD)
        else:
            paths.append(str(root / text))
    if not paths:
        raise UeoError(f"Image list {where} has no entries.")
    labelled = first[1]
    if check_exists:
        missing = [i for i, p in enumerate(paths) if not os.path.exists(p)]
        if missing and labelled:
            raise UeoError(
                f"{len(missing)} image(s) listed in {where} do not exist under {root} "
                f"(set --data-root), e.g. {paths[missing[0]]}"
            )
        if len(missing) == len(paths):
            raise UeoError(
                f"None of the {len(paths)} image(s) listed in {where} exists (relative paths "
                f"are taken under {root or '.'}; set --data-root), e.g. {paths[0]}"
            )
        if missing:
            log.warning(
                "Leaving out %d of the %d image(s) listed in %s that do not exist, e.g. %s",
                len(missing),
                len(paths),
                where,
                paths[missing[0]],
            )
            keep = np.ones(len(paths), dtype=bool)
            keep[missing] = False
            paths = list(compress(paths, keep))
    if not labelled:
        return ImageSet(paths, np.full(len(paths), UNLABELED), where)
    return ImageSet(paths, np.array(labels), where)


def _mixed_list(where: str, number: int, line: str, labelled: bool, first: int) -> str:
    """The error of a list whose line `number` is not of the kind its first entry set."""
    if labelled:
        return (
            f"{where}:{number}: {line.strip()!r} ends in a label, but line {first} has none: "
            "an image list is all 'path label' lines or all plain paths."
        )
    return (
        f"{where}:{number}: expected 'relative/path label' with a label 0, 1, 2... as on line "
        f"{first}, got {line.strip()!r} (an image list is all 'path label' lines or all "
        "plain paths)."
    )
