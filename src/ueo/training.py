"""One training step, and the guard beside it that keeps non-finite values out of the tuned
tensors without waiting for the device.

A step is: the cosines of the batch's images to the class prompts (`UeoModel.cosines`, the
towers under autocast), the method's loss on `100 * cos` in fp32, the backward pass, the
guard, one SGD update. The guard decides on the device whether the step may update the tuned
tensors, so a step never stops to read a value back; `StepGuard.read` brings its verdicts to
the host when the loop asks (every step on a CPU, where that costs nothing; every few steps
on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ueo.distributed import SINGLE, Shard, World, shared
from ueo.methods import Batch, Method
from ueo.model import UeoModel
from ueo.objectives import LOGIT_SCALE
from ueo.recipe import Recipe

# What a step's guard found, in the order it looks (docs/reliability.md).
FINITE, BAD_LOSS, BAD_GRADIENT, BAD_PARAMETER = range(4)


class NonFinite(Exception):
    """A training step met a non-finite loss, gradient or tuned parameter (see `StepGuard`)."""


def training_step(
    model: UeoModel,
    images: torch.Tensor,
    fixed: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    method: Method,
    recipe: Recipe,
    *,
    scaler: torch.amp.GradScaler | None = None,
    features: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None,
    guard: StepGuard | None = None,
    where: object = None,
    shard: Shard | None = None,
) -> torch.Tensor:
    """One SGD step on a batch; returns its loss as a 0-d tensor on the device.

    `features(images)` -> (cos, image features, text features) replaces `model.cosines` (with
    a frozen prompt's features, or compiled). Without a `guard` the step is checked at once: a
    non-finite loss, gradient or updated parameter raises `NonFinite`, and the tuned tensors
    are left as they were. With one, the guard's policy applies and its verdict, labelled
    `where`, is read later (`StepGuard.read`).

    With a `shard`, `images` and `fixed` are this process's part of a batch split over the
    processes of a run (ueo.distributed): the loss is that of the whole batch, from the
    gathered cosines and features, and the guard sums the gradients over the processes.
    """
    optimizer.zero_grad(set_to_none=True)
    if features is None:
        cos, feats, text = model.cosines(images, recipe.precision)
    else:
        cos, feats, text = features(images)
    if shard is not None:
        cos, feats, text = shard.gather(cos), shard.gather(feats), shared(text, shard.world)
    batch = Batch(
        logits=LOGIT_SCALE * cos,
        image_features=feats,
        text_features=text,
        fixed=fixed,
        recipe=recipe,
    )
    loss = method.loss(batch)
    now = guard is None
    guard = guard or StepGuard(optimizer, "stop", shard.world if shard else SINGLE)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        guard.check(loss, where, scaler_skips_gradients=True)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        guard.check(loss, where)
        optimizer.step()
    if now:
        failed = next((r for r in guard.read() if r.kind != FINITE), None)
        if failed is not None:
            raise NonFinite(failed.what)
    return loss.detach()


@dataclass(frozen=True)
class StepVerdict:
    """What the guard found at one step: its loss, and FINITE or what was not."""

    where: object
    loss: float
    kind: int
    what: str  # "the loss (nan)", "the gradient of norm[3]", ...


class StepGuard:
    """Keeps a step's non-finite values out of the tuned tensors, deciding on the device.

    Before the optimiser's update, `check` computes on the device whether the loss, every
    gradient and every parameter the update would produce (`p - lr * grad`) are finite. A step
    that is not gets zero gradients, so plain SGD leaves every tuned tensor as it was. Under
    the `stop` policy the first such step also stops every later update, and the loop, once it
    reads the verdict, stops the run: the tuned tensors are then those before that step. Under
    `skip` only that step is left out. Either way no non-finite value reaches a tuned tensor,
    and nothing waits for the device until `read`.

    With fp16's gradient scaler, non-finite gradients are the scaler's to skip (it lowers its
    scale), as usual; the loss and the updated parameters are still checked. In a `world` of
    several processes the gradients are summed over them first, so that every process judges,
    and updates, alike.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, policy: str, world: World = SINGLE):
        self.policy = policy
        self.world = world
        self.groups = optimizer.param_groups
        self.params = [p for g in self.groups for p in g["params"]]
        self.names = [
            f"{g.get('name', 'group')}[{i}]" for g in self.groups for i in range(len(g["params"]))
        ]
        self.sizes = [p.numel() for p in self.params]
        self.group_sizes = [sum(p.numel() for p in g["params"]) for g in self.groups]
        device = self.params[0].device
        self.ends = torch.tensor(self.sizes, device=device).cumsum(0)
        self.stopped = torch.zeros((), dtype=torch.bool, device=device)
        self.pending: list[tuple[object, torch.Tensor]] = []

    def check(
        self, loss: torch.Tensor, where: object = None, scaler_skips_gradients: bool = False
    ) -> None:
        """Judge the step whose gradients are in `.grad`, and zero them if it may not update;
        `where` labels its verdict."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self.world.sum_(torch.cat([g.reshape(-1) for g in grads]))
        current = torch.cat([p.detach().reshape(-1) for p in self.params])
        updated, start = [], 0
        for group, size in zip(self.groups, self.group_sizes, strict=True):
            updated.append(current[start : start + size] - group["lr"] * flat[start : start + size])
            start += size
        bad_grad, bad_param = ~flat.isfinite(), ~torch.cat(updated).isfinite()
        loss_ok, grads_ok, params_ok = loss.isfinite(), ~bad_grad.any(), ~bad_param.any()
        if scaler_skips_gradients:
            kind = torch.where(
                loss_ok, torch.where(grads_ok & ~params_ok, BAD_PARAMETER, FINITE), BAD_LOSS
            )
        else:
            kind = torch.where(
                loss_ok,
                torch.where(grads_ok, torch.where(params_ok, FINITE, BAD_PARAMETER), BAD_GRADIENT),
                BAD_LOSS,
            )
        first = torch.where(kind == BAD_GRADIENT, bad_grad.int().argmax(), bad_param.int().argmax())
        tensor = torch.searchsorted(self.ends, first, right=True)
        may_update = (kind == FINITE) & ~self.stopped & grads_ok & params_ok
        if self.policy == "stop":
            self.stopped |= kind != FINITE
        masked = torch.where(may_update, flat, 0.0)
        for p, g in zip(self.params, masked.split(self.sizes), strict=True):
            p.grad = g.view_as(p)
        record = torch.stack([loss.detach().float(), kind.float(), tensor.float()])
        self.pending.append((where, record))

    def read(self) -> list[StepVerdict]:
        """The verdicts of the steps checked since the last read (one wait for the device)."""
        if not self.pending:
            return []
        rows = torch.stack([r for _, r in self.pending]).cpu().tolist()
        verdicts = [
            StepVerdict(where, loss, int(kind), self._what(int(kind), loss, int(tensor)))
            for (where, _), (loss, kind, tensor) in zip(self.pending, rows, strict=True)
        ]
        self.pending.clear()
        return verdicts

    def _what(self, kind: int, loss: float, tensor: int) -> str:
        if kind == BAD_LOSS:
            return f"the loss ({loss})"
        if kind == BAD_GRADIENT:
            return f"the gradient of {self.names[tensor]}"
        if kind == BAD_PARAMETER:
            return f"the tuned parameter {self.names[tensor]}"
        return ""
