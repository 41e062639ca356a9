"""The data path: each image decoded once per run across loader processes (one shared store),
augmentation drawn from (seed, epoch, image), uint8 batches finished where they are used."""

import logging
import pickle

import numpy as np
import pytest
import torch
from conftest import CLASSES, load_calibrated
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler
from torchvision import transforms as T

import ueo.images
from ueo import clip
from ueo.adaptation import adapt
from ueo.cache import PRIVATE_BUDGET, ImageCache, split_transform
from ueo.data import load_image_set
from ueo.loader import EpochOrder, ImageDataset, draw_seed, make_loader
from ueo.recipe import Recipe, Runtime

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
SEED = 5


def epochs_of(loader, epochs=(1, 2)) -> dict[int, dict[int, torch.Tensor]]:
    """Per epoch, each image's pixels as the loader yields them, by dataset index."""
    out = {}
    for epoch in epochs:
        loader.batch_sampler.set_epoch(epoch)
        out[epoch] = {int(i): x for xb, idx, _ in loader for x, i in zip(xb, idx, strict=True)}
    return out


def test_epoch_order_keys_each_sample_and_keeps_the_order():
    n, batch = 10, 4
    order = EpochOrder(n, 7, batch)
    with pytest.raises(RuntimeError, match="set_epoch"):
        list(order)
    plain = DataLoader(
        range(n), batch, sampler=RandomSampler(range(n), generator=torch.Generator().manual_seed(7))
    )
    for epoch in (1, 2):
        order.set_epoch(epoch)
        assert list(order) == [[(epoch, int(i)) for i in b] for b in plain]
    with pytest.raises(RuntimeError, match="set_epoch"):  # each pass needs its epoch
        list(order)
    state = order.generator.get_state()
    order.set_epoch(3)
    full = list(order)
    order.generator.set_state(state)
    order.skip = 4  # a resumed epoch continues where its checkpoint stopped
    order.set_epoch(3)
    assert list(order) == full[1:] and len(order) == 3


def test_processes_share_each_global_batch_without_repeats(image_folder):
    """Over 3 processes, each global batch of 8 is cut in contiguous parts that, gathered in
    rank order, are the single process's batch (30 images: the last batch of 6 is cut 2+2+2,
    nothing padded); every image gets the same pixels as in one process. An evaluation pass
    is cut in contiguous parts too."""
    images = load_image_set(image_folder, CLASSES)
    transform = clip.train_transform(32)
    single = make_loader(images, transform, 8, True, 0, CPU, SEED)
    ranks = [
        make_loader(images, transform, 8, True, 0, CPU, SEED, rank=r, world=3) for r in range(3)
    ]
    for epoch in (1, 2):
        for loader in (single, *ranks):
            loader.batch_sampler.set_epoch(epoch)
        for whole, *parts in zip(single, *ranks, strict=True):
            sizes = [3, 3, 2] if len(whole[1]) == 8 else [2, 2, 2]
            assert [len(p[1]) for p in parts] == sizes
            assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
            assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    tiny = EpochOrder(5, SEED, 4, rank=2, world=3)
    tiny.set_epoch(1)
    assert [len(b) for b in tiny] == [1, 0]  # the last batch of 1 leaves rank 2 nothing
    test = clip.test_transform(32)
    shards = [make_loader(images, test, 7, False, 0, CPU, rank=r, world=4) for r in range(4)]
    seen = [int(i) for loader in shards for _, idx, _ in loader for i in idx]
    assert seen == list(range(len(images)))


def test_augmentation_depends_on_the_key_not_on_workers_or_the_store(image_folder):
    """Workers 0, 1 and 2, with the shared store and without: the same pixels for every image
    in every epoch; new crops each epoch; the main process's generator untouched."""
    images = load_image_set(image_folder, CLASSES)
    transform = clip.train_transform(32)
    runs = {}
    for workers, cache in [(0, None), (0, ImageCache()), (1, ImageCache()), (2, ImageCache())]:
        before = torch.get_rng_state()
        loader = make_loader(images, transform, 8, True, workers, CPU, SEED, cache=cache)
        runs[workers, cache is None] = epochs_of(loader)
        assert torch.equal(torch.get_rng_state(), before)
    (first, *others) = runs.values()
    assert all(len(first[e]) == len(images) for e in (1, 2))
    for other in others:
        for e in (1, 2):
            assert all(torch.equal(first[e][i], other[e][i]) for i in first[e])
    changed = [i for i in first[1] if not torch.equal(first[1][i], first[2][i])]
    assert len(changed) > len(images) // 2  # epoch 2 draws new crops and flips


@pytest.mark.parametrize(
    "make",
    [
        clip.train_transform,
        clip.test_transform,
        # a transform that does not split runs whole per image, its output finished already
        lambda size: T.Compose([T.RandomResizedCrop(size), T.ColorJitter(0.4), T.ToTensor()]),
    ],
    ids=["train", "test", "unsplit"],
)
def test_a_finished_batch_is_the_per_image_transform_drawn_from_the_key(image_folder, make):
    """uint8 batches finished at once equal, bit for bit, the whole transform applied to each
    freshly decoded image with torch's generator seeded from (seed, epoch, index): the draws
    are torchvision's own."""
    images = load_image_set(image_folder, CLASSES)
    transform = make(32)
    loader = make_loader(images, transform, 8, True, 0, CPU, SEED, cache=ImageCache())
    splits = split_transform(transform) is not None
    for epoch in (1, 2):
        loader.batch_sampler.set_epoch(epoch)
        for x, idx, _ in loader:
            assert x.dtype == (torch.uint8 if splits else torch.float32)
            got = loader.dataset.finish(x)
            expected = []
            for i in idx.tolist():
                torch.manual_seed(draw_seed(SEED, epoch, i))
                expected.append(transform(ueo.images.open_rgb(images.paths[i])))
            assert got.dtype == torch.float32
            assert torch.equal(got, torch.stack(expected))


