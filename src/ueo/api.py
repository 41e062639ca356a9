"""The Python API: load a model, adapt it, save the run, evaluate, predict, discover.

`ueo.jobs` composes these into what each `ueo` command does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ueo.adaptation import AdaptResult, adapt
from ueo.clip import load_clip
from ueo.data import ImageSet, MemoryImages
from ueo.discovery.groups import Discovery, discover
from ueo.discovery.settings import DiscoverSettings
from ueo.discovery.vocabulary import Vocabulary, load_vocabulary, without_known
from ueo.errors import UeoError
from ueo.inference import infer, metrics_of
from ueo.loader import BadImages
from ueo.model import UeoModel
from ueo.predictions import Predictions
from ueo.recipe import Recipe, Runtime
from ueo.runs import load_adapter, save_run
from ueo.runtime import resolve_device

__all__ = [
    "AdaptResult",
    "DiscoverSettings",
    "Discovery",
    "MemoryImages",
    "Predictions",
    "Recipe",
    "Runtime",
    "Vocabulary",
    "adapt",
    "discover",
    "evaluate",
    "load_adapted",
    "load_model",
    "load_vocabulary",
    "predict",
    "save_run",
    "without_known",
]


def load_model(
    model: str,
    pretrained: str,
    class_names: list[str],
    recipe: Recipe | None = None,
    *,
    device: str = "cpu",
    channels_last: bool = True,
) -> UeoModel:
    """A zero-shot model ready to adapt, its prompt built as `recipe` says (n_ctx, ctx_init; a
    random context is drawn from its seed)."""
    recipe = recipe or Recipe()
    dev = resolve_device(device)
    clip = load_clip(model, pretrained, dev, channels_last)
    model = UeoModel(clip, class_names, recipe.n_ctx, recipe.ctx_init.strip(), seed=recipe.seed)
    return model.to(dev)


def load_adapted(
    adapter: str | os.PathLike,
    device: str = "cpu",
    pretrained: str | None = None,
    channels_last: bool = True,
) -> tuple[UeoModel, dict]:
    """Rebuild an adapted model from its adapter file (base weights named in its metadata,
    unless `pretrained` overrides them)."""
    tensors, meta = load_adapter(adapter)  # its recipe is checked there
    recipe = Recipe.from_dict(meta["recipe"])
    model = load_model(
        meta["model"],
        pretrained or meta["pretrained"],
        meta["class_names"],
        recipe,
        device=device,
        channels_last=channels_last,
    )
    model.load_adapter_state(tensors, recipe.norm_layers)
    return model, meta


def evaluate(
    model: UeoModel,
    images: ImageSet,
    runtime: Runtime | None = None,
    *,
    precision: str = "fp32",
) -> dict:
    """ACC, GACC, AUROC, FPR95 and H of `model` on a labelled set (OOD = classes not known)."""
    if not images.labelled:
        raise UeoError(f"{images.source} carries no labels; evaluation needs labelled images.")
    runtime = (runtime or Runtime()).validate()
    bad = BadImages(runtime.on_bad_image)
    model.to(resolve_device(runtime.device))
    out = infer(model, images, runtime, precision=precision, bad=bad, desc="evaluate")
    _require_readable(out, images)
    metrics = metrics_of(out, images)
    metrics["skipped_images"] = int((~out.valid).sum())  # each process's part counted
    return metrics


def predict(
    model: UeoModel,
    images: ImageSet | Sequence[Image.Image] | np.ndarray,
    threshold: float,
    runtime: Runtime | None = None,
    *,
    precision: str = "fp32",
) -> Predictions:
    """One row per readable image: predicted known class, its probability, MCM, unknown flag.

    Args:
        model: the adapted (or zero-shot) model, e.g. from `load_adapted`.
        images: an image set on disk (`ueo.data.load_image_set`), or images in memory: a
            list of PIL images or an N x H x W x 3 uint8 RGB array (`ueo.data.MemoryImages`,
            whose rows are named "0", "1", ...; wrap them yourself to name them).
        threshold: the MCM score below which an image is unknown (an adapter's `threshold`).
        runtime: device, batch size, workers (images in memory: none unless asked for).
        precision: the autocast precision (an adapter's recipe's).

    Returns:
        The rows of `ueo predict`, held as columns (`ueo.predictions.Predictions`; each row
        reads as a dict): the class probability is the softmax of 100 * cos (the scale used
        in training); the MCM score the softmax of the raw cosines (T = 1).
    """
    if not isinstance(images, ImageSet):
        images = MemoryImages(images)
    runtime = (runtime or Runtime()).validate()
    model.to(resolve_device(runtime.device))
    bad = BadImages(runtime.on_bad_image)
    out = infer(model, images, runtime, precision=precision, bad=bad, desc="predict")
    _require_readable(out, images)
    rows = np.flatnonzero(out.valid)
    return Predictions.from_cosines(
        images.paths, rows, model.class_names, out.cos[rows], out.score[rows], threshold
    )


def _require_readable(out, images: ImageSet) -> None:
    if not out.valid.any():
        raise UeoError(
            f"None of the {len(images)} images of {images.source or 'the data'} could be read, "
            f"e.g. {images.paths[0]}."
        )
