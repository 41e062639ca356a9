"""What training does: one step, the guard beside it that keeps non-finite values out of the
tuned tensors without waiting for the device, and a training run (`Trainer`, its `TrainState`).

A step is: the cosines of the batch's images to the class prompts (`UeoModel.cosines`, the
towers under autocast), the method's loss on `100 * cos` in fp32, the backward pass, the
guard, one SGD update. The guard decides on the device whether the step may update the tuned
tensors, so a step never stops to read a value back; `StepGuard.read` brings its verdicts to
the host when the loop asks (every step on a CPU, where that costs nothing; every few steps
on a GPU).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from ueo.cache import ImageCache
from ueo.checkpoint import (
    Interrupted,
    RunCheckpoint,
)
from ueo.data import ImageSet
from ueo.distributed import SINGLE_PROCESS, BatchPart, World, current_world, replicated
from ueo.errors import UeoError
from ueo.inference import workers_of
from ueo.loader import BadImages, EpochOrder, make_loader
from ueo.logs import EPOCHS
from ueo.methods import TRAIN_MASK, Batch, Method
from ueo.model import UeoModel
from ueo.objectives import LOGIT_SCALE
from ueo.recipe import Recipe, Runtime
from ueo.runtime import autocast, resolve_device

log = logging.getLogger("ueo")
epoch_log = logging.getLogger(EPOCHS)

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
    part: BatchPart | None = None,
) -> torch.Tensor:
    """One SGD step on a batch; returns its loss as a 0-d tensor on the device.

    `features(images)` -> (cos, image features, text features) replaces `model.cosines` (with
    a frozen prompt's features, or compiled). Without a `guard` the step is checked at once: a
    non-finite loss, gradient or updated parameter raises `NonFinite`, and the tuned tensors
    are left as they were. With one, the guard's policy applies and its verdict, labelled
    `where`, is read later (`StepGuard.read`).

    With a `part`, `images` and `fixed` are this process's part of a batch split over the
    processes of a run (ueo.distributed): the loss is that of the whole batch, from the
    gathered cosines and features, and the guard sums the gradients over the processes.
    """
    optimizer.zero_grad(set_to_none=True)
    if features is None:
        cos, feats, text = model.cosines(images, recipe.precision)
    else:
        cos, feats, text = features(images)
    if part is not None:
        cos, feats, text = part.gather(cos), part.gather(feats), replicated(text, part.world)
    batch = Batch(
        logits=LOGIT_SCALE * cos,
        image_features=feats,
        text_features=text,
        fixed=fixed,
        recipe=recipe,
    )
    loss = method.loss(batch)
    now = guard is None
    guard = guard or StepGuard(optimizer, "stop", part.world if part else SINGLE_PROCESS)
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

    def __init__(
        self, optimizer: torch.optim.Optimizer, policy: str, world: World = SINGLE_PROCESS
    ):
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


# --- a training run -------------------------------------------------------------------------

READ_EVERY = 25  # steps between two reads of the guard's verdicts on an accelerator


def read_every(device: torch.device) -> int:
    """Steps between reads of the guard's verdicts: every step on a CPU, where a read costs
    nothing; `READ_EVERY` on an accelerator, where each read waits for its queued work."""
    return 1 if device.type == "cpu" else READ_EVERY


@dataclass
class TrainState:
    """What a training run has done so far: saved whole in every checkpoint (beside the
    tensors: tuned, optimiser, generators) and restored whole from it."""

    epoch: int = 1  # the epoch in progress, or the next one at an epoch's end
    batch: int = 0  # batches of it done
    history: list[dict] = field(default_factory=list)  # per epoch: mean loss, learning rates
    losses: list[float] = field(default_factory=list)  # the epoch's finite losses so far
    lrs: list[dict[str, float]] = field(default_factory=list)  # its first and last rates
    curves: list[dict] = field(default_factory=list)  # the run's evaluations (ueo.adaptation)
    skipped_steps: int = 0

    @classmethod
    def from_checkpoint(cls, meta: dict) -> TrainState:
        return cls(**{f.name: meta[f.name] for f in fields(cls) if f.name in meta})


class Trainer:
    """A training run: the data order and loader, plain SGD on a cosine schedule, the step's
    guard, its checkpoints, and what the run has done (`state`). `ueo.adaptation.adapt` writes
    the loop: `train_epoch`, its evaluation, `end_epoch`."""

    def __init__(
        self,
        model: UeoModel,
        unlabeled: ImageSet,
        fixed: dict[str, torch.Tensor],
        groups: list[dict],
        method: Method,
        recipe: Recipe,
        runtime: Runtime,
        cache: ImageCache,
        *,
        checkpoint: RunCheckpoint,
        bad_images: BadImages,
        curves: list[dict],
    ):
        self.model, self.method, self.recipe = model, method, recipe
        self.checkpoint, self.bad_images = checkpoint, bad_images
        self.device = resolve_device(runtime.device)
        self.world = world = current_world()
        if world.size > 1 and recipe.precision == "fp16":
            raise UeoError(
                "--precision fp16 scales the loss by a factor each process would change on its "
                "own; under torchrun use bf16 (as fast on recent GPUs, and needs no scaling)."
            )
        self.progress = runtime.progress and world.main
        self.read_every = read_every(self.device)
        self.fixed_all_images = fixed  # what a checkpoint stores
        images, fixed = training_subset(unlabeled, fixed, method)
        self.fixed = {k: v.to(self.device) for k, v in fixed.items()}
        self.order = EpochOrder(len(images), recipe.seed, recipe.batch_size, world.rank, world.size)
        self.image_shape = (3, model.clip.image_size, model.clip.image_size)
        self.loader = _loader(model, images, recipe, runtime, self.device, self.order, cache)
        self.batches = len(self.loader)
        self.optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.0, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(recipe.epochs * self.batches, 1)
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if recipe.precision == "fp16" else None
        self.guard = StepGuard(self.optimizer, recipe.on_nonfinite, world)
        self.features, self.compiled = _forward(model, recipe, runtime, self.device)
        self.full_part_size = len(range(world.rank, recipe.batch_size, world.size))
        self.state = TrainState(curves=curves)
        self.stop: dict = {"signal": None}
        if checkpoint.saved is not None:
            self.state = TrainState.from_checkpoint(checkpoint.restore(self))
            self.order.skip = self.state.batch * self.recipe.batch_size
            log.info(
                "resuming from %s at epoch %d, batch %d",
                checkpoint.path,
                self.state.epoch,
                self.state.batch,
            )

    def epochs(self) -> range:
        """The epochs left to run: all of them, or those from the checkpoint's on."""
        return range(self.state.epoch, self.recipe.epochs + 1)

    @contextmanager
    def stopping_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask the run to checkpoint and stop after the current step (a second
        one stops at once), while the run writes checkpoints."""
        with stop_on_signals(self.checkpoint.path is not None) as self.stop:
            yield

    def train_epoch(self, epoch: int) -> None:
        """One pass over the data in this epoch's order, a training step per batch; then the
        epoch's outputs checked and its history line. The steps' verdicts are read every
        `read_every` steps; a signal checkpoints after the current step and stops.

        In a world of several processes, each batch is split over them; they agree, on the
        CPU, on the images each part holds (a part may be empty, an image unreadable) and on
        a signal to stop, so that every process steps, and stops, at the same batch."""
        epoch_start = self.order.generator.get_state()
        done = self.order.skip // self.recipe.batch_size
        self.order.set_epoch(epoch)  # keys the epoch's augmentation draws
        last = None
        desc = f"epoch {epoch}/{self.recipe.epochs}"
        with tqdm(
            total=self.batches, initial=done, desc=desc, leave=False, disable=not self.progress
        ) as bar:
            for b, (x, idx, errors) in enumerate(self.loader, start=done + 1):
                bar.update()
                for i, msg in errors:
                    self.bad_images.report(i, msg)
                batch = self.world.share_batch(self.stop["signal"] is not None, idx.tolist())
                if not batch.empty:
                    if x is not None:
                        x = last = self.loader.dataset.finish(x.to(self.device, non_blocking=True))
                    else:  # this process's part holds no readable image
                        x = torch.empty((0, *self.image_shape), device=self.device)
                    self.step(x, batch.indices, (epoch, b))
                if b % self.read_every == 0:
                    self.read_verdicts(bar)
                if batch.stop and b < self.batches:
                    self.read_verdicts(bar)
                    self.save(epoch, b, epoch_start)
                    raise self.interrupted(epoch, b)
            self.read_verdicts(bar)
        self.check_outputs(last, epoch)
        self.record_epoch(epoch)

    def step(self, images: torch.Tensor, parts: list[list[int]], where: tuple[int, int]) -> None:
        """One guarded SGD step (`training_step`) on the batch whose images are `parts` (one
        list of dataset indices per process; this process holds `images`), and the schedule's."""
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self.state.lrs = [self.state.lrs[0] if self.state.lrs else lrs, lrs]
        idx = torch.tensor([i for part in parts for i in part]).to(self.device, non_blocking=True)
        part = BatchPart(self.world, [len(p) for p in parts]) if self.world.size > 1 else None
        full = self.compiled is not None and len(images) == self.full_part_size
        training_step(
            self.model,
            images,
            {k: v[idx] for k, v in self.fixed.items()},
            self.optimizer,
            self.method,
            self.recipe,
            scaler=self.scaler,
            features=self.compiled if full else self.features,
            guard=self.guard,
            where=where,
            part=part,
        )
        self.scheduler.step()

    def read_verdicts(self, bar: tqdm) -> None:
        """Read the guard's verdicts: keep the finite losses, count (and say) each skipped
        step, or stop the run at the first non-finite one."""
        for verdict in self.guard.read():
            epoch, batch = verdict.where
            if verdict.kind == FINITE:
                self.state.losses.append(verdict.loss)
                bar.set_postfix(loss=f"{verdict.loss:.4f}")
            elif self.recipe.on_nonfinite == "skip":
                self.state.skipped_steps += 1
                (log.warning if self.world.main else log.debug)(
                    "Skipped a step at epoch %d, batch %d: %s is not finite",
                    epoch,
                    batch,
                    verdict.what,
                )
            else:
                what = verdict.what[0].upper() + verdict.what[1:]
                raise UeoError(
                    f"{what} is not finite at epoch {epoch}, batch {batch}: stopped (lower the "
                    f"learning rates, or --on-nonfinite skip){self.checkpoint.kept_note()}."
                )

    def check_outputs(self, images: torch.Tensor | None, epoch: int) -> None:
        """Finite parameters can still overflow the forward pass: the epoch's last batch (of
        every process) must give finite outputs before the epoch's checkpoint is written."""
        finite = True
        if images is not None:
            with torch.no_grad():
                cos, _, _ = self.features(images)
            finite = bool(torch.isfinite(cos).all())
        if not self.world.everyone(finite):
            raise UeoError(
                f"The tuned parameters give non-finite outputs after epoch {epoch}: training "
                f"diverged (lower the learning rates){self.checkpoint.kept_note()}."
            )

    def record_epoch(self, epoch: int) -> None:
        """The epoch's history entry (mean loss, first and last learning rates) and log line."""
        losses, lrs = self.state.losses, self.state.lrs
        mean = float(np.mean(losses)) if losses else None
        rates = {k: [lrs[0][k], lrs[-1][k]] for k in lrs[0]} if lrs else {}
        self.state.history.append({"epoch": epoch, "loss": mean, "lr": rates})
        lr_text = " ".join(f"lr_{k}={a:.3g}..{b:.3g}" for k, (a, b) in rates.items())
        loss_text = f"{mean:.5f}" if mean is not None else "n/a"
        epoch_log.info("epoch %d/%d loss %s %s", epoch, self.recipe.epochs, loss_text, lr_text)

    def end_epoch(self, epoch: int) -> None:
        """The epoch's checkpoint (always a good one: its outputs were checked), then a stop
        if a signal asked any process for one."""
        self.state.losses, self.state.lrs = [], []
        self.save(epoch + 1, 0, self.order.generator.get_state())
        if self.world.anyone(self.stop["signal"] is not None):
            raise self.interrupted(epoch + 1, 0)

    def save(self, epoch: int, batch: int, epoch_start: torch.Tensor) -> None:
        """The checkpoint after `batch` batches of `epoch` (epoch + 1, 0 at an epoch's end),
        written by the main process (every process holds the same state)."""
        self.state.epoch, self.state.batch = epoch, batch
        if self.world.main and self.checkpoint.path is not None:
            self.checkpoint.write(self, asdict(self.state), epoch_start)

    def interrupted(self, epoch: int, batch: int) -> Interrupted:
        """The exception that ends a run a signal stopped, its checkpoint written."""
        name = signal.Signals(self.stop["signal"]).name
        where = f"epoch {epoch}, batch {batch}" if batch else f"the start of epoch {epoch}"
        if self.world.main:  # the process that wrote it
            log.warning(
                "%s: checkpoint written at %s (%s); resume with --resume",
                name,
                where,
                self.checkpoint.path,
            )
        return Interrupted(f"interrupted by {name}; checkpoint at {where}, resume with --resume")


@contextmanager
def stop_on_signals(enabled: bool) -> Iterator[dict]:
    """SIGINT/SIGTERM set the flag the loop reads after each step; a second signal stops at
    once. Only the main thread can install handlers."""
    flag: dict = {"signal": None}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["signal"] is not None:
            raise KeyboardInterrupt
        flag["signal"] = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def training_subset(
    unlabeled: ImageSet, fixed: dict[str, torch.Tensor], method: Method
) -> tuple[ImageSet, dict[str, torch.Tensor]]:
    """The images a method trains on: all, or those its fixed `TRAIN_MASK` keeps."""
    if TRAIN_MASK not in fixed:
        return unlabeled, fixed
    keep = fixed[TRAIN_MASK].cpu().numpy().astype(bool)
    if not keep.any():
        raise UeoError(f"Method {method.name} selected no unlabeled image to train on.")
    log.info("%s trains on %d of %d unlabeled images", method.name, keep.sum(), len(keep))
    mask = torch.from_numpy(keep)
    return unlabeled.subset(keep), {k: v[mask] for k, v in fixed.items()}


def _loader(
    model: UeoModel,
    images: ImageSet,
    recipe: Recipe,
    runtime: Runtime,
    device: torch.device,
    order: EpochOrder,
    cache: ImageCache,
):
    """The training loader: the train transform (or the test one, `--augment none`), batches
    in `order`, images through the run's decoded-image store."""
    clip = model.clip
    transform = clip.train_transform() if recipe.augment == "default" else clip.test_transform()
    return make_loader(
        images,
        transform,
        recipe.batch_size,
        True,
        workers_of(runtime),
        device,
        recipe.seed,
        order=order,
        cache=cache,
    )


def _forward(model: UeoModel, recipe: Recipe, runtime: Runtime, device: torch.device):
    """A step's forward pass (`UeoModel.cosines`, a frozen prompt's features computed once),
    and its compiled form for the shape of (this process's part of) a full batch (`--compile`;
    other shapes run eagerly)."""
    text = None
    if not model.prompt.ctx.requires_grad:
        with torch.no_grad(), autocast(device, recipe.precision):
            text = model.text_features()
    features = partial(model.cosines, precision=recipe.precision, text=text)
    return features, torch.compile(features, dynamic=False) if runtime.compile else None
