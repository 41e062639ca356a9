"""Tiny real open_clip models and generated images for fast, real tests."""

from __future__ import annotations

import json
import os

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_CONFIGS = {
    "test-tiny-rn": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": {
            "context_length": 24,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 2,
        },
    },
    "test-tiny-vit": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 24,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 2,
        },
    },
}

CLASSES = ["red square", "green_circle", "blue stripes", "yellow cross"]
UNKNOWN = ["black noise"]


@pytest.fixture(scope="session", autouse=True)
def tiny_models(tmp_path_factory):
    """Register the test-only tiny architectures with open_clip."""
    folder = tmp_path_factory.mktemp("configs")
    for name, cfg in TINY_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return list(TINY_CONFIGS)


def draw(kind: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """A small image whose content depends on the class, with random jitter."""
    img = np.full((size, size, 3), 128, np.uint8) + rng.integers(
        0, 30, (size, size, 3), dtype=np.uint8
    )
    lo, hi = sorted(rng.integers(4, size - 4, 2)) if size > 10 else (2, size - 2)
    hi = max(hi, lo + 6)
    if kind == "red square":
        img[lo:hi, lo:hi] = (220, 30, 30)
    elif kind == "green_circle":
        yy, xx = np.mgrid[:size, :size]
        img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (hi - lo) ** 2 / 2] = (30, 200, 40)
    elif kind == "blue stripes":
        img[:, ::4] = (20, 40, 220)
    elif kind == "yellow cross":
        img[size // 2 - 2 : size // 2 + 2, :] = (230, 220, 20)
        img[:, size // 2 - 2 : size // 2 + 2] = (230, 220, 20)
    else:
        img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(img)


def make_folder(root, per_class: int = 6, seed: int = 0, classes=None) -> None:
    rng = np.random.default_rng(seed)
    for name in classes or CLASSES + UNKNOWN:
        d = root / name.replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(name, rng).save(d / f"{i:03d}.png")


def add_bad_images(folder):
    """A truncated PNG and a text file named .jpg among the images: unreadable ones."""
    good = (folder / "red_square" / "000.png").read_bytes()
    (folder / "red_square" / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "black_noise" / "text.jpg").write_text("not an image")


def untrained_run(root) -> dict:
    """A labelled folder (one image per class), a class file and a real adapter of the bundled
    ueo-tiny-rn made without training, under `root`: what tests of eval/predict inputs need."""
    from ueo.jobs import adapt_job
    from ueo.recipe import Recipe, Runtime

    data = root / "images"
    make_folder(data, per_class=1)
    classes = root / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    adapt_job(
        root / "run",
        model="ueo-tiny-rn",
        pretrained="bundled",
        data=str(data),
        classes=str(classes),
        recipe=Recipe(epochs=0),
        runtime=Runtime(device="cpu", workers=0, progress=False),
    )
    return {"data": str(data), "classes": str(classes), "adapter": root / "run"}


@pytest.fixture
def image_folder(tmp_path):
    """root/<class>/<img>.png with 4 known classes and 1 unknown class."""
    root = tmp_path / "images"
    make_folder(root)
    return root


def run_curves_grid(folder, root, methods: str):
    """`ueo bench --eval-every 1` on `folder` (an `image_folder`, 3 of its 5 classes known):
    a tiny random-weights model, 2 epochs, CDA and ODA, `methods`; returns the output folder
    `root/bench`. Learning curves at every epoch, for the tests of curves and of scores."""
    from ueo.cli import main

    classes = root / "all.txt"
    classes.write_text("red square\ngreen_circle\nblue stripes\nyellow cross\nblack noise\n")
    out = root / "bench"
    args = ["bench", "--data", str(folder), "--all-classes", str(classes), "--known", "3"]
    args += ["--model", "test-tiny-rn", "--pretrained", "none", "--epochs", "2"]
    args += ["--eval-every", "1", "--methods", methods, "--scenarios", "CDA,ODA"]
    args += ["--batch-size", "16", "--lr-prompt", "0.01", "--lr-norm", "0.01"]
    args += ["--workers", "0", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(args) == 0
    return out


@pytest.fixture
def classes_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(CLASSES) + "\n")
    return path


def calibration_batch(n: int = 32, seed: int = 1) -> torch.Tensor:
    """Normalised images that look like the generated data, for BatchNorm calibration."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision import transforms as T

    rng = np.random.default_rng(seed)
    tf = T.Compose(
        [
            T.Resize(32),
            T.CenterCrop(32),
            T.ToTensor(),
            T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
        ]
    )
    names = CLASSES + UNKNOWN
    return torch.stack([tf(draw(names[i % len(names)], rng)) for i in range(n)])


def seeded_calibrated_clip(load_clip, seed: int = 0):
    """Wrap `load_clip` so that random weights are the same on every load and BatchNorm is
    calibrated: `--pretrained none` then gives input-dependent, reproducible features and
    gradients that reach every norm layer."""

    def load(*args, **kwargs):
        from ueo.clip import calibrate_batchnorm

        torch.manual_seed(seed)
        clip = load_clip(*args, **kwargs)
        norms = [m for m in clip.model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        if norms:
            # open_clip zero-initialises each residual branch's last BatchNorm weight, which
            # would cut the gradient to the branch's other norms: use ones instead.
            with torch.no_grad():
                for m in norms:
                    if not m.weight.any():
                        m.weight.fill_(1.0)
            calibrate_batchnorm(clip.model, calibration_batch())
        return clip

    return load


@pytest.fixture
def calibrated_loads(monkeypatch):
    """Every model that ueo.api or a benchmark sweep loads (CLI included) is seeded and
    BatchNorm-calibrated."""
    import ueo.api
    import ueo.bench.sweep
    from ueo.clip import load_clip

    load = seeded_calibrated_clip(load_clip)
    monkeypatch.setattr(ueo.api, "load_clip", load)
    monkeypatch.setattr(ueo.bench.sweep, "load_clip", load)


_CALIBRATED: dict = {}


def load_calibrated(name: str = "test-tiny-rn", classes=None, seed: int = 0, **kwargs):
    """A fresh UeoModel on random weights with calibrated BatchNorm (input-dependent features).

    The network is built once per (name, seed) and deep-copied for each call: every call gets
    identical, independent weights.
    """
    import copy
    import dataclasses
    import warnings

    from ueo.clip import load_clip
    from ueo.model import UeoModel

    if (name, seed) not in _CALIBRATED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _CALIBRATED[name, seed] = seeded_calibrated_clip(load_clip, seed)(name, "none")
    base = _CALIBRATED[name, seed]
    clip = dataclasses.replace(base, model=copy.deepcopy(base.model))
    return UeoModel(clip, list(classes or CLASSES), **kwargs)


@pytest.fixture
def single_thread():
    """One intra-op thread: on a small, shared CPU the tiny models run many times faster
    (two threads wait on each other at every operation while other processes hold a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory):
    """UEO and entropy minimisation on the same generated images (bundled tiny model)."""
    from ueo.jobs import adapt_job
    from ueo.recipe import Recipe, Runtime

    root = tmp_path_factory.mktemp("diagnose")
    make_folder(root / "images")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in ("ueo", "entmin"):
            runs[method] = root / "runs" / method
            adapt_job(
                runs[method],
                model="ueo-tiny-rn",
                pretrained="bundled",
                data=str(root / "images"),
                classes=str(root / "classes.txt"),
                recipe=Recipe(method=method, epochs=3, batch_size=8, lr_prompt=0.02, lr_norm=0.02),
                runtime=Runtime(device="cpu", workers=0, progress=False, eval_every=1),
            )
    finally:
        torch.set_num_threads(threads)
    assert np.isfinite(json.loads((runs["ueo"] / "metrics.json").read_text())["threshold"])
    return root, runs
