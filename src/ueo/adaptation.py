"""The adaptation loop: a registered method trained on unlabeled images (docs/spec.md).

`adapt` runs the zero-shot model once over the unlabeled set (the method's fixed per-sample
values come from it), trains the tuned groups with plain SGD and a cosine schedule, and
evaluates before and after. It changes the model's tuned tensors in place and nothing else.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ueo.cache import ImageCache
from ueo.data import BadImages, ImageSet, make_loader
from ueo.errors import UeoError
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
    """Plain data about one adaptation run; `metrics` maps phase -> set name -> metrics."""

    metrics: dict
    threshold: float
    recipe: Recipe
    history: list[dict] = field(default_factory=list)
    curves: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    skipped_images: int = 0
    outputs: dict = field(default_factory=dict, repr=False)


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
    `model.image_features` (a compiled version of it, for instance).
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
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def adapt(
    model: UeoModel,
    unlabeled: ImageSet,
    recipe: Recipe | None = None,
    runtime: Runtime | None = None,
    *,
    test: ImageSet | None = None,
    zeroshot: dict[str, Outputs] | None = None,
    cache: ImageCache | None = None,
) -> AdaptResult:
    """Adapt `model` in place on `unlabeled` images and evaluate before and after.

    `zeroshot` may hold precomputed zero-shot `Outputs` for "unlabeled" and "test", so that a
    sweep shares one zero-shot pass between methods; `cache` (ueo.cache) the decoded images.
    """
    recipe = (recipe or Recipe()).validate()
    runtime = (runtime or Runtime()).validate()
    method = get_method(recipe.method)
    _check_prompt(model, recipe)
    if not len(unlabeled):
        raise UeoError("The unlabeled set is empty.")
    if method.needs_labels and not unlabeled.labelled:
        raise UeoError(f"Method {method.name} uses labels; the unlabeled data carries none.")
    start = time.perf_counter()
    seed_everything(recipe.seed)
    device = resolve_device(runtime.device)
    model.to(device)
    bad = BadImages(runtime.on_bad_image)
    cache = cache if cache is not None else ImageCache()
    sets = {"unlabeled": unlabeled} if test is None else {"unlabeled": unlabeled, "test": test}

    def run(images: ImageSet, desc: str) -> Outputs:
        return infer(
            model, images, runtime, precision=recipe.precision, bad=bad, desc=desc, cache=cache
        )

    zs = dict(zeroshot or {})
    for name, images in sets.items():
        if name not in zs:
            zs[name] = run(images, f"zero-shot {name}")
    metrics = {"zeroshot": {k: metrics_of(zs[k], v) for k, v in sets.items()}}
    curves = [{"epoch": 0, **metrics["zeroshot"]}]
    history: list[dict] = []
    final = zs

    def evaluate_epoch(epoch: int) -> None:
        """Learning curves: the sets evaluated every `runtime.eval_every` epochs."""
        if runtime.eval_every and epoch % runtime.eval_every == 0 and epoch < recipe.epochs:
            outs = {k: run(v, f"epoch {epoch} {k}") for k, v in sets.items()}
            curves.append({"epoch": epoch, **{k: metrics_of(outs[k], v) for k, v in sets.items()}})

    with tuning(model, recipe) as groups:
        if method.trains and groups and recipe.epochs > 0:
            fixed = {}
            if method.fixed is not None:
                cos = torch.from_numpy(zs["unlabeled"].cos)
                fixed = method.fixed(cos, torch.from_numpy(unlabeled.labels), recipe)
            history = _train(
                model, unlabeled, fixed, groups, method, recipe, runtime, bad, evaluate_epoch, cache
            )
    if history:
        final = {k: run(v, f"adapted {k}") for k, v in sets.items()}
    metrics["adapted"] = {k: metrics_of(final[k], v) for k, v in sets.items()}
    if history:
        curves.append({"epoch": recipe.epochs, **metrics["adapted"]})
    valid = final["unlabeled"].valid
    threshold = otsu_threshold(final["unlabeled"].score[valid]) if valid.any() else 0.0
    return AdaptResult(
        metrics=metrics,
        threshold=threshold,
        recipe=recipe,
        history=history,
        curves=curves,
        wall_time_s=time.perf_counter() - start,
        skipped_images=len(bad),
        outputs={"zeroshot": zs, "adapted": final},
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


def _train(
    model, unlabeled, fixed, groups, method, recipe, runtime, bad, after_epoch, cache
) -> list[dict]:
    device = resolve_device(runtime.device)
    if TRAIN_MASK in fixed:
        keep = fixed[TRAIN_MASK].cpu().numpy().astype(bool)
        if not keep.any():
            raise UeoError(f"Method {method.name} selected no unlabeled image to train on.")
        unlabeled = unlabeled.subset(keep)
        fixed = {k: v[torch.from_numpy(keep)] for k, v in fixed.items()}
    transform = (
        model.clip.train_transform() if recipe.augment == "default" else model.clip.test_transform()
    )
    workers = workers_of(runtime)
    loader = make_loader(
        unlabeled, transform, recipe.batch_size, True, workers, device, recipe.seed, cache
    )
    optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.0, weight_decay=0.0)
    total = recipe.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    scaler = torch.amp.GradScaler(device.type) if recipe.precision == "fp16" else None
    frozen_text = None
    if not model.prompt.ctx.requires_grad:
        with torch.no_grad(), autocast(device, recipe.precision):
            frozen_text = model.text_features()
    encode = torch.compile(model.image_features) if runtime.compile else None
    history = []
    for epoch in range(1, recipe.epochs + 1):
        losses = []
        desc = f"epoch {epoch}/{recipe.epochs}"
        with tqdm(total=len(loader), desc=desc, leave=False, disable=not runtime.progress) as bar:
            for x, idx, errors in loader:
                bar.update()
                for i, msg in errors:
                    bad.report(i, msg)
                if x is None:
                    continue
                loss = training_step(
                    model,
                    x.to(device, non_blocking=True),
                    {k: v[idx] for k, v in fixed.items()},
                    optimizer,
                    method,
                    recipe,
                    scaler,
                    frozen_text,
                    encode,
                )
                if not math.isfinite(loss):
                    raise UeoError(
                        f"The loss became {loss} at epoch {epoch}; lower the learning "
                        "rates or use --precision fp32/bf16."
                    )
                scheduler.step()
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}")
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else None, "lr": lrs}
        history.append(record)
        lr_text = " ".join(f"lr_{k}={v:.3g}" for k, v in lrs.items())
        loss_text = f"{record['loss']:.5f}" if losses else "n/a"
        epoch_log.info("epoch %d/%d loss %s %s", epoch, recipe.epochs, loss_text, lr_text)
        with torch.no_grad():
            after_epoch(epoch)
    return history
