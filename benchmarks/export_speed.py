"""`ueo export` against `ueo predict`: the same answers, and images/s on this CPU.

For each case an adapter is exported (`ueo.export.export_adapter`), then `ueo predict` and the
ONNX runner (`python -m ueo.deploy`) label the same images, each in a fresh process with the
same number of threads (torch's intra-op threads, `OMP_NUM_THREADS`; onnxruntime's,
`--threads`); their CSV files are compared row by row, and plain open_clip (the exported
weights and head, `open_clip/`) is compared with ueo's own cosines.

Cases:
- `--demo RUN_DIR` (a `ueo demo` folder, tiny RN or tiny ViT): its UEO runs in ODA and OPDA of
  every domain, each on its domain's test list (the testbed's lists, 555 images);
- `--own N`: a labelled folder made here (known and unknown classes, N images of varied
  sizes, aspect ratios and modes: RGB and grayscale PNG, JPEG, transparent PNG, palette; two
  unreadable files) with an adapter of each `--models` model;
- `--models`: `ueo-tiny-rn`, `ueo-tiny-vit` (bundled weights, adapted here for one epoch), or
  any open_clip architecture (`RN50`, `ViT-B-16`) with seeded random weights (BatchNorm
  calibrated) whose norm affines and prompt are perturbed as adaptation would.

Per case: images, rows, unreadable images skipped by each; `pred` and `is_unknown` that differ
(an image whose MCM lies within 1e-6 of the threshold is counted apart); the largest
|probability| and |MCM| differences; plain open_clip's largest |cosine| difference; the predict
pass's images/s of each (the command's own timing of that phase) and each command's wall time
in a fresh process (imports and model loading included).

    python benchmarks/export_speed.py --demo runs/demo --demo runs/demo-vit --threads 2
    python benchmarks/export_speed.py --models ueo-tiny-rn,ueo-tiny-vit,RN50 --own 256
    python benchmarks/export_speed.py --models ViT-B-16 --own 64 --no-speed
    python benchmarks/export_speed.py --demo runs/demo --precision fp16 --no-speed
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

NEAR_THRESHOLD = 1e-6  # an image this close to the threshold may be flagged either way
CLASSES = ("red square", "green circle", "blue stripes", "yellow cross", "purple ring")
UNKNOWN = ("grey noise", "orange blob")
TINY = ("ueo-tiny-rn", "ueo-tiny-vit")
BAD_FILES = ("truncated.png", "text.jpg")  # unreadable files among the generated images


# --- the images ---------------------------------------------------------------------------------


def make_images(root: Path, n: int, seed: int = 0) -> Path:
    """A labelled folder of `n` images of varied size and mode (and two unreadable files)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    names = CLASSES + UNKNOWN
    colours = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 220, 40), (150, 40, 170)]
    colours += [(128, 128, 128), (250, 140, 20)]
    for i in range(n):
        k = i % len(names)
        w, h = (int(v) for v in rng.integers(24, 400, 2))
        img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 80, 3)))
        draw = ImageDraw.Draw(img)
        box = sorted(rng.integers(0, w, 2)), sorted(rng.integers(0, h, 2))
        draw.rectangle([box[0][0], box[1][0], box[0][1] + 2, box[1][1] + 2], fill=colours[k])
        noise = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
        folder = root / names[k].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        kind = i % 5
        if kind == 0:
            img.save(folder / f"{i:05d}.jpg", quality=85)
        elif kind == 1:
            img.convert("L").save(folder / f"{i:05d}.png")
        elif kind == 2:
            rgba = img.convert("RGBA")
            rgba.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
            rgba.save(folder / f"{i:05d}.png")
        elif kind == 3:
            img.convert("P").save(folder / f"{i:05d}.png")
        else:
            img.save(folder / f"{i:05d}.png")
    (root / "red_square" / BAD_FILES[0]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (root / "grey_noise" / BAD_FILES[1]).write_text("not an image")
    return root


# --- the adapters -------------------------------------------------------------------------------


def tiny_adapter(name: str, images: Path, out: Path) -> Path:
    """One epoch of UEO on `images` with the bundled weights: tuned affines and prompt."""
    from ueo.jobs import adapt_job
    from ueo.recipe import Recipe, Runtime

    out.parent.mkdir(parents=True, exist_ok=True)
    classes = out.parent / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    adapt_job(
        out,
        model=name,
        pretrained="bundled",
        data=str(images),
        classes=str(classes),
        recipe=Recipe(epochs=1, batch_size=16, lr_prompt=0.01, lr_norm=0.01),
        runtime=Runtime(device="cpu", progress=False),
        overwrite=True,
    )
    return out


def random_adapter(name: str, images: Path, out: Path, seed: int = 0) -> Path:
    """Seeded random weights of `name` (BatchNorm calibrated on `images`, saved as a file the
    adapter names), with its norm affines and prompt context perturbed, and the median MCM of
    `images` as its threshold (half of them flagged unknown)."""
    import torch
    from safetensors.torch import save_file

    from ueo.api import load_model
    from ueo.clip import calibrate_batchnorm, load_clip
    from ueo.data import load_image_set
    from ueo.images import open_rgb
    from ueo.inference import infer
    from ueo.recipe import Recipe, Runtime
    from ueo.runs import THRESHOLD_RULE, save_adapter

    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{name}-random.safetensors"
    torch.manual_seed(seed)
    clip = load_clip(name, "none", "cpu", channels_last=False)
    image_set = load_image_set(str(images), list(CLASSES))
    tf = clip.test_transform()
    readable = [p for p in image_set.paths if not p.endswith(BAD_FILES)]
    batch = torch.stack([tf(open_rgb(p)) for p in readable[:32]])
    calibrate_batchnorm(clip.model, batch)
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(weights))
    model = load_model(name, str(weights), list(CLASSES))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, p in model.norm_parameters().items():
            scale = 0.05 if key.endswith("weight") else 0.02
            p.add_(scale * torch.randn(p.shape, generator=gen) * (p.abs().mean() + 0.1))
        model.prompt.ctx.add_(0.02 * torch.randn(model.prompt.ctx.shape, generator=gen))
    runtime = Runtime(device="cpu", workers=0, progress=False)
    scored = infer(model, image_set, runtime)
    threshold = float(np.median(scored.score[scored.valid]))
    recipe = Recipe()
    save_adapter(
        out / "adapter.safetensors",
        model.adapter_state(recipe.norm_layers),
        {
            "ueo_version": "benchmark",
            "model": model.clip.model_name,
            "pretrained": str(weights.resolve()),
            "class_names": list(CLASSES),
            "recipe": asdict(recipe),
            "threshold": threshold,
            "threshold_rule": f"median MCM of the benchmark's images (not {THRESHOLD_RULE})",
        },
    )
    return out