def test_finish_is_exact_for_every_pixel_value():
    """ToTensor + Normalize of every uint8 value, per image, equals `Split.finish` of the batch.
    Dividing by 255 is not multiplying by 1/255 (what CUDA does with a Python-number divisor),
    which is why `finish` divides by a tensor."""
    transform = clip.test_transform(16)
    split = split_transform(transform)
    values = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    pixels = torch.stack([values.roll(k, 0).expand(3, 16, 16) for k in range(4)])
    to_tensor, normalize = transform.transforms[2:]
    per_image = torch.stack([normalize(to_tensor(p.permute(1, 2, 0).numpy())) for p in pixels])
    assert torch.equal(split.finish(pixels), per_image)
    x = values.float()
    assert not torch.equal(x / 255, x * (1 / 255))


def test_each_image_is_decoded_once_across_processes(image_folder):
    """A zero-shot pass, 2 epochs and the final evaluation with 2 loader workers: every image
    decoded once in all (counted by the shared store, whichever process decodes); without a
    store each pass decodes every image. Workers 0, 1 and 2 give one adapter."""
    images = load_image_set(image_folder, CLASSES)
    recipe = Recipe(epochs=2, batch_size=8, lr_prompt=1e-2, lr_norm=1e-2, seed=SEED)
    adapters, decodes = {}, {}
    for workers, budget in [(0, None), (1, None), (2, None), (2, 0)]:
        cache = ImageCache(budget)
        model = load_calibrated()
        runtime = Runtime(device="cpu", workers=workers, progress=False)
        adapt(model, images, recipe, runtime, test=images, cache=cache)
        adapters[workers, budget] = model.adapter_state(recipe.norm_layers)
        decodes[workers, budget] = cache.decodes
    first = adapters[0, None]
    assert not torch.equal(first["prompt.ctx"], load_calibrated().prompt.ctx)
    for state in adapters.values():
        assert state.keys() == first.keys()
        assert all(torch.equal(state[k], first[k]) for k in first)
    n = len(images)
    assert decodes == {(0, None): n, (1, None): n, (2, None): n, (2, 0): 6 * n}


def test_images_over_the_budget_are_decoded_each_time(image_folder):
    """A store with room for 5 of the 30 decoded images (40 x 40 RGB): those are decoded once,
    the others at every epoch, and the batches are the unlimited store's."""
    images = load_image_set(image_folder, CLASSES)
    transform = clip.train_transform(32)
    small, large = ImageCache(budget=5 * 40 * 40 * 3), ImageCache()
    got = epochs_of(make_loader(images, transform, 8, True, 2, CPU, SEED, cache=small))
    want = epochs_of(make_loader(images, transform, 8, True, 2, CPU, SEED, cache=large))
    for e in (1, 2):
        assert all(torch.equal(got[e][i], want[e][i]) for i in want[e])
    assert len(small) == 5 and small.used == small.budget
    assert small.decodes == len(images) + (len(images) - 5)
    assert large.decodes == len(images) and len(large) == len(images)


def test_an_unreadable_image_is_reported_once(image_folder, caplog):
    """Read by worker processes in every pass, a broken file is skipped and reported once."""
    (image_folder / "red_square" / "broken.png").write_bytes(b"not an image")
    images = load_image_set(image_folder, CLASSES)
    recipe = Recipe(epochs=2, batch_size=8, seed=SEED)
    runtime = Runtime(device="cpu", workers=2, progress=False)
    cache = ImageCache()
    with caplog.at_level(logging.WARNING, logger="ueo"):
        result = adapt(load_calibrated(), images, recipe, runtime, test=images, cache=cache)
    reports = [r for r in caplog.records if "Skipping unreadable image" in r.getMessage()]
    assert result.skipped_images == 1 and len(reports) == 1
    assert "broken.png" in reports[0].getMessage()
    assert cache.decodes == len(images) - 1


def test_a_spawned_worker_gets_a_private_store(tmp_path):
    """'spawn' pickles the dataset: the store cannot be shared, the worker gets its own."""
    path = tmp_path / "a.png"
    Image.new("RGB", (7, 5), (1, 2, 3)).save(path)
    shared = ImageCache(budget=PRIVATE_BUDGET + 1)
    shared.register([str(path)])  # as the dataset does before its loader starts a worker
    shared.image(str(path))
    private = pickle.loads(pickle.dumps(shared))
    assert private.budget == PRIVATE_BUDGET and len(private) == 0 and private.decodes == 0
    for _ in range(2):
        assert np.array_equal(np.asarray(private.image(str(path))), np.full((5, 7, 3), [1, 2, 3]))
    assert private.decodes == 1 and len(private) == 1 and shared.decodes == 1


def test_the_store_is_filled_by_workers_and_read_by_the_main_process(image_folder):
    """What a forked worker stores is in the main process's store too (shared memory)."""
    images = load_image_set(image_folder, CLASSES)
    cache = ImageCache()
    dataset = ImageDataset(images, clip.test_transform(32), cache)
    loader = DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=lambda b: len(b))
    assert sum(loader) == len(images) and cache.decodes == len(images)
    assert len(cache) == 2 * len(images)  # decoded images and test-transform pixels
    for i in range(len(images)):
        dataset[i]
    assert cache.decodes == len(images)
