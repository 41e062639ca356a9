"""What a batch does to a stream's model, one class per kind of method (ueo.stream.online).

Each kind gives the cosines a batch's rows are made from and the update the batch then makes,
goes back to the zero-shot state on a reset, and puts the model's state into a checkpoint and
back:
- `NoUpdate`: the zero-shot model answers every batch (`zeroshot`, or a method whose learning
  rates are both 0);
- `TdaUpdate`: the batch is answered with TDA's caches as they are, then its images enter them
  (ueo.stream.tda); nothing is trained;
- `StepUpdate`: one SGD step of the method on the batch, at constant rates, taken on the very
  cosines its rows came from, so that a step costs a forward and a backward pass.
`adapting` holds the model as a stream needs it and gives the kind a method gets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial

import numpy as np
import torch

from ueo.checkpoint import pack_optimizer, under_prefix, unpack_optimizer
from ueo.errors import UeoError
from ueo.methods import TRAIN_MASK, Method
from ueo.model import UeoModel, frozen_weights_in, tuning
from ueo.names import UNLABELED
from ueo.objectives import LOGIT_SCALE
from ueo.recipe import Recipe
from ueo.runtime import DTYPES
from ueo.stream.settings import TdaSettings
from ueo.stream.tda import Tda
from ueo.stream.zeroshot import ZeroShot
from ueo.training import FINITE, StepGuard, training_step

Update = Callable[[], None]


@contextmanager
def adapting(
    method: Method | None, tda: TdaSettings, zero_shot: ZeroShot, device: torch.device
) -> Iterator[Updater]:
    """Hold the model as a stream adapts it, for the block: its frozen weights in the recipe's
    precision (`ueo.model.frozen_weights_in`), the zero-shot text features taken with them,
    the tensors `method` trains tuned; yields the kind of update `method` (None: TDA) gets."""
    model, recipe = zero_shot.model, zero_shot.recipe
    with frozen_weights_in(model, DTYPES[recipe.precision]), ExitStack() as stack:
        zero_shot.encode_text(device)
        groups = []
        if method is not None and method.trains:
            groups = stack.enter_context(tuning(model, recipe))
        if groups:
            yield StepUpdate(model, recipe, zero_shot, method, groups, device)
        elif method is None:
            yield TdaUpdate(model, recipe, zero_shot, tda, device)
        else:
            yield NoUpdate(model, recipe, zero_shot)


class Updater:
    """The model's side of a stream, whatever the kind of update: its reset to the zero-shot
    state and its part of a checkpoint, which each kind extends with its own state."""

    skipped_steps = 0  # steps left out for a non-finite value (`on_nonfinite="skip"`)

    def __init__(self, model: UeoModel, recipe: Recipe, zero_shot: ZeroShot):
        self.model, self.recipe, self.zero_shot = model, recipe, zero_shot

    def predict(
        self, x: torch.Tensor, labels: np.ndarray | None, number: int
    ) -> tuple[torch.Tensor, Update]:
        """The cosines of batch `number` (the test transform's finished pixels `x`) that its
        rows are made from, and the update the batch makes once they are written."""
        raise NotImplementedError

    def reset(self) -> None:
        """Back to the zero-shot state: the tuned tensors (and each kind's own state)."""
        self.zero_shot.restore()

    def save(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Add the model's state to a checkpoint's tensors and plain data: the tuned tensors,
        whether they are the zero-shot ones, the steps skipped (and each kind's own state)."""
        tuned = self.model.adapter_state(self.recipe.norm_layers)
        tensors.update({f"tuned/{k}": v for k, v in tuned.items()})
        meta["skipped_steps"], meta["pristine"] = self.skipped_steps, self.zero_shot.pristine

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Put the model's state back from a checkpoint (`save`)."""
        self.model.load_adapter_state(under_prefix(tensors, "tuned"), self.recipe.norm_layers)
        self.skipped_steps, self.zero_shot.pristine = meta["skipped_steps"], meta["pristine"]


def _nothing() -> None:
    """The update of a batch that changes nothing."""


class NoUpdate(Updater):
    """The zero-shot model answers every batch, with the zero-shot prompt's text features."""

    def predict(
        self, x: torch.Tensor, labels: np.ndarray | None, number: int
    ) -> tuple[torch.Tensor, Update]:
        with torch.no_grad():
            return self.model.cosines(x, self.recipe.precision, self.zero_shot.text)[0], _nothing


class TdaUpdate(Updater):
    """TDA (ueo.stream.tda): a batch is answered with the caches as they are, then its images
    enter them by their zero-shot prediction."""

    def __init__(
        self,
        model: UeoModel,
        recipe: Recipe,
        zero_shot: ZeroShot,
        settings: TdaSettings,
        device: torch.device,
    ):
        super().__init__(model, recipe, zero_shot)
        dim = zero_shot.text.shape[1]
        self.tda = Tda(settings, model.prompt.num_classes, dim, device)

    def predict(
        self, x: torch.Tensor, labels: np.ndarray | None, number: int
    ) -> tuple[torch.Tensor, Update]:
        with torch.no_grad():
            cos, feats, _ = self.model.cosines(x, self.recipe.precision, self.zero_shot.text)
            added = self.tda.logits(feats)
        # TDA's logits are 100 cos + the caches': shown as the cosines they amount to
        shown = cos if added is None else cos + added / LOGIT_SCALE
        return shown, partial(self.tda.update, feats, cos)

    def reset(self) -> None:
        super().reset()
        self.tda.reset()

    def save(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().save(tensors, meta)
        tensors.update(self.tda.tensors())

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().load(tensors, meta)
        self.tda.load(tensors)


class StepUpdate(Updater):
    """One step of `method` per batch: plain SGD at the recipe's constant rates over the
    parameter `groups` (a stream has no known length for a schedule), behind the non-finite
    guard of `ueo.training.training_step`."""

    def __init__(
        self,
        model: UeoModel,
        recipe: Recipe,
        zero_shot: ZeroShot,
        method: Method,
        groups: list[dict],
        device: torch.device,
    ):
        super().__init__(model, recipe, zero_shot)
        self.method, self.device = method, device
        self.optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.0)
        self.guard = StepGuard(self.optimizer, recipe.on_nonfinite)
        fp16 = recipe.precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type) if fp16 else None
        self.prompt_tuned = recipe.lr_prompt > 0
        self.image_tuned = recipe.lr_norm > 0
        self.skipped_steps = 0

    def predict(
        self, x: torch.Tensor, labels: np.ndarray | None, number: int
    ) -> tuple[torch.Tensor, Update]:
        text = None if self.prompt_tuned else self.zero_shot.text
        with torch.enable_grad():
            cos, feats, text = self.model.cosines(x, self.recipe.precision, text)
        labels = np.full(len(x), UNLABELED) if labels is None else np.asarray(labels)
        return cos.detach(), partial(self._step, x, cos, feats, text, labels, number)

    def _step(self, x, cos, feats, text, labels: np.ndarray, number: int) -> None:
        """The step on the prediction's own cosines; a non-finite one stops the stream, or is
        skipped and counted."""
        method, recipe = self.method, self.recipe
        if method.needs_labels and (labels == UNLABELED).any():
            raise UeoError(f"Method {method.name} uses labels; the stream's images carry none.")
        fixed = {}
        if method.fixed is not None:
            zeroshot = self.zero_shot.cosines(x, cos, feats, self.image_tuned).cpu()
            fixed = method.fixed(zeroshot, torch.from_numpy(labels), recipe)
        if TRAIN_MASK in fixed:
            keep = fixed[TRAIN_MASK].to(torch.bool)
            if not keep.any():
                return
            cos, feats = cos[keep.to(cos.device)], feats[keep.to(feats.device)]
            fixed = {k: v[keep] for k, v in fixed.items()}
        fixed = {k: v.to(self.device) for k, v in fixed.items()}
        training_step(
            self.model,
            x,
            fixed,
            self.optimizer,
            method,
            recipe,
            scaler=self.scaler,
            features=lambda _: (cos, feats, text),
            guard=self.guard,
            where=number,
        )
        for verdict in self.guard.read():
            if verdict.kind == FINITE:
                self.zero_shot.pristine = False
            elif recipe.on_nonfinite == "skip":
                self.skipped_steps += 1
            else:
                raise UeoError(
                    f"{verdict.what[0].upper()}{verdict.what[1:]} is not finite at batch "
                    f"{verdict.where}: stopped (lower the learning rates, or --on-nonfinite skip)."
                )

    def reset(self) -> None:
        super().reset()
        self.optimizer.state.clear()

    def save(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().save(tensors, meta)
        optim, meta["optimizer"] = pack_optimizer(self.optimizer.state_dict())
        tensors.update(optim)
        meta["scaler"] = self.scaler.state_dict() if self.scaler is not None else None

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().load(tensors, meta)
        self.optimizer.load_state_dict(unpack_optimizer(tensors, meta["optimizer"]))
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
