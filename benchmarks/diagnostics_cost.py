"""What the label-free scores cost beside the evaluation pass they ride on.

1. The testbed, as the demo runs it: one evaluation of `adapt` (the unlabeled and test sets
   of a domain's ODA task through the bundled ueo-tiny-rn) against `label_free` on its output,
   both timed in this process, median of `--repeats`.
2. Larger sets: `label_free` on N x K cosines shaped like an Office-Home domain (4,000 x 65)
   and a DomainNet one (20,000 x 345), against the time a forward pass of RN50 over N images
   takes on this machine (measured on a batch, random weights: the rate, not the numbers).

    PYTHONPATH=src python benchmarks/diagnostics_cost.py [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from ueo.diagnostics import label_free
from ueo.inference import Outputs, infer
from ueo.recipe import Runtime

SIZES = ((4000, 65), (20000, 345))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def testbed(repeats: int) -> dict:
    from ueo.bench.plan import Suite
    from ueo.clip import load_clip
    from ueo.demo.runner import testbed_suite
    from ueo.demo.testbed import build_testbed
    from ueo.model import UeoModel

    suite: Suite = testbed_suite(build_testbed(), ["blur"])
    names, unlabeled, test = suite.scenario_sets(suite.domains[0], "ODA")
    model = UeoModel(load_clip("ueo-tiny-rn", "bundled", "cpu"), names)
    runtime = Runtime(device="cpu", workers=0, progress=False)
    outs = {}

    def evaluation():
        outs["unlabeled"] = infer(model, unlabeled, runtime)
        outs["test"] = infer(model, test, runtime)

    evaluation()  # warm: decoded images cached as in a run
    pass_s = timed(evaluation, repeats)
    zs = Outputs(outs["unlabeled"].cos + 0.01, outs["unlabeled"].valid)
    scores_s = timed(lambda: label_free(outs["unlabeled"], zs), repeats)
    return {
        "images": len(unlabeled) + len(test),
        "unlabeled": len(unlabeled),
        "evaluation_s": pass_s,
        "label_free_s": scores_s,
        "ratio": scores_s / pass_s,
    }


def larger(repeats: int) -> list[dict]:
    import open_clip

    model = open_clip.create_model("RN50", pretrained=None).visual.eval()
    x = torch.randn(32, 3, 224, 224)
    with torch.no_grad():
        model(x)
        per_image = timed(lambda: model(x), max(1, repeats // 2)) / len(x)
    rng = np.random.default_rng(0)
    rows = []
    for n, k in SIZES:
        cos = (0.2 + 0.02 * rng.standard_normal((n, k))).astype(np.float32)
        out = Outputs(cos, np.ones(n, dtype=bool))
        zs = Outputs(cos + 0.005, out.valid)
        label_free(out, zs)
        scores_s = timed(lambda out=out, zs=zs: label_free(out, zs), repeats)
        rows.append(
            {
                "n": n,
                "classes": k,
                "label_free_s": scores_s,
                "rn50_forward_s": per_image * n,
                "ratio": scores_s / (per_image * n),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-larger", action="store_true", help="the testbed only")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    record = {"threads": torch.get_num_threads(), "testbed": testbed(args.repeats)}
    if not args.skip_larger:
        record["larger"] = larger(args.repeats)
    if args.json:
        print(json.dumps(record))
        return 0
    t = record["testbed"]
    print(
        f"testbed ({t['unlabeled']} unlabeled + {t['images'] - t['unlabeled']} test images, "
        f"ueo-tiny-rn): evaluation {t['evaluation_s']:.3f} s, label-free scores "
        f"{t['label_free_s']:.3f} s ({100 * t['ratio']:.1f}%)"
    )
    for r in record.get("larger", []):
        print(
            f"{r['n']} x {r['classes']}: label-free scores {r['label_free_s']:.2f} s; an RN50 "
            f"forward pass over {r['n']} images {r['rn50_forward_s']:.0f} s here "
            f"({100 * r['ratio']:.2f}%)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
