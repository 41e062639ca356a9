"""Forward passes over image sets: cosine similarities, evaluation and prediction."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from tqdm.auto import tqdm

from ueo.cache import ImageCache
from ueo.data import ImageSet, MemoryImages
from ueo.distributed import current_world
from ueo.loader import BadImages, make_loader
from ueo.metrics import compute_metrics
from ueo.model import UeoModel, frozen_weights_in
from ueo.objectives import mcm_score
from ueo.recipe import Runtime
from ueo.runtime import DTYPES, autocast, default_workers, resolve_device


@dataclass
class Outputs:
    """Per-image results of one pass; rows of unreadable images are NaN and `valid` False.

    `features` (L2-normalised image features) is kept only when `infer` is asked for it.
    `pred` and `score` are computed over the whole N x K matrix on first use and kept: a
    caller reading them per image must not pay for the whole set each time. `cos` is not
    to be changed after that (no code does).
    """

    cos: np.ndarray
    valid: np.ndarray
    features: np.ndarray | None = None

    @cached_property
    def pred(self) -> np.ndarray:
        """Each image's predicted known class: the argmax of its cosines."""
        return self.cos.argmax(axis=1)

    @cached_property
    def score(self) -> np.ndarray:
        """Each image's MCM score (softmax of its cosines, T = 1, its maximum)."""
        return mcm_score(torch.from_numpy(self.cos)).numpy()


def workers_of(runtime: Runtime, images: ImageSet | None = None) -> int:
    """Loader processes: the runtime's, else one per spare CPU; none by default for images
    already in memory (nothing to read, and a service calls often)."""
    if runtime.workers is not None:
        return runtime.workers
    return 0 if isinstance(images, MemoryImages) else default_workers()


@torch.no_grad()
def infer(
    model: UeoModel,
    images: ImageSet,
    runtime: Runtime | None = None,
    *,
    precision: str = "fp32",
    bad: BadImages | None = None,
    desc: str = "infer",
    cache: ImageCache | None = None,
    features: bool = False,
) -> Outputs:
    """Cosine similarities of every image to every known class, with the test transform;
    both towers under `precision`'s autocast, the cosines in fp32 (`UeoModel.cosines`).

    The loader is iterated exactly once; the progress bar counts this process's images.
    `cache` keeps the decoded images and the test transform's pixels for the next pass over the
    same images (ueo.cache). Batches cross to the device as uint8 and are finished there. In a
    world of several processes (ueo.distributed), each passes over one contiguous part of the
    images and every process gets the whole set's outputs, no image counted twice.
    `features` also keeps the image features of the same pass (`ueo discover` clusters them).
    """
    runtime = runtime or Runtime()
    device = resolve_device(runtime.device)
    world = current_world()
    bad = bad if bad is not None else BadImages(runtime.on_bad_image)
    cos = np.full((len(images), model.prompt.num_classes), np.nan, dtype=np.float32)
    valid = np.zeros(len(images), dtype=bool)
    loader = make_loader(
        images,
        model.clip.test_transform(),
        runtime.eval_batch_size,
        False,
        workers_of(runtime, images),
        device,
        cache=cache,
        rank=world.rank,
        world=world.size,
    )
    progress = runtime.progress and world.main
    with (
        frozen_weights_in(model, DTYPES[precision]),
        tqdm(
            total=len(loader.sampler), desc=desc, unit="img", leave=False, disable=not progress
        ) as bar,
    ):
        with autocast(device, precision):
            text = model.text_features()
        feats = (
            np.full((len(images), text.shape[1]), np.nan, dtype=np.float32) if features else None
        )
        for x, idx, errors in loader:
            bar.update(len(idx) + len(errors))
            for i, msg in errors:
                bad.report(i, msg)
            if x is None:
                continue
            x = loader.dataset.finish(x.to(device, non_blocking=True))
            out, f, _ = model.cosines(x, precision, text)
            cos[idx.numpy()] = out.cpu().numpy()
            valid[idx.numpy()] = True
            if features:
                feats[idx.numpy()] = f.cpu().numpy()
    if world.size > 1:
        part = loader.sampler  # this process's contiguous range of the images
        cos = world.gather_rows(cos[part.start : part.stop])
        valid = world.gather_rows(valid[part.start : part.stop])
        if features:
            feats = world.gather_rows(feats[part.start : part.stop])
    return Outputs(cos, valid, feats)


def metrics_of(outputs: Outputs, images: ImageSet) -> dict | None:
    """The metrics of docs/spec.md for a labelled set; None when the set carries no labels."""
    if not images.labelled:
        return None
    v = outputs.valid
    return compute_metrics(outputs.pred[v], outputs.score[v], images.labels[v])
