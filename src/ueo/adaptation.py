"""The adaptation loop: UEO and its baselines on unlabeled images (SPEC.md's recipe)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ueo.data import OOD, UNLABELED, BadImages, ImageSet, make_loader
from ueo.errors import UeoError
from ueo.inference import Outputs, infer, metrics_of
from ueo.metrics import otsu_threshold
from ueo.model import UeoModel
from ueo.objectives import entmin_loss, infomax_loss, mcm_score, ueo_loss
from ueo.runtime import autocast, resolve_device, seed_everything

log = logging.getLogger("ueo")
epoch_log = logging.getLogger("ueo.epochs")  # per-epoch lines; sweeps keep them off the terminal

METHODS = ("zeroshot", "entmin", "infomax", "ueo", "ueo-oracle")
ORACLE_OOD_WEIGHT = 1e-3
LOGIT_SCALE = 100.0


@dataclass
class AdaptConfig:
    """The reference recipe's defaults (SPEC.md); every field is a CLI option."""

    method: str = "ueo"
    epochs: int = 50
    batch_size: int = 64
    lr_prompt: float = 1e-4
    lr_norm: float = 1e-4
    trade: float = 1.0
    seed: int = 2023
    device: str = "auto"
    workers: int = 4
    precision: str = "fp32"
    augment: str = "default"
    on_bad_image: str = "skip"
    eval_batch_size: int = 256
    compile: bool = False
    channels_last: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UeoError(f"Unknown method '{self.method}'; choose from {', '.join(METHODS)}.")
        if self.augment not in ("default", "none"):
            raise UeoError("--augment must be 'default' or 'none'.")
        if self.epochs < 0 or self.batch_size < 1 or self.workers < 0:
            raise UeoError("--epochs and --workers must be >= 0 and --batch-size >= 1.")
        if self.lr_prompt < 0 or self.lr_norm < 0:
            raise UeoError("Learning rates must be >= 0 (0 disables a group).")


@dataclass
class AdaptResult:
    """Plain data about one adaptation run; `metrics` maps phase -> set name -> metrics."""

    metrics: dict
    threshold: float
    history: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    skipped_images: int = 0
    config: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict, repr=False)


def sample_weights(method: str, zeroshot_cos: np.ndarray, labels: np.ndarray) -> torch.Tensor:
    """Per-sample weights fixed before training: MCM of the zero-shot model (T = 1) for UEO."""
    n = len(labels)
    if method == "ueo":
        return mcm_score(torch.from_numpy(np.nan_to_num(zeroshot_cos)))
    if method == "ueo-oracle":
        if (labels == UNLABELED).any():
            raise UeoError("ueo-oracle uses labels to weight samples; the data carries none.")
        return torch.where(torch.from_numpy(labels) == OOD, ORACLE_OOD_WEIGHT, 1.0).float()
    return torch.ones(n)


def objective(
    method: str, logits: torch.Tensor, weights: torch.Tensor, trade: float
) -> torch.Tensor:
    if method in ("ueo", "ueo-oracle"):
        return ueo_loss(logits, weights, trade)
    if method == "infomax":
        return infomax_loss(logits, trade)
    if method == "entmin":
        return entmin_loss(logits)
    raise UeoError(f"Method '{method}' has no training objective.")


def make_optimizer(model: UeoModel, config: AdaptConfig) -> torch.optim.Optimizer | None:
    """Plain SGD with two groups (context, norm affines); a group with lr 0 is frozen."""
    tune_prompt = config.lr_prompt > 0
    tune_norm = config.lr_norm > 0 and bool(model.norm_parameters())
    model.set_tuned(tune_prompt, tune_norm)
    groups = []
    if tune_prompt:
        groups.append({"params": [model.prompt.ctx], "lr": config.lr_prompt, "name": "prompt"})
    if tune_norm:
        norm = list(model.norm_parameters().values())
        groups.append({"params": norm, "lr": config.lr_norm, "name": "norm"})
    if not groups:
        return None
    return torch.optim.SGD(
        groups, lr=config.lr_prompt or config.lr_norm, momentum=0.0, weight_decay=0.0
    )


