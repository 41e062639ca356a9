"""An offline universal-shift testbed built from Fashion-MNIST and Animal-MNIST silhouettes.

Why: the paper's benchmarks (Office-Home, DomainNet, ...) and CLIP weights cannot be downloaded
here, so the demo needs a small benchmark of the same shape that builds offline and
deterministically:

- one label space of 15 distinct objects: 5 Fashion-MNIST classes (one per group of
  near-duplicates: t-shirt, trouser, dress, sneaker, bag) and the 10 Animal-MNIST classes;
  the first KNOWN = 10 are the known classes, the other 5 are unknown (OOD) objects; both
  groups mix clothes and animals so that "is it an animal" does not separate them;
- a clean source domain: the bundled tiny CLIP models (tools/pretrain.py) are pretrained on its
  train split with all 15 classes, as CLIP has seen every object;
- target domains made from held-out images (never used for pretraining, disjoint across
  domains) by fixed-seed corruptions, each with an unlabeled split and a disjoint test split.

On disk: PNG images under `<domain>/<split>/<class>/`, list files `lists/<name>.txt` with lines
`relative/path.png label` (paths relative to the testbed root), `classes.txt` and a manifest
whose settings hash tells whether an existing build can be reused.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
import importlib.util
import json
import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ueo.api import evaluate, load_model
from ueo.data import load_image_set
from ueo.errors import UeoError
from ueo.recipe import Runtime

VERSION = 1
SPLIT_SEED = 2023
FASHION_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")

# Source label of each class in its dataset (Fashion-MNIST's documented order; Animal-MNIST's
# alphabetical order, as listed in its package description and checked by eye on its images).
FASHION_LABELS = {"t-shirt": 0, "trouser": 1, "dress": 3, "sneaker": 7, "bag": 8}
ANIMAL_LABELS = {
    "bear": 0, "bird": 1, "cat": 2, "cow": 3, "dog": 4,
    "elephant": 5, "giraffe": 6, "horse": 7, "sheep": 8, "zebra": 9,
}  # fmt: skip
CLASS_NAMES = (
    "t-shirt", "bird", "trouser", "cat", "sneaker", "elephant", "giraffe", "cow", "horse", "zebra",
    "bag", "dog", "dress", "bear", "sheep",
)  # fmt: skip
KNOWN = 10

# Images per class. Fashion-MNIST gives the train split from its train set, test and held out
# from t10k. Animal-MNIST has 1000 images per class but 284 exact duplicates (188 birds), so
# it is deduplicated first; each class then gives 100 test, 300 held out and at most 600 train
# images (bird: 412), so no image content is shared between pretraining and target domains.
SOURCE_TRAIN_PER_CLASS = 600
SOURCE_TEST_PER_CLASS = 100
UNLABELED_PER_CLASS = 38
TARGET_TEST_PER_CLASS = 37

# Target domains, in the order they take held-out images: (name, corruption, parameters).
# Severities were set once from the tiny models' zero-shot accuracy on corrupted *source test*
# images (aim: known-class accuracy well above chance and well below the clean ~97-99%), never
# from target splits or adaptation results; docs/demo.md lists the measurements.
DOMAINS: tuple[tuple[str, str, dict[str, float]], ...] = (
    ("blur", "blur", {"sigma": 1.2}),
    ("noise", "noise", {"sigma": 0.2}),
    ("pixelate", "pixelate", {"size": 10}),
    ("sketch", "sketch", {}),
)


def _fashion_dir() -> Path:
    return Path(os.environ.get("UEO_FASHION_MNIST", FASHION_DEFAULT_DIR))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data, dtype=">u4", count=1)[0]
    if header != magic:
        raise UeoError(f"{path} is not an idx file (magic {header}, expected {magic}).")
    ndim = magic & 0xFF
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=2)
def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `train` or `t10k` images (N x 28 x 28 uint8) and labels."""
    folder = _fashion_dir()
    images = folder / f"{split}-images-idx3-ubyte.gz"
    labels = folder / f"{split}-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        raise UeoError(
            f"Fashion-MNIST not found in {folder} (needed by the offline testbed). Install it "
            "with `sudo apt-get install dataset-fashion-mnist`, or set UEO_FASHION_MNIST to a "
            "folder holding {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz."
        )
    return _read_idx(images, 2051), _read_idx(labels, 2049)


