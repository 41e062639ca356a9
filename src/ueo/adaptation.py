"""Adapt a model: a registered method trained on unlabeled images (docs/spec.md).

`adapt` reads top to bottom: the zero-shot pass over the unlabeled (and test) set, from which
the method's fixed per-sample values come; then each epoch: train (`ueo.training.Trainer`),
evaluate when asked, checkpoint; then the final evaluation and the unknown threshold. It
changes the model's tuned tensors in place and nothing else.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ueo.cache import ImageCache
from ueo.checkpoint import RunCheckpoint, under_prefix
from ueo.data import ImageSet
from ueo.deprecated import forwarding
from ueo.diagnostics import label_free
from ueo.distributed import current_world
from ueo.errors import UeoError
from ueo.eventlog import NoEventLog, open_event_log
from ueo.fingerprint import run_identity
from ueo.inference import Outputs, infer, metrics_of
from ueo.loader import BadImages
from ueo.methods import Method, get_method
from ueo.metrics import otsu_threshold
from ueo.model import UeoModel, frozen_weights_in, tuning
from ueo.provenance import environment
from ueo.recipe import Recipe, Runtime
from ueo.runtime import DTYPES, resolve_device, seed_everything
from ueo.timing import Clock
from ueo.training import Trainer

log = logging.getLogger("ueo")

# What this module held before the training run moved to ueo.training.
__getattr__ = forwarding(
    "ueo.adaptation",
    {
        "training_step": "ueo.training",
        "READ_EVERY": "ueo.training",
        "_Trainer": "ueo.training:Trainer",
    },
)


@dataclass
class AdaptResult:
    """Plain data about one adaptation run; `metrics` maps phase -> set name -> metrics,
    `label_free` phase -> label-free scores of the unlabeled set (ueo.diagnostics)."""

    metrics: dict
    threshold: float
    recipe: Recipe
    history: list[dict] = field(default_factory=list)
    curves: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    skipped_images: int = 0
    skipped_steps: int = 0
    identity: dict | None = None
    outputs: dict = field(default_factory=dict, repr=False)
    timings: dict = field(default_factory=dict)
    label_free: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)  # software and hardware (ueo.provenance)


def adapt(
    model: UeoModel,
    unlabeled: ImageSet,
    recipe: Recipe | None = None,
    runtime: Runtime | None = None,
    *,
    test: ImageSet | None = None,
    zeroshot: dict[str, Outputs] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    cache: ImageCache | None = None,
) -> AdaptResult:
    """Adapt `model` in place on `unlabeled` images and evaluate before and after.

    Args:
        model: the zero-shot model, built with `recipe`'s prompt (`load_model`).
        unlabeled: the images to adapt on (their labels, if any, serve evaluation and
            `ueo-oracle` only).
        recipe: what determines the numbers (`Recipe()`: the paper's).
        runtime: how to run (device, workers, progress, `eval_every`, ...).
        test: a labelled set evaluated before and after.
        zeroshot: precomputed zero-shot `Outputs` of "unlabeled" (and "test"): a sweep shares
            one zero-shot pass between methods.
        checkpoint_dir: where a checkpoint is written at the end of every epoch and on
            SIGINT/SIGTERM (then `Interrupted` is raised).
        resume: continue from that checkpoint, if there is one, after checking it was made
            with the same recipe, model, weights, classes and images (docs/reliability.md).
        cache: decoded images shared by every pass (ueo.cache).

    Returns:
        Plain data: metrics, label-free scores, threshold, history, curves, timings.
    """
    recipe = (recipe or Recipe()).validate()
    runtime = (runtime or Runtime()).validate()
    method = get_method(recipe.method)
    _check_inputs(model, unlabeled, recipe, method)
    identity = None
    if checkpoint_dir is not None:  # what a resumed run must have been made with
        clip = model.clip
        names = model.class_names
        identity = run_identity(clip.model_name, clip.pretrained, names, recipe, unlabeled, test)
    checkpoint = RunCheckpoint.open(checkpoint_dir, identity, resume)
    clock = Clock()
    seed_everything(recipe.seed)
    device = resolve_device(runtime.device)
    model.to(device)
    bad_images = BadImages(runtime.on_bad_image)
    sets = {"unlabeled": unlabeled} if test is None else {"unlabeled": unlabeled, "test": test}
    cache = cache if cache is not None else ImageCache()  # an empty store is falsy
    evaluation = Evaluation(model, sets, runtime, recipe, bad_images, cache)
    events = open_event_log(runtime, checkpoint_dir) if current_world().main else NoEventLog()

    trainer = None
    with frozen_weights_in(model, DTYPES[recipe.precision]):
        with clock("zeroshot"):
            evaluation.zeroshot = evaluation.outputs("zero-shot", given=zeroshot)
        for name, images in sets.items():
            _require_readable(evaluation.zeroshot[name], images, name)
        start = evaluation.point(0, evaluation.zeroshot)
        events.evaluation(start)
        curves, final = [start], evaluation.zeroshot
        with tuning(model, recipe) as groups:
            if method.trains and groups and recipe.epochs > 0:
                fixed = _fixed_values(method, checkpoint, evaluation.zeroshot, unlabeled, recipe)
                trainer = Trainer(
                    model,
                    unlabeled,
                    fixed,
                    groups,
                    method,
                    recipe,
                    runtime,
                    evaluation.cache,
                    checkpoint=checkpoint,
                    bad_images=bad_images,
                    curves=curves,
                )
                with clock("training"), trainer.stopping_on_signals():
                    for epoch in trainer.epochs():
                        trainer.train_epoch(epoch)
                        if runtime.eval_every and epoch % runtime.eval_every == 0:
                            if epoch < recipe.epochs:  # the last epoch's is the final one
                                with clock("evaluation"):
                                    outputs = evaluation.outputs(f"epoch {epoch}")
                                    trainer.state.curves.append(evaluation.point(epoch, outputs))
                                events.evaluation(trainer.state.curves[-1])
                        events.history(trainer.state.history[-1:])
                        trainer.end_epoch(epoch)
                curves = trainer.state.curves
        if trainer is not None:
            with clock("evaluation"):
                final = evaluation.outputs("adapted")
            for name, out in final.items():
                _require_finite(out, name)
    last = evaluation.point(recipe.epochs, final)
    if trainer is not None:
        curves.append(last)
        events.evaluation(last)
    events.close()
    valid = final["unlabeled"].valid
    threshold = otsu_threshold(final["unlabeled"].score[valid])
    if not math.isfinite(threshold):
        raise UeoError(f"The unknown threshold came out {threshold}; nothing was written.")
    return AdaptResult(
        metrics={
            phase: {k: p[k] for k in sets} for phase, p in (("zeroshot", start), ("adapted", last))
        },
        threshold=threshold,
        recipe=recipe,
        history=trainer.state.history if trainer else [],
        curves=curves,
        wall_time_s=clock.total(),
        skipped_images=_unreadable(bad_images),
        skipped_steps=trainer.state.skipped_steps if trainer else 0,
        identity=identity,
        outputs={"zeroshot": evaluation.zeroshot, "adapted": final},
        timings=clock.phases(),
        label_free={"zeroshot": start["label_free"], "adapted": last["label_free"]},
        environment=environment(str(device), recipe.precision),
    )


@dataclass
class Evaluation:
    """The evaluation passes of a run: every set through the model as it is now, and each
    pass as a learning-curve point (each set's metrics, the unlabeled set's label-free scores
    against the zero-shot pass)."""

    model: UeoModel
    sets: dict[str, ImageSet]
    runtime: Runtime
    recipe: Recipe
    bad_images: BadImages
    cache: ImageCache
    zeroshot: dict[str, Outputs] = field(default_factory=dict)

    def outputs(self, desc: str, given: dict[str, Outputs] | None = None) -> dict[str, Outputs]:
        """Every set's outputs (those `given` are taken as they are)."""
        given = given or {}
        return {
            name: given[name]
            if name in given
            else infer(
                self.model,
                images,
                self.runtime,
                precision=self.recipe.precision,
                bad=self.bad_images,
                desc=f"{desc} {name}",
                cache=self.cache,
            )
            for name, images in self.sets.items()
        }

    def point(self, epoch: int, outputs: dict[str, Outputs]) -> dict:
        return {
            "epoch": epoch,
            **{k: metrics_of(outputs[k], v) for k, v in self.sets.items()},
            "label_free": label_free(
                outputs["unlabeled"], self.zeroshot["unlabeled"], self.recipe.trade
            ),
        }


def _fixed_values(
    method: Method,
    checkpoint: RunCheckpoint,
    zeroshot: dict[str, Outputs],
    unlabeled: ImageSet,
    recipe: Recipe,
) -> dict[str, torch.Tensor]:
    """The method's fixed per-sample values: the checkpoint's, or computed from the zero-shot
    cosines (UEO: the MCM weights)."""
    if checkpoint.saved is not None:
        return under_prefix(checkpoint.saved[0], "fixed")
    if method.fixed is None:
        return {}
    cos = torch.from_numpy(zeroshot["unlabeled"].cos)
    return method.fixed(cos, torch.from_numpy(unlabeled.labels), recipe)


def _require_readable(out: Outputs, images: ImageSet, name: str) -> None:
    """A set in which no image could be read gives no result: an error, never a 0.0."""
    if not out.valid.any():
        raise UeoError(
            f"None of the {len(images)} images of the {name} set ({images.source or 'given'}) "
            f"could be read, e.g. {images.paths[0]}."
        )


def _require_finite(out: Outputs, name: str) -> None:
    """The adapted model's outputs must be numbers: NaN or Inf never reach a file."""
    rows = out.cos[out.valid]
    if not np.isfinite(rows).all():
        raise UeoError(
            f"The adapted model gives non-finite scores on the {name} set: training diverged "
            "(lower the learning rates); nothing was written."
        )


def _check_inputs(model: UeoModel, unlabeled: ImageSet, recipe: Recipe, method: Method) -> None:
    """Images to adapt on (with labels, for a method that uses them), and the model's prompt
    the one the recipe describes (it is built with the model)."""
    if not len(unlabeled):
        raise UeoError("The unlabeled set is empty.")
    if method.needs_labels and not unlabeled.labelled:
        raise UeoError(f"Method {method.name} uses labels; the unlabeled data carries none.")
    model.check_prompt(recipe)


def _unreadable(bad_images: BadImages) -> int:
    """Unreadable images met by any process of the run, each counted once."""
    keys = [zlib.crc32(message.encode()) for message in bad_images.seen]
    return len({k for part in current_world().exchange(keys) for k in part})
