"""The adaptation loop: a registered method trained on unlabeled images (docs/spec.md).

`adapt` runs the zero-shot model once over the unlabeled set (the method's fixed per-sample
values come from it), trains the tuned groups with plain SGD and a cosine schedule, and
evaluates before and after. It changes the model's tuned tensors in place and nothing else.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ueo.cache import ImageCache
from ueo.checkpoint import (
    CHECKPOINT_FILE,
    Interrupted,
    check_identity,
    load_checkpoint,
    pack_optimizer,
    rng_state,
    save_checkpoint,
    set_rng_state,
    sub,
    unpack_optimizer,
)
from ueo.data import BadImages, EpochOrder, ImageSet, make_loader
from ueo.diagnostics import label_free
from ueo.distributed import Shard, current_world
from ueo.errors import UeoError
from ueo.eventlog import NoEventLog, open_event_log
from ueo.fingerprint import run_identity
from ueo.inference import Outputs, infer, metrics_of, workers_of
from ueo.methods import TRAIN_MASK, Method, get_method
from ueo.metrics import otsu_threshold
from ueo.model import UeoModel, frozen_weights_in, tuning
from ueo.recipe import Recipe, Runtime
from ueo.runtime import DTYPES, autocast, resolve_device, seed_everything
from ueo.timing import Clock
from ueo.training import FINITE, StepGuard, training_step

log = logging.getLogger("ueo")
epoch_log = logging.getLogger("ueo.epochs")  # per-epoch lines; sweeps keep them off the terminal

# On an accelerator, steps between two reads of the guard's verdicts (each read waits for the
# device to finish its queued work); on a CPU every step is read.
READ_EVERY = 25


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

    `zeroshot` may hold precomputed zero-shot `Outputs` for "unlabeled" and "test", so that a
    sweep shares one zero-shot pass between methods. With `checkpoint_dir`, a checkpoint is
    written there at the end of every epoch and on SIGINT/SIGTERM (then `Interrupted` is
    raised); `resume=True` continues from it, if there is one, after checking it was made
    with the same recipe, model, weights, classes and images (docs/reliability.md). `cache`
    (ueo.cache) holds decoded images shared by every pass.
    """
    recipe = (recipe or Recipe()).validate()
    runtime = (runtime or Runtime()).validate()
    method = get_method(recipe.method)
    _check_prompt(model, recipe)
    if not len(unlabeled):
        raise UeoError("The unlabeled set is empty.")
    if method.needs_labels and not unlabeled.labelled:
        raise UeoError(f"Method {method.name} uses labels; the unlabeled data carries none.")
    ck = _Checkpoints(Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None)
    if ck.path is not None:
        ck.identity = run_identity(
            model.clip.model_name, model.clip.pretrained, model.class_names, recipe, unlabeled, test
        )
        if resume and ck.path.is_file():
            ck.saved = load_checkpoint(ck.path)
            check_identity(ck.path, ck.saved[1].get("identity", {}), ck.identity)
        _same_checkpoint(ck)
    clock = Clock()
    seed_everything(recipe.seed)
    device = resolve_device(runtime.device)
    model.to(device)
    bad = BadImages(runtime.on_bad_image)
    cache = cache if cache is not None else ImageCache()
    sets = {"unlabeled": unlabeled} if test is None else {"unlabeled": unlabeled, "test": test}
    events = open_event_log(runtime, checkpoint_dir) if current_world().main else NoEventLog()

    def run(images: ImageSet, desc: str) -> Outputs:
        return infer(
            model, images, runtime, precision=recipe.precision, bad=bad, desc=desc, cache=cache
        )

    def point(epoch: int, outs: dict[str, Outputs]) -> dict:
        """A learning-curve point: each set's metrics and the unlabeled set's label-free
        scores (against the zero-shot outputs)."""
        return {
            "epoch": epoch,
            **{k: metrics_of(outs[k], v) for k, v in sets.items()},
            "label_free": label_free(outs["unlabeled"], zs["unlabeled"], recipe.trade),
        }

    def evaluate_epoch(epoch: int) -> None:
        """After each epoch: learning curves (the sets evaluated, with their label-free scores,
        every `runtime.eval_every` epochs), and the epoch's loss to the event log."""
        if runtime.eval_every and epoch % runtime.eval_every == 0 and epoch < recipe.epochs:
            with clock("evaluation"):
                outs = {k: run(v, f"epoch {epoch} {k}") for k, v in sets.items()}
                curves.append(point(epoch, outs))
            events.evaluation(curves[-1])
        events.history(trainer.history[-1:])

    trainer = None
    with frozen_weights_in(model, DTYPES[recipe.precision]):
        zs = dict(zeroshot or {})
        with clock("zeroshot"):
            for name, images in sets.items():
                if name not in zs:
                    zs[name] = run(images, f"zero-shot {name}")
        for name, images in sets.items():
            _require_readable(zs[name], images, name)
        curves = [point(0, zs)]
        metrics = {"zeroshot": {k: curves[0][k] for k in sets}}
        scores = {"zeroshot": curves[0]["label_free"]}
        events.evaluation(curves[0])
        final = zs
        with tuning(model, recipe) as groups:
            if method.trains and groups and recipe.epochs > 0:
                if ck.saved is not None:
                    fixed = sub(ck.saved[0], "fixed")
                elif method.fixed is not None:
                    cos = torch.from_numpy(zs["unlabeled"].cos)
                    fixed = method.fixed(cos, torch.from_numpy(unlabeled.labels), recipe)
                else:
                    fixed = {}
                trainer = _Trainer(model, unlabeled, fixed, groups, method, recipe, runtime, cache)
                with clock("training"):
                    trainer.run(bad, ck, curves, evaluate_epoch)
        if trainer is not None:
            with clock("evaluation"):
                final = {k: run(v, f"adapted {k}") for k, v in sets.items()}
            for name, out in final.items():
                _require_finite(out, name)
    last = point(recipe.epochs, final)
    metrics["adapted"] = {k: last[k] for k in sets}
    scores["adapted"] = last["label_free"]
    if trainer is not None:
        curves.append(last)
        events.evaluation(last)
    events.close()
    valid = final["unlabeled"].valid
    threshold = otsu_threshold(final["unlabeled"].score[valid])
    if not math.isfinite(threshold):
        raise UeoError(f"The unknown threshold came out {threshold}; nothing was written.")
    return AdaptResult(
        metrics=metrics,
        threshold=threshold,
        recipe=recipe,
        history=trainer.history if trainer else [],
        curves=curves,
        wall_time_s=clock.total(),
        skipped_images=_unreadable(bad),
        skipped_steps=trainer.skipped if trainer else 0,
        identity=ck.identity,
        outputs={"zeroshot": zs, "adapted": final},
        timings=clock.phases(),
        label_free=scores,
    )


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