def _numpy_global(module: str, name: str):
    """The numpy callables an ndarray pickle needs, under their numpy 1.x or 2.x module."""
    if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
        return getattr(np, name)
    if name == "_reconstruct" and module in {"numpy.core.multiarray", "numpy._core.multiarray"}:
        try:
            multiarray = importlib.import_module("numpy._core.multiarray")
        except ImportError:
            multiarray = importlib.import_module("numpy.core.multiarray")
        return multiarray._reconstruct
    return None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and refuses every other global, so no code can run."""

    def find_class(self, module: str, name: str):
        found = _numpy_global(module, name)
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return found


def _load_array_pickle(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            array = _NumpyOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, OSError, EOFError) as exc:
        raise UeoError(f"Could not read {path} as a pickled numpy array: {exc}") from exc
    if not isinstance(array, np.ndarray):
        raise UeoError(f"{path} holds a {type(array).__name__}, not a numpy array.")
    return array


@lru_cache(maxsize=1)
def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST images (10000 x 28 x 28 uint8) and labels, from the installed package."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or spec.origin is None:
        raise UeoError(
            "The Animal-MNIST data (needed by the offline testbed) are missing: "
            "`pip install --no-deps animal-mnist`."
        )
    folder = Path(spec.origin).parent / "data" / "Animal_MNIST"
    images = _load_array_pickle(folder / "animal_data_version_3.gz")
    labels = _load_array_pickle(folder / "animal_label_version_3.gz")
    if images.shape != (10000, 28, 28) or images.dtype != np.uint8 or labels.shape != (10000,):
        raise UeoError(f"Unexpected Animal-MNIST arrays in {folder}: {images.shape} {labels.shape}")
    return images, labels.astype(np.int64)


def _unique(images: np.ndarray) -> np.ndarray:
    """Drop exact duplicate images, keeping first occurrences in their original order."""
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    return images[np.sort(first)]


@lru_cache(maxsize=1)
def _pools() -> dict[str, list[np.ndarray]]:
    """Per split (`train`, `test`, `heldout`): one image array per class, in CLASS_NAMES order.

    Each class's images are shuffled once with SPLIT_SEED and cut into fixed parts; smaller
    builds take prefixes of the same parts, so every build agrees on which image goes where.
    """
    rng = np.random.default_rng(SPLIT_SEED)
    heldout = len(DOMAINS) * (UNLABELED_PER_CLASS + TARGET_TEST_PER_CLASS)
    parts: dict[str, list[np.ndarray]] = {"train": [], "test": [], "heldout": []}
    f_train, fy_train = load_fashion_mnist("train")
    f_test, fy_test = load_fashion_mnist("t10k")
    animals, ay = load_animal_mnist()
    for name in CLASS_NAMES:
        if name in FASHION_LABELS:
            train = f_train[rng.permutation(np.flatnonzero(fy_train == FASHION_LABELS[name]))]
            rest = f_test[rng.permutation(np.flatnonzero(fy_test == FASHION_LABELS[name]))]
        else:
            both = rng.permutation(_unique(animals[ay == ANIMAL_LABELS[name]]))
            rest, train = both, both[SOURCE_TEST_PER_CLASS + heldout :]
        parts["train"].append(train[:SOURCE_TRAIN_PER_CLASS])
        parts["test"].append(rest[:SOURCE_TEST_PER_CLASS])
        parts["heldout"].append(rest[SOURCE_TEST_PER_CLASS : SOURCE_TEST_PER_CLASS + heldout])
    for per_class in parts.values():
        for images in per_class:
            images.setflags(write=False)
    return parts


def source_arrays(split: str, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Clean source-domain images (N x 28 x 28 uint8) and labels, `train` or `test` split.

    What tools/pretrain.py trains on (train) and measures zero-shot accuracy on (test); the same
    images as the testbed's source lists, in the same order.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    per_class = SOURCE_TRAIN_PER_CLASS if split == "train" else SOURCE_TEST_PER_CLASS
    return _take(_pools()[split], 0, _scaled(per_class, scale))


def _take(per_class: list[np.ndarray], start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Images start..start+count of every class (fewer where a class has fewer), with labels."""
    chunks = [images[start : start + count] for images in per_class]
    labels = np.concatenate([np.full(len(c), k, dtype=np.int64) for k, c in enumerate(chunks)])
    return np.concatenate(chunks), labels


