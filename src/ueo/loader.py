"""The training and inference pipeline over an image set: the order of the images in batches,
augmentation drawn from (seed, epoch, image), the dataset that reads them through the decoded-image
store, and the loader that keeps a device fed.

`ueo.data` says which images a set holds; this module says how they reach the model.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from ueo.cache import ImageCache, split_transform
from ueo.data import ImageSet, MemoryImages
from ueo.errors import UeoError

log = logging.getLogger("ueo.data")

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
        if not isinstance(images, MemoryImages):  # files: decoded once, through the cache
            self.cache.register(images.paths, self.split)  # before a loader forks its workers

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, i = key if isinstance(key, tuple) else (None, key)
        path = self.images.paths[i]
        keyed = epoch is not None and not (self.split is not None and self.split.deterministic)
        try:
            with keyed_draws(self.seed, epoch, i) if keyed else nullcontext():
                if isinstance(self.images, MemoryImages):
                    img = self.images.rgb(i)
                    pixels = self.transform(img) if self.split is None else self.split.pixels(img)
                    return pixels, i, None
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
