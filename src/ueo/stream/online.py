"""Predict, then update, one batch at a time: the engine of `ueo stream`, and its Python API.

For each batch the current model predicts first (the rows of `ueo predict`, with the unknown
flag of the threshold so far: ueo.stream.answers), then one step of the method updates it on
that batch, so no prediction is ever made by a model that has seen the image. The prediction
and the update share one forward pass: the update's loss is taken on the very cosines the rows
came from (the test transform, no augmentation), so a step costs a forward and a backward pass,
not two forwards. What a batch does to the model depends on the kind of method
(ueo.stream.updates: nothing, TDA's caches, or a step); methods with fixed per-sample values
(UEO's MCM weights, UPL's pseudo-labels) get them from the zero-shot model's cosines of the
batch, computed when it arrives (ueo.stream.zeroshot: when that costs a second pass).

    with OnlineStream(model, StreamSettings(method="ueo", batch_size=16)) as stream:
        rows = stream.step(images)        # a list of PIL images or an N x H x W x 3 array
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np
import torch
from PIL import Image

from ueo.cache import split_transform
from ueo.data import MemoryImages
from ueo.methods import get_method
from ueo.model import UeoModel
from ueo.predictions import Predictions
from ueo.recipe import Runtime
from ueo.runtime import checked_runtime, resolve_device
from ueo.stream.answers import Answers
from ueo.stream.settings import TDA, StreamSettings
from ueo.stream.updates import NoUpdate, Update, Updater, adapting
from ueo.stream.zeroshot import ZeroShot
from ueo.timing import Clock


class OnlineStream:
    """A model adapted while it predicts (module docstring); use it in a `with` block, which
    puts the model in the state the method tunes and back."""

    def __init__(
        self,
        model: UeoModel,
        settings: StreamSettings | None = None,
        runtime: Runtime | None = None,
    ):
        self.settings = (settings or StreamSettings()).validate()
        self.recipe = recipe = self.settings.step_recipe
        self.runtime = checked_runtime(runtime, recipe.precision)
        self.device = resolve_device(self.runtime.device)
        self.model = model.to(self.device)
        model.check_prompt(recipe)
        self.method = None if self.settings.method == TDA else get_method(recipe.method)
        self.split = split_transform(model.clip.test_transform())
        self.answers = Answers(model.class_names, self.settings.threshold)
        self.clock = Clock()
        self.zero_shot = ZeroShot(model, recipe, self.clock)
        # the kind of update the method gets, in the block (adapting); none before it
        self.updater: Updater = NoUpdate(model, recipe, self.zero_shot)
        self.batches = 0  # batches predicted
        self.domain: str | None = None
        self._stack: ExitStack | None = None
        self._pending: Update | None = None  # the update of the batch `predict` saw

    def __enter__(self) -> OnlineStream:
        stack = ExitStack()
        held = adapting(self.method, self.settings.tda, self.zero_shot, self.device)
        self.updater = stack.enter_context(held)
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        self._pending = None
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def step(
        self,
        images: Sequence[Image.Image] | np.ndarray,
        names: Sequence[str] | None = None,
        labels: np.ndarray | None = None,
        domain: str | None = None,
    ) -> Predictions:
        """Predict a batch of images in memory (PIL images of any mode, or an N x H x W x 3
        uint8 RGB array; named "0", "1", ... unless `names` are given), then update on it."""
        batch = MemoryImages(images, names)
        pixels = torch.stack([self.split.pixels(batch.rgb(i)) for i in range(len(batch))])
        rows = self.predict(pixels, batch.paths, labels, domain)
        self.update()
        return rows

    def predict(
        self,
        pixels: torch.Tensor,
        names: Sequence[str],
        labels: np.ndarray | None = None,
        domain: str | None = None,
    ) -> Predictions:
        """The rows of a batch (uint8 pixels of the test transform, N x 3 x H x W, as
        `ueo.cache.Split.pixels` gives them) by the model as it is; `update` then steps on it.

        With `reset="domain"`, a batch whose `domain` differs from the last one's starts from
        the zero-shot state. `labels` (known-class index, OOD -1, unlabeled -2) serve only a
        method that uses them (`ueo-oracle`)."""
        if self._stack is None:
            raise RuntimeError("use OnlineStream in a `with` block")
        if self.settings.reset == "domain" and self.batches and domain != self.domain:
            self.reset()
        self.domain = domain
        with self.clock("predict"):
            x = self.split.finish(pixels.to(self.device, non_blocking=True))
            shown, self._pending = self.updater.predict(x, labels, self.batches + 1)
            rows = self.answers.rows(shown, names, self.batches + 1)
        self.batches += 1
        return rows

    def update(self) -> None:
        """One step of the method on the batch last predicted (TDA: its images enter the
        caches); then, with `reset="batch"`, the zero-shot state again."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("update() follows predict()")
        with self.clock("update"):
            pending()
        if self.settings.reset == "batch":
            self.reset()

    def reset(self) -> None:
        """Back to the zero-shot state: tuned tensors, optimiser and TDA's caches (the
        threshold's scores are kept: it is over the whole stream)."""
        self.updater.reset()

    @property
    def threshold(self) -> float:
        """The unknown threshold now: the fixed one, or Otsu's over the scores so far."""
        return self.answers.threshold

    @property
    def skipped_steps(self) -> int:
        """Updates left out for a non-finite value (`on_nonfinite="skip"`)."""
        return self.updater.skipped_steps

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and plain data that put a stream back where it is (`load`)."""
        tensors, meta = {}, {"batches": self.batches, "domain": self.domain}
        self.updater.save(tensors, meta)
        self.answers.save(tensors, meta)
        return tensors, meta

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Put the stream back where `state` found it."""
        self.updater.load(tensors, meta)
        self.answers.load(tensors, meta)
        self.batches, self.domain = meta["batches"], meta["domain"]
