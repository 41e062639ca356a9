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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
from ueo.data import BadImages, ImageSet, make_loader
from ueo.diagnostics import label_free
from ueo.errors import UeoError
from ueo.eventlog import open_event_log
from ueo.fingerprint import run_identity
from ueo.inference import Outputs, infer, metrics_of, workers_of
from ueo.methods import TRAIN_MASK, Batch, Method, get_method
from ueo.metrics import otsu_threshold
from ueo.model import UeoModel, tuning
from ueo.objectives import LOGIT_SCALE
from ueo.recipe import Recipe, Runtime
from ueo.runtime import autocast, resolve_device, seed_everything

log = logging.getLogger("ueo")
epoch_log = logging.getLogger("ueo.epochs")  # per-epoch lines; sweeps keep them off the terminal


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
    label_free: dict = field(default_factory=dict)


class NonFinite(Exception):
    """A training step met a non-finite loss, gradient or tuned parameter (see `training_step`)."""


class _EpochOrder(torch.utils.data.Sampler):
    """The data order: one permutation per epoch from a generator of its own.

    The generator's state at an epoch's start and the number of batches done in it give the
    position in the data exactly, whatever the loader's workers do; `skip` samples are left
    out of the next epoch's permutation, to continue an epoch a checkpoint interrupted.
    """

    def __init__(self, n: int, seed: int):
        self.n = n
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.skip = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        # torch's RandomSampler draws a second (empty-sliced) permutation per pass; drawing it
        # too keeps the order of a plain seeded loader from the second epoch on.
        torch.randperm(self.n, generator=self.generator)
        start, self.skip = self.skip, 0
        yield from order[start:]


def training_step(
    model: UeoModel,
    images: torch.Tensor,
    fixed: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    method: Method,
    recipe: Recipe,
    scaler: torch.amp.GradScaler | None = None,
    text: torch.Tensor | None = None,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """One SGD step: logits = 100 * cos, the method's loss in fp32. Returns the loss.

    `text` holds precomputed text features when the prompt is frozen; `encode` replaces
    `model.image_features` (a compiled version of it, for instance). A non-finite loss or
    gradient raises `NonFinite` before the step; a non-finite tuned parameter after it. With
    fp16's `scaler`, non-finite gradients are the scaler's to skip, as usual.
    """
    device = images.device
    encode = encode or model.image_features
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, recipe.precision):
        if text is None:
            text = model.text_features()
        if any(p.requires_grad for p in model.norm_parameters(recipe.norm_layers).values()):
            feats = encode(images)
        else:
            with torch.no_grad():
                feats = encode(images)
        logits = LOGIT_SCALE * (feats.float() @ text.float().t())
    batch = Batch(
        logits=logits.float(),
        image_features=feats.float(),
        text_features=text.float(),
        fixed={k: v.to(device) for k, v in fixed.items()},
        recipe=recipe,
    )
    loss = method.loss(batch)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFinite(f"the loss ({value})")
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        bad = _nonfinite(optimizer, grads=True)
        if bad:
            raise NonFinite(f"the gradient of {bad}")
        optimizer.step()
    bad = _nonfinite(optimizer, grads=False)
    if bad:
        raise NonFinite(f"the tuned parameter {bad}")
    return value


