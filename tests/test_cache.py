"""Decode once: cached pixels and decoded images give the very tensors decoding gives."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, UNKNOWN, load_calibrated
from PIL import Image
from torchvision import transforms as T

import ueo.images
from ueo import clip
from ueo.adaptation import adapt
from ueo.bench.plan import Sweep
from ueo.bench.suites import folder_suite
from ueo.bench.sweep import run_sweep
from ueo.cache import ImageCache, split_transform
from ueo.data import ImageSet, load_image_set
from ueo.loader import ImageDataset, collate, make_loader
from ueo.names import UNLABELED
from ueo.recipe import Recipe, Runtime

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def decodes(monkeypatch):
    """Counts every file ueo decodes, by path."""
    counts: dict[str, int] = {}
    real = ueo.images.open_rgb

    def counting(path):
        counts[path] = counts.get(path, 0) + 1
        return real(path)

    monkeypatch.setattr(ueo.images, "open_rgb", counting)
    return counts


@pytest.fixture
def photos(tmp_path):
    """Odd-sized RGB, palette-with-transparency and grayscale files: resizing matters."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (size, mode) in enumerate([((45, 30), "RGB"), ((20, 52), "P"), ((33, 33), "L")]):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(pixels).convert(mode)
        if mode == "P":
            img.info["transparency"] = 3
        path = tmp_path / f"{i}.png"
        img.save(path)
        paths.append(str(path))
    return paths


def through(cache: ImageCache, path: str, transform) -> torch.Tensor:
    """One image as a loader gets it: the dataset's item, batched, finished by the dataset."""
    dataset = ImageDataset(ImageSet([path], np.array([UNLABELED])), transform, cache)
    return dataset.finish(collate([dataset[0]])[0])[0]


def test_cached_test_pixels_normalise_to_the_transform_output(photos, decodes):
    transform = clip.test_transform(32)
    cache = ImageCache()
    for path in photos:
        expected = transform(ueo.images.open_rgb(path))
        first, again = through(cache, path, transform), through(cache, path, transform)
        assert torch.equal(first, expected) and torch.equal(again, expected)
        assert again.dtype == expected.dtype and again.shape == expected.shape
    assert all(n == 2 for n in decodes.values())  # once by the check above, once by the cache
    assert cache.decodes == len(photos)


def test_training_draws_see_the_same_image(photos):
    transform = clip.train_transform(32)
    cache = ImageCache()
    through(cache, photos[0], transform)  # fills the cache
    torch.manual_seed(5)
    cached = [through(cache, p, transform) for p in photos for _ in range(3)]
    torch.manual_seed(5)
    decoded = [transform(ueo.images.open_rgb(p)) for p in photos for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(cached, decoded, strict=True))
    assert not torch.equal(cached[0], cached[1])  # the crops really are random
    assert cache.decodes == len(photos)


def test_budget_bounds_the_cache(photos, decodes):
    transform = clip.test_transform(32)
    nothing = ImageCache(budget=0)
    for _ in range(2):
        for path in photos:
            through(nothing, path, transform)
    assert len(nothing) == 0 and nothing.decodes == 2 * len(photos)
    one = ImageCache(budget=45 * 30 * 3)  # the first decoded image fits, nothing else
    for _ in range(2):
        for path in photos:
            through(one, path, transform)
    assert len(one) == 1 and one.used == 45 * 30 * 3
    assert one.decodes == 1 + 2 * (len(photos) - 1)


def test_only_pil_chains_before_to_tensor_are_split():
    assert split_transform(clip.test_transform(32)).deterministic
    assert not split_transform(clip.train_transform(32)).deterministic
    assert split_transform(lambda img: img) is None
    with_jitter = T.Compose([T.ColorJitter(0.5), T.ToTensor()])  # not a listed PIL op
    assert split_transform(with_jitter) is None
    two_tails = T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3), T.RandomErasing()])
    assert split_transform(two_tails) is None