def training_step(
    model: UeoModel,
    images: torch.Tensor,
    weights: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    method: str = "ueo",
    trade: float = 1.0,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    text: torch.Tensor | None = None,
) -> float:
    """One SGD step of SPEC.md: logits = 100 * cos, loss in fp32. Returns the loss."""
    device = images.device
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        if text is None:
            text = model.text_features()
        if any(p.requires_grad for p in model.norm_parameters().values()):
            feats = model.image_features(images)
        else:
            with torch.no_grad():
                feats = model.image_features(images)
        logits = LOGIT_SCALE * (feats.float() @ text.float().t())
    loss = objective(method, logits.float(), weights.to(device), trade)
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
    config: AdaptConfig | None = None,
    test: ImageSet | None = None,
    zeroshot: dict[str, Outputs] | None = None,
    progress: bool = True,
) -> AdaptResult:
    """Adapt `model` in place on `unlabeled` images and evaluate before and after.

    `zeroshot` may hold precomputed zero-shot `Outputs` for "unlabeled" and "test", so that a
    sweep shares one zero-shot pass between methods.
    """
    config = config or AdaptConfig()
    config.validate()
    if not len(unlabeled):
        raise UeoError("The unlabeled set is empty.")
    start = time.perf_counter()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    model.to(device)
    if config.channels_last:
        model.use_channels_last()
    bad = BadImages(config.on_bad_image)
    sets = {"unlabeled": unlabeled} if test is None else {"unlabeled": unlabeled, "test": test}

    def run(images: ImageSet, desc: str) -> Outputs:
        return infer(
            model,
            images,
            device,
            config.eval_batch_size,
            config.workers,
            config.precision,
            bad,
            desc,
            progress,
        )

    zs = dict(zeroshot or {})
    for name, images in sets.items():
        if name not in zs:
            zs[name] = run(images, f"zero-shot {name}")
    metrics = {"zeroshot": {k: metrics_of(zs[k], v) for k, v in sets.items()}}
    history: list[dict] = []
    optimizer = None if config.method == "zeroshot" else make_optimizer(model, config)
    if optimizer is not None and config.epochs > 0:
        weights = sample_weights(config.method, zs["unlabeled"].cos, unlabeled.labels)
        history = _train(model, unlabeled, weights, optimizer, config, device, bad, progress)
        final = {k: run(v, f"adapted {k}") for k, v in sets.items()}
    else:
        final = zs
    model.set_tuned(False, False)
    metrics["adapted"] = {k: metrics_of(final[k], v) for k, v in sets.items()}
    valid = final["unlabeled"].valid
    threshold = otsu_threshold(final["unlabeled"].score[valid]) if valid.any() else 0.0
    return AdaptResult(
        metrics=metrics,
        threshold=threshold,
        history=history,
        wall_time_s=time.perf_counter() - start,
        skipped_images=len(bad),
        config=asdict(config),
        outputs={"zeroshot": zs, "adapted": final},
    )


def _train(model, unlabeled, weights, optimizer, config, device, bad, progress) -> list[dict]:
    transform = (
        model.clip.train_transform() if config.augment == "default" else model.clip.test_transform()
    )
    loader = make_loader(
        unlabeled, transform, config.batch_size, True, config.workers, device, seed=config.seed
    )
    total = config.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    fp16 = config.precision == "fp16"
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    frozen_text = None
    if not model.prompt.ctx.requires_grad:
        with torch.no_grad(), autocast(device, config.precision):
            frozen_text = model.text_features()
    if config.compile:
        model.net.visual.forward = torch.compile(model.net.visual.forward)
    history = []
    for epoch in range(1, config.epochs + 1):
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=not progress)
        for x, idx, errors in bar:
            for i, msg in errors:
                bad.report(i, msg)
            if x is None:
                continue
            loss = training_step(
                model,
                x.to(device, non_blocking=True),
                weights[idx],
                optimizer,
                config.method,
                config.trade,
                config.precision,
                scaler,
                frozen_text,
            )
            if not math.isfinite(loss):
                raise UeoError(
                    f"The loss became {loss} at epoch {epoch}; lower the learning "
                    "rates or use --precision fp32/bf16."
                )
            scheduler.step()
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else None, "lr": lrs}
        history.append(record)
        lr_text = " ".join(f"lr_{k}={v:.3g}" for k, v in lrs.items())
        loss_text = f"{record['loss']:.5f}" if losses else "n/a"
        epoch_log.info("epoch %d/%d loss %s %s", epoch, config.epochs, loss_text, lr_text)
    return history