def _check_prompt(model: UeoModel, recipe: Recipe) -> None:
    """The model's prompt must be the one the recipe describes (it is built with the model)."""
    prompt = model.prompt
    if prompt.ctx_init != recipe.ctx_init.strip() or (
        recipe.n_ctx is not None and recipe.n_ctx != prompt.n_ctx
    ):
        raise UeoError(
            f"The model's prompt (ctx_init {prompt.ctx_init!r}, {prompt.n_ctx} tokens) is not "
            f"the recipe's (ctx_init {recipe.ctx_init!r}, n_ctx {recipe.n_ctx}); build the model "
            "with the recipe: load_model(..., recipe=recipe)."
        )


@dataclass
class _Checkpoints:
    """Where a run's checkpoint goes, the identity it carries, and the one it resumes from."""

    path: Path | None
    identity: dict | None = None
    saved: tuple[dict, dict] | None = None

    def kept(self) -> str:
        """The end of an error message: where the last good checkpoint is, if there is one."""
        if self.path is not None and self.path.is_file():
            return f"; the last good checkpoint is kept in {self.path}"
        return ""


@contextmanager
def _stop_on_signals(enabled: bool) -> Iterator[dict]:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second
    signal stops at once. Only the main thread can install handlers."""
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


class _Trainer:
    """A training run: the data order and loader, plain SGD on a cosine schedule, the step's
    guard, and what the run has recorded. `run` says what the run does, `epoch` what an epoch
    does; `ueo.training.training_step` says what a step does."""

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
    ):
        self.model, self.method, self.recipe = model, method, recipe
        self.device = resolve_device(runtime.device)
        self.world = world = current_world()
        if world.size > 1 and recipe.precision == "fp16":
            raise UeoError(
                "--precision fp16 scales the loss by a factor each process would change on its "
                "own; under torchrun use bf16 (as fast on recent GPUs, and needs no scaling)."
            )
        self.progress = runtime.progress and world.main
        self.read_every = _read_every(self.device)
        self.all_fixed = fixed  # what a checkpoint stores
        images, fixed = _training_subset(unlabeled, fixed, method)
        self.fixed = {k: v.to(self.device) for k, v in fixed.items()}
        self.order = EpochOrder(len(images), recipe.seed, recipe.batch_size, world.rank, world.size)
        self.image_shape = (3, model.clip.image_size, model.clip.image_size)
        self.loader = make_loader(
            images,
            model.clip.train_transform()
            if recipe.augment == "default"
            else model.clip.test_transform(),
            recipe.batch_size,
            True,
            workers_of(runtime),
            self.device,
            recipe.seed,
            order=self.order,
            cache=cache,
        )
        self.batches = len(self.loader)
        self.optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.0, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(recipe.epochs * self.batches, 1)
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if recipe.precision == "fp16" else None
        self.guard = StepGuard(self.optimizer, recipe.on_nonfinite, world)
        text = None  # a frozen prompt's features, computed once
        if not model.prompt.ctx.requires_grad:
            with torch.no_grad(), autocast(self.device, recipe.precision):
                text = model.text_features()
        self.features = partial(model.cosines, precision=recipe.precision, text=text)
        # Compiled for the shape of (this process's part of) a full batch; others run eagerly.
        self.compiled = torch.compile(self.features, dynamic=False) if runtime.compile else None
        self.full = len(range(world.rank, recipe.batch_size, world.size))
        self.first_epoch = 1
        self.history: list[dict] = []
        self.losses: list[float] = []  # the epoch's finite losses so far
        self.lrs: list[dict[str, float]] = []  # the epoch's learning rates, first and last
        self.skipped = 0

    def resume(self, ck: _Checkpoints, curves: list[dict]) -> None:
        """Continue from a checkpoint: tuned tensors, optimiser, schedule, data order, RNGs."""
        tensors, meta = ck.saved
        self.model.load_adapter_state(sub(tensors, "tuned"), self.recipe.norm_layers)
        self.optimizer.load_state_dict(unpack_optimizer(tensors, meta["optimizer"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.first_epoch, self.history, self.losses = meta["epoch"], meta["history"], meta["losses"]
        self.lrs = meta.get("lrs", [])
        self.skipped = meta["skipped_steps"]
        curves[:] = meta["curves"]
        self.order.generator.set_state(tensors["order/epoch_start"])
        self.order.skip = meta["batch"] * self.recipe.batch_size
        set_rng_state(tensors, meta["rng"])
        log.info("resuming from %s at epoch %d, batch %d", ck.path, self.first_epoch, meta["batch"])

    def run(
        self,
        bad: BadImages,
        ck: _Checkpoints,
        curves: list[dict],
        after_epoch: Callable[[int], None],
    ) -> None:
        """Every epoch from the first (or the checkpoint's), each ended by `end_epoch`."""
        if ck.saved is not None:
            self.resume(ck, curves)
        with _stop_on_signals(ck.path is not None) as stop:
            for epoch in range(self.first_epoch, self.recipe.epochs + 1):
                last = self.epoch(epoch, bad, ck, curves, stop)
                self.end_epoch(epoch, last, ck, curves, after_epoch)
                if any(p[0] for p in self.world.exchange([stop["signal"] is not None])):
                    raise _interrupted(stop, ck, epoch + 1, 0)

    def epoch(
        self, epoch: int, bad: BadImages, ck: _Checkpoints, curves: list[dict], stop: dict
    ) -> torch.Tensor | None:
        """One pass over the data in this epoch's order, a training step per batch. The
        steps' verdicts are read every `read_every` steps; a signal checkpoints after the
        current step and stops. Returns the epoch's last batch (for `end_epoch`'s check).

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
                    bad.report(i, msg)
                parts = self.world.exchange([stop["signal"] is not None, *idx.tolist()])
                if any(len(p) > 1 for p in parts):
                    if x is not None:
                        x = last = self.loader.dataset.finish(x.to(self.device, non_blocking=True))
                    else:  # this process's part holds no readable image
                        x = torch.empty((0, *self.image_shape), device=self.device)
                    self.step(x, [p[1:] for p in parts], (epoch, b))
                if b % self.read_every == 0:
                    self.settle(ck, bar)
                if any(p[0] for p in parts) and b < self.batches:
                    self.settle(ck, bar)
                    self.checkpoint(ck, curves, epoch, b, epoch_start)
                    raise _interrupted(stop, ck, epoch, b)
            self.settle(ck, bar)
        return last

    def step(self, images: torch.Tensor, parts: list[list[int]], where: tuple[int, int]) -> None:
        """One guarded SGD step (ueo.training) on the batch whose images are `parts` (one list
        of dataset indices per process; this process holds `images`), and the schedule's."""
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self.lrs = [self.lrs[0] if self.lrs else lrs, lrs]
        idx = torch.tensor([i for part in parts for i in part]).to(self.device, non_blocking=True)
        shard = Shard(self.world, [len(p) for p in parts]) if self.world.size > 1 else None
        full = self.compiled is not None and len(images) == self.full
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
            shard=shard,
        )
        self.scheduler.step()

    def settle(self, ck: _Checkpoints, bar: tqdm) -> None:
        """Read the guard's verdicts: keep the finite losses, count (and say) each skipped
        step, or stop the run at the first non-finite one."""
        for verdict in self.guard.read():
            epoch, batch = verdict.where
            if verdict.kind == FINITE:
                self.losses.append(verdict.loss)
                bar.set_postfix(loss=f"{verdict.loss:.4f}")
            elif self.recipe.on_nonfinite == "skip":
                self.skipped += 1
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
                    f"learning rates, or --on-nonfinite skip){ck.kept()}."
                )

    def end_epoch(
        self,
        epoch: int,
        last: torch.Tensor | None,
        ck: _Checkpoints,
        curves: list[dict],
        after_epoch: Callable[[int], None],
    ) -> None:
        """Check the tuned tensors' outputs, record and log the epoch, evaluate if asked,
        and checkpoint: the checkpoint of an epoch is always a good one."""
        self.check_outputs(last, epoch, ck)
        mean = float(np.mean(self.losses)) if self.losses else None
        lrs = {k: [self.lrs[0][k], self.lrs[-1][k]] for k in self.lrs[0]} if self.lrs else {}
        self.history.append({"epoch": epoch, "loss": mean, "lr": lrs})
        lr_text = " ".join(f"lr_{k}={a:.3g}..{b:.3g}" for k, (a, b) in lrs.items())
        loss_text = f"{mean:.5f}" if mean is not None else "n/a"
        epoch_log.info("epoch %d/%d loss %s %s", epoch, self.recipe.epochs, loss_text, lr_text)
        with torch.no_grad():
            after_epoch(epoch)
        self.losses, self.lrs = [], []
        self.checkpoint(ck, curves, epoch + 1, 0, self.order.generator.get_state())

    def check_outputs(self, images: torch.Tensor | None, epoch: int, ck: _Checkpoints) -> None:
        """Finite parameters can still overflow the forward pass: the epoch's last batch (of
        every process) must give finite outputs before the epoch's checkpoint is written."""
        finite = True
        if images is not None:
            with torch.no_grad():
                cos, _, _ = self.features(images)
            finite = bool(torch.isfinite(cos).all())
        if not all(p[0] for p in self.world.exchange([finite])):
            raise UeoError(
                f"The tuned parameters give non-finite outputs after epoch {epoch}: training "
                f"diverged (lower the learning rates){ck.kept()}."
            )

    def checkpoint(
        self, ck: _Checkpoints, curves: list[dict], epoch: int, batch: int, epoch_start
    ) -> None:
        """The state after `batch` batches of `epoch` (epoch + 1, 0 at an epoch's end), written
        by the main process (every process holds the same state)."""
        if ck.path is None or not self.world.main:
            return
        opt_tensors, opt_state = pack_optimizer(self.optimizer.state_dict())
        rng_tensors, rng_json = rng_state()
        tuned = self.model.adapter_state(self.recipe.norm_layers)
        tensors = {f"tuned/{k}": v for k, v in tuned.items()}
        tensors.update({f"fixed/{k}": v for k, v in self.all_fixed.items()})
        tensors.update(opt_tensors)
        tensors.update(rng_tensors)
        tensors["order/epoch_start"] = epoch_start
        state = {
            "identity": ck.identity,
            "epoch": epoch,
            "batch": batch,
            "batches_per_epoch": self.batches,
            "losses": self.losses,
            "lrs": self.lrs,
            "history": self.history,
            "curves": curves,
            "skipped_steps": self.skipped,
            "optimizer": opt_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_json,
        }
        save_checkpoint(ck.path, tensors, state)


