"""Reproducible CLIP-style pretraining of the bundled tiny models on the testbed's source domain.

`python tools/pretrain.py --model ueo-tiny-rn` trains from scratch on the clean source
train split (all 15 classes, known and unknown, as CLIP has seen every object) and writes,
into `--out` (default runs/pretrain), `<model>.safetensors` plus `<model>.json` (settings,
versions, sha256, training time and the zero-shot accuracy of the saved weights on the source
test split). The shipped weights in src/ueo/demo/assets are replaced only when `--out` names
that folder: a rerun on another machine gives other bytes (docs/demo.md).

Objective: symmetric InfoNCE between images and class-level captions. Each step draws one
caption per class from TEMPLATES ("a photo of a {}.", "a picture of a {}.", ...), so the
text side of a batch is the C class captions, not one caption per image. Image-to-text is then
cross-entropy over the C captions, and text-to-image gives each caption a soft target spread
uniformly over the batch images of its class. Two images of one class are therefore never
pushed apart as false negatives, which per-image captions would do.

The logit scale is fixed at 100 (not learned): UEO computes `100 * cos` and MCM uses raw
cosines (T = 1), so the similarities must live in CLIP's regime. Augmentation is light (random
zoom/shift and horizontal flip) and purely geometric, so the testbed's target corruptions
(blur, noise, ...) stay unseen shifts. Everything is seeded and runs on the CPU with a fixed
data order, so a rerun with the same seed reproduces the weights up to floating-point noise.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from ueo.clip import test_transform
from ueo.demo.testbed import CLASS_NAMES, KNOWN, source_arrays
from ueo.demo.zoo import BUNDLED, create_tiny_model, load_weights, save_weights, sha256_file
from ueo.errors import UeoError
from ueo.files import write_json
from ueo.names import spoken_name
from ueo.objectives import LOGIT_SCALE

DEFAULT_OUT = Path("runs/pretrain")  # not the package's assets: shipped weights stay as shipped
TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a drawing of a {}.",
    "a black and white photo of a {}.",
    "a small {}.",
)
DEFAULTS = {
    "ueo-tiny-rn": {"epochs": 20, "lr": 2e-3},
    "ueo-tiny-vit": {"epochs": 30, "lr": 1e-3},
}


def image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def preprocess(images: np.ndarray, size: int) -> torch.Tensor:
    """Model input for uint8 N x H x W grayscale arrays: ueo's test transform on RGB copies."""
    transform = test_transform(size)
    return torch.stack([transform(Image.fromarray(im).convert("RGB")) for im in images])


def prompts(class_names, template: str) -> list[str]:
    return [template.format(spoken_name(name)) for name in class_names]


