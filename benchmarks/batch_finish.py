"""Per-image to-float and normalisation against the same done once per batch, one process.

The training loader of the demo: the testbed's images (28 x 28 PNGs, decoded once and kept,
as `ImageCache` keeps them) through the tiny model's training transform. Per image: the whole
transform (RandomResizedCrop, flip, ToTensor, Normalize) on each image, then a stack, as ueo did
before `ueo.cache.split_transform`. Per batch: the PIL ops and `pil_to_tensor` per image, then
one `Split.finish` on the uint8 stack, as ueo does now. Both draw the same crops from the same
seed, and the batches are checked equal bit for bit. Passes alternate so that machine noise
hits both alike; the median pass is reported.

    python benchmarks/batch_finish.py                     # 4 domains' unlabeled images
    python benchmarks/batch_finish.py --passes 7 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from ueo.cache import split_transform
from ueo.clip import train_transform
from ueo.data import load_image_set
from ueo.demo.testbed import build_testbed
from ueo.images import open_rgb

BATCH = 64


def per_image(images, transform) -> list[torch.Tensor]:
    return [
        torch.stack([transform(img) for img in images[i : i + BATCH]])
        for i in range(0, len(images), BATCH)
    ]


def per_batch(images, split) -> list[torch.Tensor]:
    return [
        split.finish(torch.stack([split.pixels(img) for img in images[i : i + BATCH]]))
        for i in range(0, len(images), BATCH)
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--limit", type=int, default=None, help="use the first N images only")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (the demo uses 1)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    testbed = build_testbed()
    sets = [
        load_image_set(unl, testbed.class_names, testbed.root)
        for unl, _ in testbed.domains.values()
    ]
    images = [open_rgb(path) for s in sets for path in s.paths][: args.limit]
    transform = train_transform(32)
    split = split_transform(transform)
    times: dict[str, list[float]] = {"per_image": [], "per_batch": []}
    for k in range(args.passes):
        results = {}
        for name, run in (("per_image", per_image), ("per_batch", per_batch)):
            torch.manual_seed(k)
            start = time.perf_counter()
            results[name] = run(images, transform if name == "per_image" else split)
            times[name].append(time.perf_counter() - start)
        equal = all(torch.equal(a, b) for a, b in zip(*results.values(), strict=True))
        if not equal:
            print("the two paths gave different batches", file=sys.stderr)
            return 1
    median = {k: statistics.median(v) for k, v in times.items()}
    record = {
        "images": len(images),
        "threads": args.threads,
        "per_image_s": round(median["per_image"], 3),
        "per_batch_s": round(median["per_batch"], 3),
        "per_image_us": round(1e6 * median["per_image"] / len(images), 1),
        "per_batch_us": round(1e6 * median["per_batch"] / len(images), 1),
        "speedup": round(median["per_image"] / median["per_batch"], 2),
        "equal": True,
    }
    if args.json:
        print(json.dumps(record))
    else:
        print(
            f"{len(images)} images, one pass: per image {record['per_image_us']} us/image, "
            f"per batch {record['per_batch_us']} us/image, {record['speedup']}x; "
            "batches equal bit for bit"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