def _same_checkpoint(ck: _Checkpoints) -> None:
    """Every process of a run resumes from the same checkpoint, or none does: the run folder
    must be on storage that every machine sees."""
    world = current_world()
    found = [bool(p[0]) for p in world.exchange([ck.saved is not None])]
    if len(set(found)) > 1:
        missing = [r for r, f in enumerate(found) if not f]
        raise UeoError(
            f"Process(es) {missing} do not see the checkpoint {ck.path} that process "
            f"{found.index(True)} resumes from: --out must be on storage every machine shares."
        )


def _unreadable(bad: BadImages) -> int:
    """Unreadable images met by any process of the run, each counted once."""
    keys = [zlib.crc32(message.encode()) for message in bad.seen]
    return len({k for part in current_world().exchange(keys) for k in part})


def _read_every(device: torch.device) -> int:
    """Steps between reads of the guard's verdicts: every step on a CPU, where a read costs
    nothing; `READ_EVERY` on an accelerator, where each read waits for its queued work."""
    return 1 if device.type == "cpu" else READ_EVERY


def _training_subset(
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


def _interrupted(stop: dict, ck: _Checkpoints, epoch: int, batch: int) -> Interrupted:
    name = signal.Signals(stop["signal"]).name
    where = f"epoch {epoch}, batch {batch}" if batch else f"the start of epoch {epoch}"
    if current_world().main:  # the process that wrote it
        log.warning("%s: checkpoint written at %s (%s); resume with --resume", name, where, ck.path)
    return Interrupted(f"interrupted by {name}; checkpoint at {where}, resume with --resume")
