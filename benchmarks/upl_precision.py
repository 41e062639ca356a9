"""Which images UPL keeps when it ranks confidences in fp16, against ueo's fp64 ranking.

UPL's scripts run CLIP in fp16 (`PREC = "fp16"`, the default set in `upl_train.py:90` and
`get_info.py:90` of tonyhuang2022/UPL; CLIP's weights stay half precision unless PREC is fp32
or amp, `trainers/upltrainer.py:302-304`), so the zero-shot logits and the softmax
confidences `select_top_k_similarity_per_class` ranks (`trainers/utils.py:89-96`) are fp16.
fp16's spacing just below 1 is 2^-11: every confidence above 1 - 2^-12 reads 1.0, and those
images tie; `np.argsort` then orders them arbitrarily. ueo ranks `softmax(100 cos)` in fp64
(`ueo.objectives.upl_select`), ties to the lowest index.

Random cosines stand in for a zero-shot model: each of N images gets a cosine of
0.2 + 0.02 z with every class (z standard normal), plus `boost x U(0, 1)` with its own class,
so a larger boost means more confident predictions. For each boost and seed the script keeps
K images per predicted class as UPL does (one `np.argsort` of the negated confidences, then
the first K of each class in that order) from the confidences in fp64, in fp32, rounded to
fp16, and computed from fp16 logits (`100 * cos` in fp16, softmax in fp32 rounded to fp16, as
a CUDA fp16 softmax returns), and counts the kept images that ueo's selection does not keep.
The fp64 column checks the emulation: it must be 0.

    python benchmarks/upl_precision.py
    python benchmarks/upl_precision.py --boosts 0.08,0.16 --seeds 3 --json
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from ueo.objectives import LOGIT_SCALE, upl_select

NEAR_ONE = 1 - 2**-12  # above this an fp16 confidence rounds to 1.0


def upl_keep(confidence: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """UPL's rule: sort all images by confidence (np.argsort of the negation, as UPL), then
    keep the first k of each predicted class in that order."""
    order = np.argsort(-confidence)
    kept = np.zeros(len(confidence), dtype=bool)
    for c in np.unique(labels):
        kept[order[labels[order] == c][:k]] = True
    return kept


def cosines(n: int, classes: int, boost: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    own = torch.randint(0, classes, (n,), generator=g)
    cos = 0.2 + 0.02 * torch.randn(n, classes, generator=g)
    cos[torch.arange(n), own] += boost * torch.rand(n, generator=g)
    return cos


def differences(cos: torch.Tensor, k: int) -> dict:
    """Kept images that ueo's fp64 selection does not keep, per precision of UPL's ranking."""
    _, ueo = upl_select(cos, k)
    ueo = ueo.numpy()
    probs = (LOGIT_SCALE * cos.double()).softmax(dim=-1)
    labels = probs.argmax(dim=-1).numpy()
    conf = probs.max(dim=-1).values
    half = (LOGIT_SCALE * cos.half()).float().softmax(dim=-1).half()
    kept = {
        "fp64": upl_keep(conf.numpy(), labels, k),
        "fp32": upl_keep(conf.float().numpy(), labels, k),
        "fp16_confidences": upl_keep(conf.half().numpy(), labels, k),
        "fp16_logits": upl_keep(
            half.max(dim=-1).values.numpy(), half.float().argmax(dim=-1).numpy(), k
        ),
    }
    return {
        "kept": int(ueo.sum()),
        "near_one": int((conf > NEAR_ONE).sum()),
        "median_confidence": float(conf.median()),
        **{name: int((sel & ~ueo).sum()) for name, sel in kept.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=30)
    parser.add_argument("--k", type=int, default=16, help="images kept per class (UPL's K)")
    parser.add_argument("--boosts", default="0.08,0.12,0.16,0.2")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON line per boost")
    args = parser.parse_args(argv)
    columns = ("fp64", "fp32", "fp16_confidences", "fp16_logits")
    if not args.json:
        print(f"{args.images} images, {args.classes} classes, K = {args.k}, {args.seeds} seeds")
        print(
            f"{'boost':>6} {'median conf':>11} {'conf > 1-2^-12':>14} {'kept':>5}  "
            + "  ".join(f"{c:>16}" for c in columns)
        )
    for boost in (float(b) for b in args.boosts.split(",")):
        runs = [
            differences(cosines(args.images, args.classes, boost, seed), args.k)
            for seed in range(args.seeds)
        ]
        record = {
            "boost": boost,
            "images": args.images,
            "classes": args.classes,
            "k": args.k,
            "seeds": args.seeds,
            "kept": [r["kept"] for r in runs],
            "near_one": [r["near_one"] for r in runs],
            "median_confidence": float(np.median([r["median_confidence"] for r in runs])),
            **{c: [r[c] for r in runs] for c in columns},
        }
        if args.json:
            print(json.dumps(record))
        else:
            near = np.mean(record["near_one"])
            cells = "  ".join(
                f"{np.mean(record[c]):>8.1f} ({min(record[c])}-{max(record[c])})".rjust(16)
                for c in columns
            )
            print(
                f"{boost:>6} {record['median_confidence']:>11.3f} {near:>14.0f} "
                f"{np.mean(record['kept']):>5.0f}  {cells}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