# --- the comparisons ----------------------------------------------------------------------------


def compare_csv(ours: Path, theirs: Path, threshold: float) -> dict:
    """Row-by-row differences of two `ueo predict` CSV files of the same images."""
    with open(ours, newline="") as f:
        a = list(csv.DictReader(f))
    with open(theirs, newline="") as f:
        b = list(csv.DictReader(f))
    if [r["path"] for r in a] != [r["path"] for r in b]:
        raise SystemExit(f"{ours} and {theirs} do not list the same images in the same order")
    near = [abs(float(r["mcm"]) - threshold) <= NEAR_THRESHOLD for r in b]
    pred = [x["pred"] != y["pred"] for x, y in zip(a, b, strict=True)]
    unknown = [x["is_unknown"] != y["is_unknown"] for x, y in zip(a, b, strict=True)]
    prob = [abs(float(x["prob"]) - float(y["prob"])) for x, y in zip(a, b, strict=True)]
    mcm = [abs(float(x["mcm"]) - float(y["mcm"])) for x, y in zip(a, b, strict=True)]
    return {
        "rows": len(a),
        "pred_differ": sum(p and not c for p, c in zip(pred, near, strict=True)),
        "unknown_differ": sum(u and not c for u, c in zip(unknown, near, strict=True)),
        "near_threshold_differ": sum(
            (p or u) and c for p, u, c in zip(pred, unknown, near, strict=True)
        ),
        "max_abs_prob": max(prob),
        "max_abs_mcm": max(mcm),
    }


def open_clip_cosines(export: Path, paths: list[str]) -> np.ndarray:
    """Plain open_clip with the exported config, weights and head: `add_model_config`, then
    `create_model_and_transforms(name, pretrained=file)`, the images read by ueo's reader."""
    import open_clip
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from ueo.images import open_rgb

    record = json.loads((export / "export.json").read_text())
    name = record["model"]
    open_clip.add_model_config(export / "open_clip" / f"{name}.json")
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=str(export / "open_clip" / "open_clip_model.safetensors")
    )
    model.eval()
    head = load_file(str(export / "open_clip" / "head.safetensors"))["text_features"]
    rows = []
    with torch.no_grad():
        for start in range(0, len(paths), 64):
            x = torch.stack([preprocess(open_rgb(p)) for p in paths[start : start + 64]])
            rows.append((F.normalize(model.encode_image(x), dim=-1) @ head.T).numpy())
    return np.concatenate(rows)


def ueo_cosines(adapter: Path, paths: list[str]) -> np.ndarray:
    from ueo.api import load_adapted
    from ueo.data import ImageSet
    from ueo.inference import infer
    from ueo.recipe import Runtime

    model, _ = load_adapted(adapter, "cpu")
    images = ImageSet(list(paths), np.full(len(paths), -2))
    return infer(model, images, Runtime(device="cpu", workers=0, progress=False)).cos


# --- one case ------------------------------------------------------------------------------------


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
    return time.perf_counter() - start