def _scaled(count: int, scale: float) -> int:
    return max(1, round(count * scale))


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = int(np.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _convolve_rows_cols(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 2-D filter over the last two axes, zero padding (the backgrounds are black)."""
    r = len(kernel) // 2
    padded = np.pad(x, ((0, 0), (r, r), (0, 0)))
    x = sum(k * padded[:, i : i + x.shape[1], :] for i, k in enumerate(kernel))
    padded = np.pad(x, ((0, 0), (0, 0), (r, r)))
    return sum(k * padded[:, :, i : i + x.shape[2]] for i, k in enumerate(kernel))


def _pixelate(image: np.ndarray, size: int) -> np.ndarray:
    """Box-average down to size x size, then blocky nearest-neighbour upsampling."""
    small = Image.fromarray(image).resize((size, size), Image.Resampling.BOX)
    return np.asarray(small.resize(image.shape[::-1], Image.Resampling.NEAREST), dtype=np.float64)


def _sketch(x: np.ndarray) -> np.ndarray:
    """Edge map (smoothed central-difference gradient magnitude), normalised per image."""
    smooth = np.array([1.0, 2.0, 1.0]) / 4
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    gx = _convolve_rows_cols(p[:, 1:-1, 2:] - p[:, 1:-1, :-2], smooth)
    gy = _convolve_rows_cols(p[:, 2:, 1:-1] - p[:, :-2, 1:-1], smooth)
    mag = np.hypot(gx, gy)
    return mag / np.maximum(mag.max(axis=(1, 2), keepdims=True), 1e-6)


def corrupt(images: np.ndarray, kind: str, params: dict[str, float], seed: int) -> np.ndarray:
    """Apply one deterministic corruption to uint8 images (N x 28 x 28); returns uint8."""
    x = images.astype(np.float64) / 255.0
    rng = np.random.default_rng(seed)
    if kind == "blur":
        x = _convolve_rows_cols(x, _gaussian_kernel(params["sigma"]))
    elif kind == "noise":
        x = x + rng.normal(0.0, params["sigma"], size=x.shape)
    elif kind == "pixelate":
        x = np.stack([_pixelate(im, int(params["size"])) for im in images]) / 255.0
    elif kind == "sketch":
        x = _sketch(x)
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Testbed:
    """Where a built testbed lives and what its lists mean."""

    root: Path
    class_names: list[str]
    known: int
    source_train: Path
    source_test: Path
    domains: dict[str, tuple[Path, Path]]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def default_root() -> Path:
    cache = os.environ.get("UEO_CACHE")
    base = Path(cache) if cache else Path.home() / ".cache" / "ueo"
    return base / f"testbed-v{VERSION}"


def _manifest(scale: float) -> dict:
    settings = {
        "split_seed": SPLIT_SEED,
        "scale": scale,
        "class_names": list(CLASS_NAMES),
        "known": KNOWN,
        "fashion_labels": FASHION_LABELS,
        "animal_labels": ANIMAL_LABELS,
        "per_class": {
            "source_train": _scaled(SOURCE_TRAIN_PER_CLASS, scale),
            "source_test": _scaled(SOURCE_TEST_PER_CLASS, scale),
            "unlabeled": _scaled(UNLABELED_PER_CLASS, scale),
            "test": _scaled(TARGET_TEST_PER_CLASS, scale),
        },
        "domains": [{"name": n, "corruption": k, "params": p} for n, k, p in DOMAINS],
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return {"version": VERSION, "settings_sha256": digest, "settings": settings}


def _describe(root: Path) -> Testbed:
    lists = root / "lists"
    return Testbed(
        root=root,
        class_names=list(CLASS_NAMES),
        known=KNOWN,
        source_train=lists / "source_train.txt",
        source_test=lists / "source_test.txt",
        domains={
            name: (lists / f"{name}_unlabeled.txt", lists / f"{name}_test.txt")
            for name, _, _ in DOMAINS
        },
    )


def _is_complete(root: Path, manifest: dict) -> bool:
    path = root / "manifest.json"
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (
        found.get("version") == manifest["version"]
        and found.get("settings_sha256") == manifest["settings_sha256"]
    )


def _write_split(
    root: Path, folder: str, images: np.ndarray, labels: np.ndarray, list_name: str
) -> int:
    """Write PNGs under root/folder/<class>/ and the list file; returns the image count."""
    lines = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        rel = f"{folder}/{CLASS_NAMES[label]}/{i:05d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(root / rel, format="PNG")
        lines.append(f"{rel} {int(label)}\n")
    (root / "lists").mkdir(exist_ok=True)
    (root / "lists" / f"{list_name}.txt").write_text("".join(lines))
    return len(lines)


def _domain_arrays(index: int, scale: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Clean held-out images and labels of domain `index`: its unlabeled and test splits."""
    start = index * (UNLABELED_PER_CLASS + TARGET_TEST_PER_CLASS)
    heldout = _pools()["heldout"]
    return {
        "unlabeled": _take(heldout, start, _scaled(UNLABELED_PER_CLASS, scale)),
        "test": _take(heldout, start + UNLABELED_PER_CLASS, _scaled(TARGET_TEST_PER_CLASS, scale)),
    }


def _build(root: Path, scale: float, manifest: dict) -> None:
    counts = {}
    for split in ("train", "test"):
        images, labels = source_arrays(split, scale)
        counts[f"source_{split}"] = _write_split(
            root, f"source/{split}", images, labels, f"source_{split}"
        )
    for index, (name, kind, params) in enumerate(DOMAINS):
        for split_index, (split, (images, labels)) in enumerate(
            _domain_arrays(index, scale).items()
        ):
            shifted = corrupt(images, kind, params, seed=SPLIT_SEED + 100 * index + split_index)
            counts[f"{name}_{split}"] = _write_split(
                root, f"{name}/{split}", shifted, labels, f"{name}_{split}"
            )
    (root / "classes.txt").write_text("".join(f"{n}\n" for n in CLASS_NAMES))
    (root / "manifest.json").write_text(json.dumps({**manifest, "counts": counts}, indent=2))


def build_testbed(root: Path | None = None, *, scale: float = 1.0) -> Testbed:
    """Materialise the testbed under `root` (default ~/.cache/ueo/testbed-v1, or $UEO_CACHE).

    A complete build with the same settings is reused as is. Otherwise the testbed is built in
    a temporary sibling folder and moved into place, so a crash never leaves a half build that
    looks complete. `scale` < 1 makes a smaller build (tests) from prefixes of the same images.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], not {scale}: larger splits would overlap")
    root = Path(root) if root is not None else default_root()
    manifest = _manifest(scale)
    if _is_complete(root, manifest):
        return _describe(root)
    if root.exists():
        if (root / "manifest.json").is_file():
            shutil.rmtree(root)
        elif any(root.iterdir()):
            raise UeoError(
                f"{root} exists and is not a ueo testbed; choose an empty or new folder."
            )
        else:
            root.rmdir()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _build(tmp, scale, manifest)
        os.replace(tmp, root)
    except OSError:
        if not _is_complete(root, manifest):  # not a concurrent build that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _describe(root)


def read_list(root: Path, list_file: Path) -> tuple[list[str], np.ndarray]:
    """Image paths (absolute) and labels (testbed label space) of a list file."""
    images = load_image_set(list_file, list(CLASS_NAMES), root)
    return images.paths, images.labels


def load_list_images(root: Path, list_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images of a list file as a uint8 N x H x W array, with their labels."""
    paths, labels = read_list(root, list_file)
    images = np.stack([np.asarray(Image.open(p).convert("L")) for p in paths])
    return images, labels


def zero_shot_report(testbed: Testbed, model_name: str) -> list[dict]:
    """Zero-shot ACC / GACC on known classes and MCM AUROC (T = 1) per test split.

    The core's own zero-shot path (a model with the initial prompts, `infer`, the metrics of
    docs/spec.md): predictions and MCM scores use the known classes only.
    """
    known = list(testbed.class_names[: testbed.known])
    model = load_model(model_name, "bundled", known)
    splits = {"source": testbed.source_test} | {n: t for n, (_, t) in testbed.domains.items()}
    rows = []
    for domain, list_file in splits.items():
        images = load_image_set(list_file, known, testbed.root)
        m = evaluate(model, images, runtime=Runtime(device="cpu", workers=0, progress=False))
        rows.append(
            {
                "model": model_name,
                "domain": domain,
                "images": len(images),
                "acc": m["acc"],
                "gacc": m["gacc"],
                "auroc": m["auroc"],
            }
        )
    return rows


def _report(root: Path | None, models: list[str]) -> None:
    """Build (or reuse) the testbed, print its sizes and the zero-shot table of `models`."""
    testbed = build_testbed(root)
    print(f"testbed at {testbed.root}: {testbed.num_classes} classes, {testbed.known} known")
    for name, (unlabeled, test) in testbed.domains.items():
        n_unl = len(unlabeled.read_text().splitlines())
        n_test = len(test.read_text().splitlines())
        print(f"  {name}: {n_unl} unlabeled, {n_test} test images")
    if models:
        print(f"{'model':14s} {'domain':10s} {'images':>6s} {'ACC':>6s} {'GACC':>6s} {'AUROC':>6s}")
    for model_name in models:
        for row in zero_shot_report(testbed, model_name):
            print(
                f"{row['model']:14s} {row['domain']:10s} {row['images']:6d} "
                f"{100 * row['acc']:6.1f} {100 * row['gacc']:6.1f} {100 * row['auroc']:6.1f}"
            )


def main(argv: list[str] | None = None) -> int:
    """`python -m ueo.demo.testbed [--root DIR] [--zero-shot MODEL ...]`: build, then report."""
    parser = argparse.ArgumentParser(prog="python -m ueo.demo.testbed", description=main.__doc__)
    parser.add_argument("--root", type=Path, default=None, help="default: " + str(default_root()))
    parser.add_argument(
        "--zero-shot", nargs="*", default=[], metavar="MODEL", help="bundled models to evaluate"
    )
    args = parser.parse_args(argv)
    try:
        _report(args.root, args.zero_shot)
    except UeoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