def _nonfinite(optimizer: torch.optim.Optimizer, grads: bool) -> str | None:
    """The first tuned tensor (or its gradient) holding NaN or Inf, as `group[index]`.

    One check over all tensors at once (a step has dozens of small ones); only when it fails
    are they searched one by one, for the name.
    """
    named = [
        (f"{group.get('name', 'group')}[{i}]", p.grad if grads else p)
        for group in optimizer.param_groups
        for i, p in enumerate(group["params"])
    ]
    present = [t.detach().reshape(-1) for _, t in named if t is not None]
    if not present or bool(torch.isfinite(torch.cat(present)).all()):
        return None
    return next(n for n, t in named if t is not None and not bool(torch.isfinite(t).all()))


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
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    identity = saved = None
    if ckpt is not None:
        identity = run_identity(
            model.clip.model_name, model.clip.pretrained, model.class_names, recipe, unlabeled, test
        )
        if resume and ckpt.is_file():
            saved = load_checkpoint(ckpt)
            check_identity(ckpt, saved[1].get("identity", {}), identity)
    start = time.perf_counter()
    seed_everything(recipe.seed)
    device = resolve_device(runtime.device)
    model.to(device)
    bad = BadImages(runtime.on_bad_image)
    cache = cache if cache is not None else ImageCache()
    sets = {"unlabeled": unlabeled} if test is None else {"unlabeled": unlabeled, "test": test}
    events = open_event_log(runtime, checkpoint_dir)

    def run(images: ImageSet, desc: str) -> Outputs:
        return infer(
            model, images, runtime, precision=recipe.precision, bad=bad, desc=desc, cache=cache
        )

    zs = dict(zeroshot or {})
    for name, images in sets.items():
        if name not in zs:
            zs[name] = run(images, f"zero-shot {name}")
    for name, images in sets.items():
        _require_readable(zs[name], images, name)
    metrics = {"zeroshot": {k: metrics_of(zs[k], v) for k, v in sets.items()}}
    scores = {"zeroshot": label_free(zs["unlabeled"], zs["unlabeled"], recipe.trade)}
    curves = [{"epoch": 0, **metrics["zeroshot"], "label_free": scores["zeroshot"]}]
    events.evaluation(curves[0])
    history: list[dict] = []
    final = zs
    steps = _Steps()

    def evaluate_epoch(epoch: int) -> None:
        """Learning curves: the sets evaluated every `runtime.eval_every` epochs."""
        if runtime.eval_every and epoch % runtime.eval_every == 0 and epoch < recipe.epochs:
            outs = {k: run(v, f"epoch {epoch} {k}") for k, v in sets.items()}
            point = {"epoch": epoch, **{k: metrics_of(outs[k], v) for k, v in sets.items()}}
            point["label_free"] = label_free(outs["unlabeled"], zs["unlabeled"], recipe.trade)
            curves.append(point)
            events.evaluation(point)

    with tuning(model, recipe) as groups:
        if method.trains and groups and recipe.epochs > 0:
            fixed = {}
            if saved is not None:
                fixed = sub(saved[0], "fixed")
            elif method.fixed is not None:
                cos = torch.from_numpy(zs["unlabeled"].cos)
                fixed = method.fixed(cos, torch.from_numpy(unlabeled.labels), recipe)
            history = _train(
                model,
                unlabeled,
                fixed,
                groups,
                method,
                recipe,
                runtime,
                bad,
                evaluate_epoch,
                _Checkpointing(ckpt, identity, saved, curves, steps),
                cache,
            )
    if history:
        final = {k: run(v, f"adapted {k}") for k, v in sets.items()}
        for name, out in final.items():
            _require_finite(out, name)
    metrics["adapted"] = {k: metrics_of(final[k], v) for k, v in sets.items()}
    scores["adapted"] = label_free(final["unlabeled"], zs["unlabeled"], recipe.trade)
    if history:
        curves.append(
            {"epoch": recipe.epochs, **metrics["adapted"], "label_free": scores["adapted"]}
        )
        events.history(history)
        events.evaluation(curves[-1])
    events.close()
    valid = final["unlabeled"].valid
    threshold = otsu_threshold(final["unlabeled"].score[valid])
    if not math.isfinite(threshold):
        raise UeoError(f"The unknown threshold came out {threshold}; nothing was written.")
    return AdaptResult(
        metrics=metrics,
        threshold=threshold,
        recipe=recipe,
        history=history,
        curves=curves,
        wall_time_s=time.perf_counter() - start,
        skipped_images=len(bad),
        skipped_steps=steps.skipped,
        identity=identity,
        outputs={"zeroshot": zs, "adapted": final},
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


@dataclass
class _Steps:
    skipped: int = 0


@dataclass
class _Checkpointing:
    """Where `_train` writes its checkpoints, what it resumes from, and what it carries."""

    path: Path | None
    identity: dict | None
    saved: tuple[dict, dict] | None
    curves: list[dict]
    steps: _Steps


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


def _train(
    model,
    unlabeled,
    fixed,
    groups,
    method,
    recipe,
    runtime,
    bad,
    after_epoch,
    ck: _Checkpointing,
    cache: ImageCache | None,
) -> list[dict]:
    device = resolve_device(runtime.device)
    all_fixed = fixed
    if TRAIN_MASK in fixed:
        keep = fixed[TRAIN_MASK].cpu().numpy().astype(bool)
        if not keep.any():
            raise UeoError(f"Method {method.name} selected no unlabeled image to train on.")
        log.info("%s trains on %d of %d unlabeled images", method.name, keep.sum(), len(keep))
        unlabeled = unlabeled.subset(keep)
        fixed = {k: v[torch.from_numpy(keep)] for k, v in fixed.items()}
    transform = (
        model.clip.train_transform() if recipe.augment == "default" else model.clip.test_transform()
    )
    order = _EpochOrder(len(unlabeled), recipe.seed)
    loader = make_loader(
        unlabeled,
        transform,
        recipe.batch_size,
        True,
        workers_of(runtime),
        device,
        recipe.seed,
        sampler=order,
        cache=cache,
    )
    n_batches = len(loader)
    optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.0, weight_decay=0.0)
    total = recipe.epochs * n_batches
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    scaler = torch.amp.GradScaler(device.type) if recipe.precision == "fp16" else None
    history: list[dict] = []
    losses: list[float] = []
    first_epoch = 1
    if ck.saved is not None:
        tensors, meta = ck.saved
        model.load_adapter_state(sub(tensors, "tuned"), recipe.norm_layers)
        optimizer.load_state_dict(unpack_optimizer(tensors, meta["optimizer"]))
        scheduler.load_state_dict(meta["scheduler"])
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        first_epoch, history, losses = meta["epoch"], meta["history"], meta["losses"]
        ck.curves[:] = meta["curves"]
        ck.steps.skipped = meta["skipped_steps"]
        order.generator.set_state(tensors["order/epoch_start"])
        order.skip = meta["batch"] * recipe.batch_size
        set_rng_state(tensors, meta["rng"])
        log.info("resuming from %s at epoch %d, batch %d", ck.path, first_epoch, meta["batch"])
    frozen_text = None
    if not model.prompt.ctx.requires_grad:
        with torch.no_grad(), autocast(device, recipe.precision):
            frozen_text = model.text_features()
    encode = torch.compile(model.image_features) if runtime.compile else None
    tuned = [p for g in optimizer.param_groups for p in g["params"]]

    def checkpoint(epoch: int, batch: int, epoch_start: torch.Tensor) -> None:
        """The state after `batch` batches of `epoch` (epoch + 1, 0 at an epoch's end)."""
        if ck.path is None:
            return
        opt_tensors, opt_state = pack_optimizer(optimizer.state_dict())
        rng_tensors, rng_json = rng_state()
        tensors = {f"tuned/{k}": v for k, v in model.adapter_state(recipe.norm_layers).items()}
        tensors.update({f"fixed/{k}": v for k, v in all_fixed.items()})
        tensors.update(opt_tensors)
        tensors.update(rng_tensors)
        tensors["order/epoch_start"] = epoch_start
        state = {
            "identity": ck.identity,
            "epoch": epoch,
            "batch": batch,
            "batches_per_epoch": n_batches,
            "losses": losses,
            "history": history,
            "curves": ck.curves,
            "skipped_steps": ck.steps.skipped,
            "optimizer": opt_state,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_json,
        }
        save_checkpoint(ck.path, tensors, state)

    def interrupted(stop: dict, epoch: int, batch: int) -> Interrupted:
        name = signal.Signals(stop["signal"]).name
        where = f"epoch {epoch}, batch {batch}" if batch else f"the start of epoch {epoch}"
        log.warning("%s: checkpoint written at %s (%s); resume with --resume", name, where, ck.path)
        return Interrupted(f"interrupted by {name}; checkpoint at {where}, resume with --resume")

    with _stop_on_signals(ck.path is not None) as stop:
        for epoch in range(first_epoch, recipe.epochs + 1):
            epoch_start = order.generator.get_state()
            done = order.skip // recipe.batch_size
            last = None
            if epoch != first_epoch:
                losses = []
            desc = f"epoch {epoch}/{recipe.epochs}"
            with tqdm(
                total=n_batches, initial=done, desc=desc, leave=False, disable=not runtime.progress
            ) as bar:
                for b, (x, idx, errors) in enumerate(loader, start=done + 1):
                    bar.update()
                    for i, msg in errors:
                        bad.report(i, msg)
                    if x is not None:
                        last = x
                        loss = _guarded_step(
                            model,
                            x.to(device, non_blocking=True),
                            {k: v[idx] for k, v in fixed.items()},
                            optimizer,
                            method,
                            recipe,
                            scaler,
                            frozen_text,
                            encode,
                            tuned,
                            (epoch, b, ck),
                        )
                        scheduler.step()
                        if loss is not None:
                            losses.append(loss)
                            bar.set_postfix(loss=f"{loss:.4f}")
                    if stop["signal"] is not None and b < n_batches:
                        checkpoint(epoch, b, epoch_start)
                        raise interrupted(stop, epoch, b)
            if last is not None:
                _check_outputs(model, last.to(device), frozen_text, encode, recipe, epoch, ck)
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else None, "lr": lrs}
            history.append(record)
            lr_text = " ".join(f"lr_{k}={v:.3g}" for k, v in lrs.items())
            loss_text = f"{record['loss']:.5f}" if losses else "n/a"
            epoch_log.info("epoch %d/%d loss %s %s", epoch, recipe.epochs, loss_text, lr_text)
            with torch.no_grad():
                after_epoch(epoch)
            losses = []
            checkpoint(epoch + 1, 0, order.generator.get_state())
            if stop["signal"] is not None:
                raise interrupted(stop, epoch + 1, 0)
    return history