@pytest.mark.parametrize("make", [clip.train_transform, clip.test_transform])
def test_batches_finished_at_once_equal_the_per_image_transform(photos, make):
    """ToTensor's scaling and Normalize moved to the batch change no bit. Asked by plain index
    (no epoch), the random crops are drawn from the global generator, in order."""
    transform = make(32)
    images = load_image_set(str(Path(photos[0]).parent), ["x"])
    torch.manual_seed(3)
    loader = make_loader(images, transform, 2, False, 0, torch.device("cpu"))
    batches = [x for _ in range(2) for x, _, _ in loader]
    torch.manual_seed(3)
    singles = [transform(ueo.images.open_rgb(p)) for _ in range(2) for p in images.paths]
    assert all(b.dtype == torch.uint8 for b in batches)
    finished = [loader.dataset.finish(b) for b in batches]
    assert all(b.dtype == torch.float32 for b in finished)
    assert torch.equal(torch.cat(finished), torch.stack(singles))
    assert ImageDataset(images, transform)[0][0].dtype == torch.uint8


def test_adapting_with_the_cache_changes_no_number(image_folder):
    images = load_image_set(image_folder, CLASSES)
    recipe = Recipe(method="ueo", epochs=3, batch_size=8, lr_prompt=1e-2, lr_norm=1e-2)
    runtime = Runtime(device="cpu", workers=0, progress=False)
    runs = []
    for cache in (ImageCache(budget=0), ImageCache()):
        model = load_calibrated()
        result = adapt(model, images, recipe, runtime, test=images, cache=cache)
        tuned = {**model.norm_parameters(recipe.norm_layers), "ctx": model.prompt.ctx}
        runs.append((result, tuned, cache.decodes))
    (plain, plain_tuned, plain_decodes), (cached, cached_tuned, cached_decodes) = runs
    assert plain.metrics == cached.metrics and plain.threshold == cached.threshold
    for phase in ("zeroshot", "adapted"):
        for name in ("unlabeled", "test"):
            a, b = plain.outputs[phase][name].cos, cached.outputs[phase][name].cos
            assert np.array_equal(a, b)
    fresh = load_calibrated()
    start = {**fresh.norm_parameters(recipe.norm_layers), "ctx": fresh.prompt.ctx}
    assert plain_tuned.keys() == cached_tuned.keys() == start.keys()
    assert all(torch.equal(plain_tuned[k], cached_tuned[k]) for k in plain_tuned)
    assert not torch.equal(plain_tuned["ctx"], start["ctx"])  # adaptation moved the prompt
    # without a cache: 2 zero-shot passes, 3 epochs and 2 final passes decode every image
    assert plain_decodes == 7 * len(images) and cached_decodes == len(images)


def test_a_sweep_decodes_each_image_once(image_folder, tmp_path, decodes):
    suite = folder_suite(image_folder, CLASSES + UNKNOWN, 3, None)
    sweep = Sweep(
        model="ueo-tiny-rn",
        pretrained="bundled",
        recipe=Recipe(epochs=2, batch_size=8),
        runtime=Runtime(device="cpu", workers=0, progress=False),
        methods=["zeroshot", "ueo"],
    )
    run_sweep(suite, sweep, tmp_path / "out")
    assert sorted(decodes) == sorted(suite.domains[0].test.paths)
    assert set(decodes.values()) == {1}


def test_only_registered_images_are_stored_and_each_kind_apart(photos):
    """Rows come from `register` (before a loader forks): an image of no registered set is
    decoded but not kept; its decoded image and its test pixels are two entries."""
    transform = clip.test_transform(32)
    split = split_transform(transform)
    cache = ImageCache()
    cache.register(photos[:2], split)
    cache.register(photos[:1], split)  # registered twice: the same rows
    for path in photos:
        cache.pixels(path, split)
    assert len(cache) == 4 and cache.decodes == 3
    for path in photos:
        cache.pixels(path, split)
    assert cache.decodes == 4  # the unregistered one again
    assert torch.equal(cache.pixels(photos[1], split), split.pixels(ueo.images.open_rgb(photos[1])))
