"""What `ueo discover` costs at scale, in its three parts, measured in one process.

1. vocabulary: the first `--names` names of the vocabulary (default WordNet's nouns) encoded by
   the model's text tower with the default context (`a photo of a`), into an empty cache folder;
   then the same call again, which reads the cache.
2. image pass: `infer(..., features=True)`, the one pass `discover` makes over the images, on
   `--pass-images` generated JPEGs (300-800 px, as benchmarks/epoch_speed.py makes them); the
   time per image, times `--images`, is the pass over that many images.
3. grouping and naming: `discover_outputs` on `--images` synthetic features (`--groups` groups in
   the model's embedding width, unit vectors) against the encoded vocabulary, every image
   rejected, the silhouette rule with the default settings.

    python benchmarks/discover_cost.py --model RN50 --pretrained none --names 80000 --images 10000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ueo.api import load_model
from ueo.data import ImageSet, load_image_set
from ueo.discovery.groups import discover_outputs
from ueo.discovery.settings import DiscoverSettings
from ueo.discovery.vocabulary import Vocabulary, encode_vocabulary, load_vocabulary
from ueo.inference import Outputs, infer
from ueo.recipe import Runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_speed import make_jpegs  # noqa: E402


def synthetic_outputs(n: int, groups: int, dim: int, classes: int, seed: int = 0) -> Outputs:
    """`n` unit features around `groups` random directions, scored as unknown (flat cosines)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(groups, dim))
    x = centers[rng.integers(0, groups, n)] + 0.8 * rng.normal(size=(n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return Outputs(np.zeros((n, classes), np.float32), np.ones(n, bool), x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="RN50")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--vocabulary", default=None, help="default: WordNet's nouns")
    p.add_argument("--names", type=int, default=80000)
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--pass-images", type=int, default=256)
    p.add_argument("--groups", type=int, default=10)
    p.add_argument("--folder", default=None, help="generated JPEGs (default: a temporary one)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)

    classes = ["cat", "dog", "horse", "car", "chair"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(args.model, args.pretrained, classes)
    vocabulary = load_vocabulary(args.vocabulary)
    vocabulary = Vocabulary(vocabulary.names[: args.names], vocabulary.source)
    record = {
        "model": args.model,
        "pretrained": args.pretrained,
        "threads": torch.get_num_threads(),
        "names": len(vocabulary),
        "images": args.images,
    }
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        names, vocab = encode_vocabulary(model, vocabulary, progress=not args.json, cache=Path(tmp))
        record["encode_s"] = time.perf_counter() - start
        start = time.perf_counter()
        encode_vocabulary(model, vocabulary, progress=False, cache=Path(tmp))
        record["cached_read_s"] = time.perf_counter() - start

        folder = Path(args.folder) if args.folder else Path(tmp) / "jpegs"
        images = load_image_set(make_jpegs(folder, args.pass_images), classes)
        runtime = Runtime(device="cpu", workers=0, progress=False)
        start = time.perf_counter()
        infer(model, images, runtime, features=True)
        per_image = (time.perf_counter() - start) / len(images)
    record["image_pass_per_image_s"] = per_image
    record["image_pass_s"] = per_image * args.images

    out = synthetic_outputs(args.images, args.groups, vocab.shape[1], len(classes))
    with torch.no_grad():
        known = model.text_features().numpy()
    start = time.perf_counter()
    listed = ImageSet([f"{i}.png" for i in range(args.images)], np.full(args.images, -2))
    found = discover_outputs(
        out, listed, 1.0, known, classes, names, vocab.numpy(), DiscoverSettings()
    )
    record["groups_s"] = time.perf_counter() - start
    record["k"] = found.k
    if args.json:
        print(json.dumps(record))
    else:
        for key, value in record.items():
            print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