def run_case(
    label: str,
    adapter: Path,
    data: str,
    root: str | None,
    work: Path,
    threads: int,
    speed: bool,
    precision: str = "fp32",
) -> dict:
    """Export, then both commands on the same images; their answers and their speed."""
    from ueo.data import load_image_set
    from ueo.deploy import load_exported, predict_files
    from ueo.export import export_adapter
    from ueo.jobs import predict_job
    from ueo.recipe import Runtime

    work.mkdir(parents=True, exist_ok=True)
    export = work / "export"
    start = time.perf_counter()
    record = export_adapter(adapter, export, overwrite=True, precision=precision)
    export_s = time.perf_counter() - start
    threshold = record["threshold"]
    ours, theirs = work / "deploy.csv", work / "predict.csv"
    root_args = ["--data-root", root] if root else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    predict_argv = [sys.executable, "-m", "ueo.cli", "predict", "--adapter", str(adapter)]
    predict_argv += ["--data", data, "--out", str(theirs), "--quiet", "--device", "cpu"]
    deploy_argv = [sys.executable, "-m", "ueo.deploy", str(export), data, "--out", str(ours)]
    deploy_argv += ["--quiet", "--threads", str(threads)]
    result = {"case": label, "model": record["model"], "precision": precision}
    result["export_s"] = round(export_s, 2)
    result["self_check"] = record["self_check"]
    wall = {"predict": timed(predict_argv + root_args, env)}
    wall["deploy"] = timed(deploy_argv + root_args, env)
    result.update(compare_csv(ours, theirs, threshold))
    images = load_image_set(data, record["class_names"], root)
    result["images"] = len(images)
    with open(ours, newline="") as f:
        paths = [r["path"] for r in csv.DictReader(f)]
    cos = ueo_cosines(adapter, paths)
    result["open_clip_max_abs_cos"] = float(np.abs(open_clip_cosines(export, paths) - cos).max())
    if speed:
        import torch

        torch.set_num_threads(threads)
        runtime = Runtime(device="cpu", progress=False)
        summary = predict_job(str(adapter), data, work / "again.csv", runtime=runtime,
                              data_root=root)  # fmt: skip
        model = load_exported(export, threads=threads)
        start = time.perf_counter()
        predict_files(model, images)
        deploy_s = time.perf_counter() - start
        result["predict_pass_img_s"] = round(summary["images"] / summary["timings_s"]["predict"])
        result["deploy_pass_img_s"] = round(len(images) / deploy_s)
        result["predict_wall_s"] = round(wall["predict"], 2)
        result["deploy_wall_s"] = round(wall["deploy"], 2)
    return result


def demo_cases(demo: Path) -> list[tuple[str, Path, str, str]]:
    """The UEO runs of ODA and OPDA in every domain of a `ueo demo` folder, with the test list
    of their domain."""
    from ueo.demo.testbed import default_root

    testbed, cases = default_root(), []
    for run in sorted(demo.glob("runs/*/O*DA/ueo/seed*")):
        domain = run.parts[-4]
        lists = testbed / "lists" / f"{domain}_test.txt"
        cases.append((f"{demo.name}/{domain}/{run.parts[-3]}", run, str(lists), str(testbed)))
    if not cases:
        raise SystemExit(f"No UEO runs of ODA or OPDA under {demo}/runs.")
    return cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", action="append", default=[], help="a `ueo demo` output folder")
    p.add_argument("--models", default="", help="comma list: ueo-tiny-rn, ueo-tiny-vit, RN50...")
    p.add_argument("--own", type=int, default=256, help="images of the generated folder")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of both")
    p.add_argument("--no-speed", action="store_true", help="answers only, no timed passes")
    p.add_argument("--precision", default="fp32", help="of the export: fp32 or fp16")
    p.add_argument("--work", default=None, help="where to write (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="one JSON line per case")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="export-speed-") as tmp:
        work = Path(args.work or tmp)
        cases = [c for d in args.demo for c in demo_cases(Path(d))]
        models = [m for m in args.models.split(",") if m]
        if models:
            images = make_images(work / "images", args.own)
            for name in models:
                make = tiny_adapter if name in TINY else random_adapter
                adapter = make(name, images, work / "adapters" / name)
                cases.append((f"own/{name}", adapter, str(images), None))
        rows = []
        for label, adapter, data, root in cases:
            where = work / "cases" / label
            speed = not args.no_speed
            row = run_case(label, adapter, data, root, where, args.threads, speed, args.precision)
            rows.append(row)
            print(json.dumps(row) if args.json else _line(row), flush=True)
    return 0


def _line(row: dict) -> str:
    speed = ""
    if "deploy_pass_img_s" in row:
        speed = (
            f"  img/s predict {row['predict_pass_img_s']} deploy {row['deploy_pass_img_s']}"
            f"  wall predict {row['predict_wall_s']} s deploy {row['deploy_wall_s']} s"
        )
    return (
        f"{row['case']} ({row['precision']}): {row['rows']}/{row['images']} rows, "
        f"pred differ {row['pred_differ']}, "
        f"unknown differ {row['unknown_differ']} (near threshold {row['near_threshold_differ']}), "
        f"|prob| {row['max_abs_prob']:.2g}, |mcm| {row['max_abs_mcm']:.2g}, "
        f"open_clip |cos| {row['open_clip_max_abs_cos']:.2g}{speed}"
    )


if __name__ == "__main__":
    sys.exit(main())
