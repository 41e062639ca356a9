"""How far a run over N processes ends from the same run in one process, as the steps grow.

A run over torchrun's processes computes the loss of the whole batch from the gathered
cosines and sums the gradients once per step (docs/distributed.md): the same numbers as one
process, up to float rounding, which differs with the order of the sums and grows with the
number of steps. This measures it: the bundled `ueo-tiny-rn`, 64 generated images (4 known
classes and 1 unknown, class folders), batch 10 (7 steps per epoch), lr 1e-2 for the prompt
and the norm affines, `ueo adapt` for E epochs in 1 process and under `torchrun` in N, each
with one thread. For each (E, N): the largest difference of a tuned tensor from the
1-process run's, the largest relative one (to the tensor's largest value), and whether every
metric ueo prints (ACC, GACC, AUROC, FPR95, H of the unlabeled set) is equal, the largest
difference of one, and that of the unknown threshold.

    python benchmarks/distributed_tolerance.py                       # about 10 min here
    python benchmarks/distributed_tolerance.py --epochs 2,40 --processes 2 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

KNOWN = ["red square", "green circle", "blue stripes", "yellow cross"]
PER_CLASS = 13  # 5 folders x 13 = 65 images, less one: 64
ARGS = ["--model", "ueo-tiny-rn", "--pretrained", "bundled", "--batch-size", "10"]
ARGS += ["--lr-prompt", "1e-2", "--lr-norm", "1e-2", "--workers", "0", "--quiet"]


def make_images(root: Path) -> Path:
    """64 images of 40 px: a class's shape on noise, the unknown class plain noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate([*KNOWN, "black noise"]):
        folder = root / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS - (c == 4)):
            img = rng.integers(90, 150, (40, 40, 3), dtype=np.uint8)
            lo = int(rng.integers(4, 16))
            if c == 0:
                img[lo : lo + 16, lo : lo + 16] = (220, 30, 30)
            elif c == 1:
                yy, xx = np.mgrid[:40, :40]
                img[(yy - 20) ** 2 + (xx - 20) ** 2 < lo**2] = (30, 200, 40)
            elif c == 2:
                img[:, ::4] = (20, 40, 220)
            elif c == 3:
                img[18:22, :] = img[:, 18:22] = (230, 220, 20)
            else:
                img = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(img).save(folder / f"{i:02d}.png")
    return root


def adapt(data: Path, out: Path, epochs: int, processes: int) -> None:
    argv = ["adapt", "--data", str(data), "--classes", ",".join(KNOWN), "--out", str(out)]
    argv += [*ARGS, "--epochs", str(epochs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "ueo", *argv, "--device", "cpu"]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--standalone", f"--nproc_per_node={processes}", "-m", "ueo"]
        cmd += argv
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def compare(one: Path, many: Path) -> dict:
    from safetensors.numpy import load_file

    a, b = load_file(str(one / "adapter.safetensors")), load_file(str(many / "adapter.safetensors"))
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    relative = max(float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-12)) for k in a)
    ra, rb = (json.loads((p / "metrics.json").read_text()) for p in (one, many))
    metric = max(
        abs(ma[k] - mb[k])
        for ma, mb in ((ra["adapted"]["unlabeled"], rb["adapted"]["unlabeled"]),)
        for k in ma
        if isinstance(ma[k], float) and isinstance(mb[k], float)
    )
    return {
        "max_abs": diff,
        "max_rel": relative,
        "metrics_equal": ra["adapted"] == rb["adapted"],
        "max_metric_diff": metric,
        "threshold_diff": abs(ra["threshold"] - rb["threshold"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", default="1,2,5,10,20,40", help="comma list")
    p.add_argument("--processes", default="2,3", help="comma list of N > 1")
    p.add_argument("--json", action="store_true", help="one JSON line per measurement")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "images")
        for epochs in (int(e) for e in args.epochs.split(",")):
            one = Path(tmp) / f"e{epochs}-n1"
            adapt(data, one, epochs, 1)
            for n in (int(x) for x in args.processes.split(",")):
                many = Path(tmp) / f"e{epochs}-n{n}"
                adapt(data, many, epochs, n)
                row = {"epochs": epochs, "steps": 7 * epochs, "processes": n}
                row.update(compare(one, many))
                rows.append(row)
                print(json.dumps(row) if args.json else row, file=sys.stderr, flush=True)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(
        "| epochs | steps | processes | tuned tensors: max abs difference | max relative "
        "| metrics equal | largest metric difference | threshold difference |"
    )
    print("|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['epochs']} | {r['steps']} | {r['processes']} | {r['max_abs']:.1e} "
            f"| {r['max_rel']:.1e} | {'yes' if r['metrics_equal'] else 'no'} "
            f"| {r['max_metric_diff']:.1e} | {r['threshold_diff']:.1e} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