def _check_outputs(model, images, text, encode, recipe, epoch, ck) -> None:
    """Finite parameters can still overflow the forward pass: before an epoch's checkpoint,
    the epoch's last batch must give finite outputs, so that a checkpoint is always good."""
    device = images.device
    with torch.no_grad(), autocast(device, recipe.precision):
        feats = (encode or model.image_features)(images)
        cos = feats.float() @ (model.text_features() if text is None else text).float().t()
    if not bool(torch.isfinite(cos).all()):
        raise UeoError(
            f"The tuned parameters give non-finite outputs after epoch {epoch}: training "
            f"diverged (lower the learning rates){_kept(ck)}."
        )


def _kept(ck: _Checkpointing) -> str:
    if ck.path is not None and ck.path.is_file():
        return f"; the last good checkpoint is kept in {ck.path}"
    return ""


def _guarded_step(model, x, fixed, optimizer, method, recipe, scaler, text, encode, tuned, where):
    """`training_step` under the recipe's non-finite policy: stop the run, or undo the step."""
    epoch, batch, ck = where
    before = [p.detach().clone() for p in tuned] if recipe.on_nonfinite == "skip" else None
    try:
        return training_step(model, x, fixed, optimizer, method, recipe, scaler, text, encode)
    except NonFinite as exc:
        if before is None:
            raise UeoError(
                f"{str(exc)[0].upper()}{str(exc)[1:]} is not finite at epoch {epoch}, batch "
                f"{batch}: stopped (lower the learning rates, or --on-nonfinite skip)"
                f"{_kept(ck)}."
            ) from None
        with torch.no_grad():
            for p, value in zip(tuned, before, strict=True):
                p.copy_(value)
        optimizer.zero_grad(set_to_none=True)
        ck.steps.skipped += 1
        log.warning("Skipped a step at epoch %d, batch %d: %s is not finite", epoch, batch, exc)
        return None
