"""Unlabeled and labelled image sets: folders, image lists and loose images, read robustly.

Labels are stored per image as the index of its class in the *known* list, `OOD` (-1) for an
image of a class that is not on the list, or `UNLABELED` (-2). They are used for evaluation
and the oracle variant only.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from itertools import compress
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ueo.cache import ImageCache, split_transform
from ueo.checks import STDIN, check_data
from ueo.errors import UeoError
from ueo.images import open_rgb as open_rgb  # re-exported: the reading rules live in ueo.images
from ueo.names import OOD, UNLABELED, normalize_name, read_lines, read_stream
from ueo.names import parse_classes as parse_classes  # re-exported: it lives in ueo.names

log = logging.getLogger(__name__)

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


# How an augmented run draws its crops and flips. Runs name it in their identity
# (`ueo.fingerprint.run_identity`): ueo before 2026-11-30 drew them from each loader worker's
# generator, so its checkpoints and benchmark cells are not taken for this stream's.
AUGMENTATION_DRAWS = "keyed by (seed, epoch, image)"


def draw_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the random draws of sample `index` in `epoch` of a run seeded `seed`.

    numpy's `SeedSequence` of the key, so that nearby keys give unrelated streams; 32 bits,
    all that torch's CPU generator takes from a seed.
    """
    return int(np.random.SeedSequence(seed, spawn_key=(epoch, index)).generate_state(1)[0])


@contextmanager
def keyed_draws(seed: int, epoch: int, index: int) -> Iterator[None]:
    """Torch's global generator seeded with `draw_seed(seed, epoch, index)` inside the block
    and restored after it: torchvision's own random transforms then draw a function of the
    key, whichever process runs them and whatever ran before."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(draw_seed(seed, epoch, index))
        yield


class EpochOrder(Sampler):
    """The training order in batches, and the key of every sample's random draws.

    Epoch e visits the images in the order of the e-th `torch.randperm(n)` of a generator of
    its own, seeded `seed` (the order of a plain DataLoader with a seeded RandomSampler), in
    batches of `batch_size`, so the order never depends on the loader's workers. The
    generator's state at an epoch's start and the number of samples done in it give the
    position in the data exactly; `skip` samples are left out of the next pass, to continue an
    epoch a checkpoint interrupted.

    Each sample comes as the key `(epoch, index)`, from which `ImageDataset` draws its
    augmentation (`keyed_draws`): the crops depend on the seed, the epoch and the image only,
    not on the number of workers or processes. The key travels with the index to the worker,
    so persistent workers, which hold the copy of the dataset made when they started, see the
    epoch. `set_epoch(epoch)` must be called before every pass (a pass without it raises).

    With `world` > 1 processes, every process builds the same order and process `rank` gets
    one contiguous part of each (global) batch, the first `len(batch) % world` parts one key
    longer: the parts gathered in rank order are the batch of a single process, the last
    partial batch included, no key repeated (a part may be empty).
    """

    def __init__(self, n: int, seed: int, batch_size: int, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world} processes")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.skip = 0
        self.epoch: int | None = None

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass: part of every sample's key."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.epoch is None:
            raise RuntimeError("EpochOrder.set_epoch(epoch) must be called before each pass.")
        epoch, self.epoch = self.epoch, None
        order = torch.randperm(self.n, generator=self.generator)
        # torch's RandomSampler draws a second (empty-sliced) permutation per pass; drawing it
        # too keeps the order of a plain seeded loader from the second epoch on.
        torch.randperm(self.n, generator=self.generator)
        start, self.skip = self.skip, 0
        for b in range(start, self.n, self.batch_size):
            batch = order[b : b + self.batch_size]
            lo, hi = _part(len(batch), self.rank, self.world)
            yield [(epoch, i) for i in batch[lo:hi].tolist()]


def _part(n: int, rank: int, world: int) -> tuple[int, int]:
    """Where process `rank`'s contiguous part of `n` items starts and ends (the first
    `n % world` parts one longer)."""
    size, extra = divmod(n, world)
    lo = rank * size + min(rank, extra)
    return lo, lo + size + (rank < extra)


class ImageDataset(Dataset):
    """Yields (image, index, error); an unreadable image gives an error string, not a crash.

    Images are read through `cache` (ueo.cache), which a run shares between its passes and
    processes; with none, every access decodes the file. A transform that `split_transform`
    splits yields uint8 pixels, stacked as uint8 by `collate` and finished by `finish` once the
    batch is where it is used (on the device); any other yields its own output.

    An item is asked for by index, or by the key `(epoch, index)` of an `EpochOrder`: then the
    transform's random draws are keyed on (`seed`, epoch, index), not taken from the global
    generator of whichever process runs it.
    """

    def __init__(self, images: ImageSet, transform, cache: ImageCache | None = None, seed: int = 0):
        self.images = images
        self.transform = transform
        self.split = split_transform(transform)
        self.seed = seed
        self.cache = cache if cache is not None else ImageCache(budget=0)
        self.cache.register(images.paths, self.split)  # before a loader forks its workers

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, i = key if isinstance(key, tuple) else (None, key)
        path = self.images.paths[i]
        keyed = epoch is not None and not (self.split is not None and self.split.deterministic)
        try:
            with keyed_draws(self.seed, epoch, i) if keyed else nullcontext():
                if self.split is None:
                    return self.transform(self.cache.image(path)), i, None
                return self.cache.pixels(path, self.split), i, None
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            return None, i, f"{path}: {exc}"

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """A batch from `collate`, on any device, to the transform's output (bit for bit the
        per-image transform's: `Split.finish`); unchanged when the transform did not split."""
        return images if self.split is None else self.split.finish(images)


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
    order: EpochOrder | None = None,
    cache: ImageCache | None = None,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    """A loader that keeps an accelerator fed: worker processes, pinned memory, reuse.

    Batches come as `(images, index, bad)`; `images` stays uint8 under a split transform until
    `loader.dataset.finish(images.to(device, non_blocking=True))`, which every consumer calls.
    A shuffled loader's batches come from `order`, or from an `EpochOrder` seeded `seed`
    (`loader.batch_sampler`); its `set_epoch` must be called before every pass. A loader that
    does not shuffle visits the images in order: with `world` > 1 processes, process `rank`
    visits one contiguous part of them (the parts in rank order are the whole set, none
    padded). On Linux the workers are forked, whatever Python's default start method, so that
    they share `cache`'s memory.
    """
    dataset = ImageDataset(images, transform, cache, seed)
    if shuffle and order is None:
        order = EpochOrder(len(images), seed, batch_size, rank, world)
    batching = {"batch_sampler": order} if shuffle else {"batch_size": batch_size}
    if not shuffle:
        batching["sampler"] = range(*_part(len(images), rank, world))
    generator = torch.Generator()
    generator.manual_seed(seed)
    fork = workers > 0 and sys.platform.startswith("linux")
    return DataLoader(
        dataset,
        **batching,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=generator,
        multiprocessing_context="fork" if fork else None,
    )
