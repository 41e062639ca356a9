"""Images per second of whole UEO epochs (JPEG decoding, augmentation, model) against their parts.

Generates a folder of JPEGs of realistic sizes once (300-800 px a side), then measures, in one
process, with the training loader `ueo adapt` uses (decoded images in one store shared by the
loader's workers, augmentation keyed on seed/epoch/image, uint8 batches finished on the device):

  * loader only: a pass with an empty store (every image decoded), then a pass with the store
    filled (no decoding: what every epoch but the first does); each includes the copy to the
    device and the finishing there;
  * model only: `training_step` on one batch already on the device, repeated;
  * whole epochs: the loader feeding `training_step`; epoch 1 from an empty store (it decodes;
    in `ueo adapt` the zero-shot pass has decoded every image already), then the later epochs,
    which must decode nothing (counted through the store);

and which of loader and model bounds an epoch. On a GPU it also checks that finishing a batch
on the device gives the CPU's numbers bit for bit (`finish_exact`).

    python benchmarks/epoch_speed.py --device cuda --precision bf16 --workers 12 --json
    python benchmarks/epoch_speed.py --model ueo-tiny-rn --images 128 --batch 32 --workers 1
    python benchmarks/epoch_speed.py --model RN50 --loader-only --images 256 --workers 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ueo.bench.protocol import class_names
from ueo.cache import ImageCache, split_transform
from ueo.clip import calibrate_batchnorm, load_clip
from ueo.data import load_image_set
from ueo.loader import make_loader
from ueo.methods import get_method
from ueo.model import UeoModel, collect_params, configure_model, frozen_weights_in
from ueo.recipe import PRECISIONS, Recipe
from ueo.runtime import DTYPES, resolve_device
from ueo.training import StepGuard, training_step


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


def timed_pass(loader, epoch: int, device: torch.device, step=None) -> tuple[int, float, int]:
    """One pass of `loader` as epoch `epoch`, each batch finished on `device` and given to
    `step`: images, seconds and decodes (through the loader's store)."""
    store = loader.dataset.cache
    decodes = store.decodes
    loader.batch_sampler.set_epoch(epoch)
    _sync(device)
    start = time.perf_counter()
    n = 0
    for x, idx, _ in loader:
        x = loader.dataset.finish(x.to(device, non_blocking=True))
        if step is not None:
            step(x, idx)
        n += len(idx)
    _sync(device)
    return n, time.perf_counter() - start, store.decodes - decodes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="RN50")
    p.add_argument("--classes", type=int, default=65, choices=[65, 345])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--folder", default="runs/epoch-speed-images")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3, help="whole epochs (the first decodes)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    p.add_argument("--loader-only", action="store_true", help="no model (e.g. on a CPU)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    folder = make_jpegs(Path(args.folder), args.images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip(args.model, "none", device)
    names = class_names("officehome" if args.classes == 65 else "domainnet")
    images = load_image_set(folder, names).subset(np.arange(args.images))
    recipe = Recipe(batch_size=args.batch, precision=args.precision)

    def loader():  # the training loader of `ueo adapt`, over an empty store of its own
        store = ImageCache()
        transform = clip.train_transform()
        return make_loader(
            images, transform, args.batch, True, args.workers, device, recipe.seed, cache=store
        )

    cold = loader()
    n, seconds, cold_decodes = timed_pass(cold, 1, device)
    loader_cold = n / seconds
    n, seconds, warm_decodes = timed_pass(cold, 2, device)
    loader_rate = n / seconds
    x, _, _ = next(iter(make_loader(images, clip.test_transform(), args.batch, False, 0, device)))
    finish_exact = None
    if device.type != "cpu":
        finish_exact = torch.equal(cold.dataset.finish(x), cold.dataset.finish(x.to(device)).cpu())
    record = {
        "model": args.model,
        "classes": args.classes,
        "batch": args.batch,
        "workers": args.workers,
        "precision": args.precision,
        "images": len(images),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "loader_cold_images_per_s": round(loader_cold, 1),
        "loader_images_per_s": round(loader_rate, 1),
        "loader_decodes": [cold_decodes, warm_decodes],
        "store_mib": round(cold.dataset.cache.used / 2**20, 1),
        "finish_exact": finish_exact,
    }
    del cold  # its workers and store
    if not args.loader_only:
        record.update(whole_epochs(args, clip, names, images, recipe, device, loader, x))
        record["bound_by"] = "loader" if loader_rate < record["model_images_per_s"] else "model"
    if args.json:
        print(json.dumps(record))
    else:
        print(describe(record))
    return 0


def whole_epochs(args, clip, names, images, recipe, device, loader, x) -> dict:
    """The model-only rate, then whole epochs from an empty store."""
    model = UeoModel(clip, names).to(device)  # channels_last: chosen by load_clip
    method = get_method(recipe.method)
    configure_model(model, recipe)
    groups = collect_params(model, recipe)
    optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.0, weight_decay=0.0)
    x = split_transform(clip.test_transform()).finish(x.to(device))
    calibrate_batchnorm(clip.model, x)
    guard = StepGuard(optimizer, "stop")  # as `adapt` runs a step: verdicts read apart
    weight = torch.full((args.batch,), 0.02, device=device)

    def step(batch, idx):
        fixed = {"weight": weight[: len(idx)]}
        training_step(model, batch, fixed, optimizer, method, recipe, guard=guard)

    idx = torch.arange(len(x))
    with frozen_weights_in(model, DTYPES[recipe.precision]):
        step(x, idx)
        _sync(device)
        start = time.perf_counter()
        for _ in range(6):
            step(x, idx)
        _sync(device)
        model_rate = 6 * len(x) / (time.perf_counter() - start)
        epochs = loader()
        passes = [timed_pass(epochs, e, device, step) for e in range(1, args.epochs + 1)]
    guard.read()
    first = passes[0][0] / passes[0][1]
    later = passes[1:] or passes
    rate = sum(n for n, _, _ in later) / sum(s for _, s, _ in later)
    return {
        "model_images_per_s": round(model_rate, 1),
        "first_epoch_images_per_s": round(first, 1),
        "epoch_images_per_s": round(rate, 1),
        "decodes_per_epoch": [d for _, _, d in passes],
        "epoch_vs_model": round(rate / model_rate, 3),
    }


def describe(r: dict) -> str:
    text = (
        f"{r['model']} on {r['device']}, batch {r['batch']}, {r['workers']} workers, "
        f"{r['precision']}, {r['images']} JPEGs: loader {r['loader_images_per_s']} img/s "
        f"({r['loader_cold_images_per_s']} while decoding; decodes {r['loader_decodes']})"
    )
    if "model_images_per_s" not in r:
        return text
    return (
        f"{text}; model {r['model_images_per_s']} img/s; whole epochs "
        f"{r['epoch_images_per_s']} img/s after the first ({r['first_epoch_images_per_s']}, "
        f"decoding), {r['epoch_vs_model']:.0%} of the model's; decodes per epoch "
        f"{r['decodes_per_epoch']} -> bound by the {r['bound_by']}"
    )


if __name__ == "__main__":
    sys.exit(main())
