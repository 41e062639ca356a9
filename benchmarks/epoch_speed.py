"""Images per second of a whole UEO epoch (JPEG decoding, augmentation, model) vs its parts.

Generates a folder of JPEGs of realistic sizes once, then measures, in one process:
  * loader only: decoding + RandomResizedCrop/flip/normalise through the DataLoader workers;
  * model only: `training_step` on one pre-loaded batch, repeated;
  * full epoch: the loader feeding `training_step`, as `ueo adapt` runs it.
If the full rate is close to the model-only rate, data loading is not the bottleneck.

    python benchmarks/epoch_speed.py --images 2000 --device cuda --precision bf16
    python benchmarks/epoch_speed.py --images 256 --batch 32 --workers 2 --max-steps 4   # CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ueo.adaptation import training_step
from ueo.bench.protocol import class_names
from ueo.clip import calibrate_batchnorm, load_clip
from ueo.data import load_image_set, make_loader
from ueo.methods import get_method
from ueo.model import UeoModel, collect_params, configure_model
from ueo.recipe import PRECISIONS, Recipe
from ueo.runtime import resolve_device


def make_jpegs(folder: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs of 300-800 px per side with smooth colour fields and edges (made once)."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("*.jpg"))
    if len(existing) >= n:
        return folder
    rng = np.random.default_rng(seed)
    for i in range(len(existing), n):
        w, h = (int(v) for v in rng.integers(300, 801, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        img = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = img + rng.integers(-12, 13, (h, w, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="RN50")
    p.add_argument("--classes", type=int, default=65, choices=[65, 345])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--folder", default="runs/epoch-speed-images")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    p.add_argument("--max-steps", type=int, default=None, help="cut the epoch (slow CPUs)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    folder = make_jpegs(Path(args.folder), args.images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip(args.model, "none", device)
    names = class_names("officehome" if args.classes == 65 else "domainnet")
    model = UeoModel(clip, names).to(device)  # channels_last: chosen by load_clip
    recipe = Recipe(batch_size=args.batch, precision=args.precision)
    method = get_method(recipe.method)
    configure_model(model, recipe)
    groups = collect_params(model, recipe)
    optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.0, weight_decay=0.0)
    images = load_image_set(folder, names)
    images = images.subset(np.arange(args.images))
    loader = make_loader(images, clip.train_transform(), args.batch, True, args.workers, device)
    steps = min(len(loader), args.max_steps or len(loader))
    calib = next(iter(make_loader(images, clip.test_transform(), 64, False, args.workers, device)))[
        0
    ]
    calibrate_batchnorm(clip.model, calib.to(device))

    def batches(n):
        for i, (x, idx, _) in enumerate(loader):
            if i == n:
                return
            yield x, idx

    t0 = time.perf_counter()
    n_loaded = sum(len(idx) for _, idx in batches(steps))
    loader_rate = n_loaded / (time.perf_counter() - t0)

    x = calib[: args.batch].to(device)
    w = {"weight": torch.full((len(x),), 0.02)}
    step_times = []
    for _ in range(min(steps, 6) + 1):
        _sync(device)
        t0 = time.perf_counter()
        training_step(model, x, w, optimizer, method, recipe)
        _sync(device)
        step_times.append(time.perf_counter() - t0)
    model_rate = len(x) / statistics.median(step_times[1:])

    _sync(device)
    t0 = time.perf_counter()
    n_trained = 0
    for xb, idx in batches(steps):
        training_step(
            model,
            xb.to(device, non_blocking=True),
            {"weight": torch.full((len(idx),), 0.02)},
            optimizer,
            method,
            recipe,
        )
        n_trained += len(idx)
    _sync(device)
    epoch_rate = n_trained / (time.perf_counter() - t0)
    record = {
        "model": args.model,
        "classes": args.classes,
        "batch": args.batch,
        "workers": args.workers,
        "precision": args.precision,
        "images": n_trained,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "loader_images_per_s": round(loader_rate, 1),
        "model_images_per_s": round(model_rate, 1),
        "epoch_images_per_s": round(epoch_rate, 1),
        "epoch_vs_model": round(epoch_rate / model_rate, 3),
        "bound_by": "loader" if loader_rate < model_rate else "model",
    }
    if args.json:
        print(json.dumps(record))
    else:
        bound = "data loading" if loader_rate < model_rate else "the model"
        print(
            f"{args.model} on {record['device']}, batch {args.batch}, {args.workers} workers, "
            f"{args.precision}: loader {loader_rate:.1f} img/s, model {model_rate:.1f} img/s, "
            f"whole epoch {epoch_rate:.1f} img/s ({n_trained} images) -> bound by {bound}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