@torch.no_grad()
def zero_shot_cosines(model: torch.nn.Module, model_name: str, images: np.ndarray) -> torch.Tensor:
    """Cosines (images x classes) with one "a photo of a {}." prompt per class; model in eval."""
    model.eval()
    tokens = open_clip.get_tokenizer(model_name)(prompts(CLASS_NAMES, TEMPLATES[0]))
    text = F.normalize(model.encode_text(tokens), dim=-1)
    size = image_size(model)
    feats = [
        F.normalize(model.encode_image(preprocess(images[i : i + 250], size)), dim=-1)
        for i in range(0, len(images), 250)
    ]
    return torch.cat(feats) @ text.t()


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light geometric augmentation: random zoom and shift, horizontal flip.

    A random square of side 24-32 px is cut from the image padded by 2 px and resized back to
    28 px (zoom 0.875-1.17, shift up to 4 px), then flipped with probability 0.5.
    """
    out = np.empty_like(images)
    h, w = images.shape[1:]
    pad = 2
    sides = rng.uniform(h - 4, h + 2 * pad, size=len(images))
    corners = rng.uniform(0, 1, size=(len(images), 2))
    flips = rng.random(len(images)) < 0.5
    for i, image in enumerate(images):
        padded = Image.fromarray(np.pad(image, pad))
        s = sides[i]
        x0, y0 = corners[i] * (h + 2 * pad - s)
        crop = padded.resize((w, h), Image.Resampling.BICUBIC, box=(x0, y0, x0 + s, y0 + s))
        out[i] = np.asarray(crop)[:, ::-1] if flips[i] else np.asarray(crop)
    return out


def contrastive_loss(
    image_feats: torch.Tensor, text_feats: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with class-level captions (see the module docstring)."""
    logits = LOGIT_SCALE * image_feats @ text_feats.t()  # batch x classes
    image_to_text = F.cross_entropy(logits, labels)
    onehot = F.one_hot(labels, text_feats.shape[0]).float().t()  # classes x batch
    present = onehot.sum(dim=1) > 0
    targets = onehot[present] / onehot[present].sum(dim=1, keepdim=True)
    text_to_image = -(targets * F.log_softmax(logits.t()[present], dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def _lr_factor(warmup: int, total: int, step: int) -> float:
    """Linear warmup, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """CLIP's rule: no weight decay on gains, biases and other 1-d parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def pretrain(
    model_name: str,
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    log_every: int = 0,
) -> torch.nn.Module:
    """Train `model_name` from scratch on the source train split; returns it in eval mode."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    model = create_tiny_model(model_name)
    model.logit_scale.data.fill_(math.log(LOGIT_SCALE))
    model.logit_scale.requires_grad_(False)
    size = image_size(model)
    tokenizer = open_clip.get_tokenizer(model_name)
    tokens = torch.stack([tokenizer(prompts(CLASS_NAMES, t)) for t in TEMPLATES])  # T x C x L
    images, labels = source_arrays("train")
    labels = torch.from_numpy(labels)
    steps_per_epoch = len(images) // batch_size
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(_lr_factor, warmup_steps, total)
    )
    model.train()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            pixels = preprocess(augment(images[idx.numpy()], rng), size)
            choice = torch.randint(len(TEMPLATES), (len(CLASS_NAMES),), generator=generator)
            text = tokens[choice, torch.arange(len(CLASS_NAMES))]
            image_feats = F.normalize(model.encode_image(pixels), dim=-1)
            text_feats = F.normalize(model.encode_text(text), dim=-1)
            loss = contrastive_loss(image_feats, text_feats, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if log_every and step % log_every == 0:
                print(f"epoch {epoch + 1}/{epochs} step {step}/{total} loss {loss.item():.4f}")
    return model.eval()


def source_zero_shot(model: torch.nn.Module, model_name: str) -> dict[str, float]:
    """Zero-shot accuracy on the source test split: over all classes, and known-only."""
    images, labels = source_arrays("test")
    cos = zero_shot_cosines(model, model_name, images)
    labels = torch.from_numpy(labels)
    known = labels < KNOWN
    known_pred = cos[known, :KNOWN].argmax(dim=1)
    return {
        "acc_all_classes": (cos.argmax(dim=1) == labels).float().mean().item(),
        "acc_known_classes": (known_pred == labels[known]).float().mean().item(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python tools/pretrain.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", required=True, choices=BUNDLED)
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder for <model>.safetensors and .json (default {DEFAULT_OUT}; "
        "src/ueo/demo/assets replaces the shipped weights)",
    )
    parser.add_argument("--seed", type=int, default=2023)
    parser.add_argument("--epochs", type=int, help="default: per model, see DEFAULTS")
    parser.add_argument("--lr", type=float, help="peak AdamW learning rate; default per model")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--log-every", type=int, default=50, help="steps between loss lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Pretrain one bundled model and write its checkpoint and recipe file."""
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except UeoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _command(settings: dict) -> str:
    """The command line that reproduces `settings`."""
    flags = ("model", "seed", "epochs", "lr", "batch_size", "weight_decay", "warmup_steps")
    options = " ".join(f"--{k.replace('_', '-')} {settings[k]}" for k in flags)
    return f"python tools/pretrain.py {options} --threads {settings['threads']}"


def _run(args: argparse.Namespace) -> None:
    """Train, save the checkpoint, measure it, then write the recipe file next to it."""
    settings = {
        "model": args.model,
        "seed": args.seed,
        "epochs": args.epochs or DEFAULTS[args.model]["epochs"],
        "lr": args.lr or DEFAULTS[args.model]["lr"],
        "batch_size": args.batch_size,
        "weight_decay": args.weight_decay,
        "warmup_steps": args.warmup_steps,
        "optimizer": "AdamW(betas=(0.9, 0.98)), linear warmup then cosine to 0",
        "logit_scale": LOGIT_SCALE,
        "templates": list(TEMPLATES),
        "augmentation": "random crop of side 24-32 px from the 2 px padded image, resized "
        "to 28 px (zoom 0.875-1.17, shift <= 4 px); horizontal flip",
        "data": "ueo.demo.testbed.source_arrays('train'): "
        f"{len(source_arrays('train')[1])} images, {len(CLASS_NAMES)} classes, <= 600 per class",
        "threads": args.threads,
    }
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals slowed some CPU steps 5x; losses are unchanged
    start = time.perf_counter()
    model = pretrain(
        args.model,
        seed=settings["seed"],
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        weight_decay=settings["weight_decay"],
        warmup_steps=settings["warmup_steps"],
        log_every=args.log_every,
    )
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / f"{args.model}.safetensors"
    save_weights(model, weights)
    saved = load_weights(args.model, weights)
    zero_shot = source_zero_shot(saved, args.model)
    recipe = {
        "settings": settings,
        "command": _command(settings),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "numpy": np.__version__,
        },
        "config": open_clip.get_model_config(args.model),
        "parameters": sum(p.numel() for p in saved.parameters()),
        "file_bytes": weights.stat().st_size,
        "sha256": sha256_file(weights),
        "train_seconds": round(seconds, 1),
        "zero_shot_source_test": zero_shot,
    }
    write_json(weights.with_suffix(".json"), recipe)
    summary = ("file_bytes", "train_seconds", "zero_shot_source_test")
    print(json.dumps({k: recipe[k] for k in summary}))


if __name__ == "__main__":
    sys.exit(main())
