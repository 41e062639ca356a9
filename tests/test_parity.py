"""Parity with the authors' script (github.com/tim-learn/UEO, demo.py at a5e749e).

The reference step below is written from the script's rules, not from ueo's code: the tuned
image-tower parameters are those whose NAME contains 'bn' or 'ln' (demo.py:444-448), text
features come from the CoOp prompt run through the full text transformer (demo.py:19-88),
the loss is demo.py:328-345 and 483-485, and the optimiser is plain SGD (demo.py:450).
ueo's `adapt()` must tune the same tensors and reach the same values after one step.
"""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSES, load_calibrated
from torch.utils.data import DataLoader, RandomSampler

import ueo.adaptation
import ueo.loader
import ueo.training
from ueo.api import adapt, load_adapted, load_model, save_run
from ueo.clip import load_clip
from ueo.data import ImageSet, load_image_set
from ueo.loader import ImageDataset, collate
from ueo.model import UeoModel
from ueo.recipe import Recipe, Runtime
from ueo.runs import load_adapter

EPS = 1e-5  # demo.py:329, 342
SCALE = 100.0  # demo.py:470
QUIET = Runtime(device="cpu", workers=0, progress=False)


def script_names(net: torch.nn.Module) -> list[str]:
    """demo.py:444-448: image-tower parameters whose name contains 'bn' or 'ln'."""
    return [k for k, _ in net.visual.named_parameters() if "bn" in k or "ln" in k]


def script_text_features(net, tokenizer, class_names: list[str], ctx: torch.Tensor):
    """demo.py:19-88: [SOS] ctx "{name}." [EOS] in embedding space, the whole text transformer,
    pooled at the EOS token (argmax of the token ids), times the text projection."""
    n_ctx = ctx.shape[0]
    tokens = tokenizer([f"a photo of a {n.replace('_', ' ')}." for n in class_names])
    with torch.no_grad():
        emb = net.token_embedding(tokens)
    x = torch.cat([emb[:, :1], ctx.expand(len(class_names), -1, -1), emb[:, 1 + n_ctx :]], 1)
    x = net.transformer(x + net.positional_embedding, attn_mask=net.attn_mask)
    x = net.ln_final(x)
    return x[torch.arange(len(class_names)), tokens.argmax(dim=-1)] @ net.text_projection


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p + EPS)).sum(dim=-1)


def script_step(net, tokenizer, class_names, images, lr_prompt, lr_norm):
    """One step of the script on one batch; returns {ueo name: new tensor} (net untouched)."""
    with torch.no_grad():
        ctx0 = net.token_embedding(tokenizer(["a photo of a"]))[0, 1:5].clone()  # demo.py:30-33
        text0 = F.normalize(script_text_features(net, tokenizer, class_names, ctx0), dim=-1)
        cos0 = F.normalize(net.visual(images), dim=-1) @ text0.t()
    weight = torch.softmax(cos0, dim=1).max(dim=1).values  # MCM, T = 1 (demo.py:453-454)
    visual = dict(net.visual.named_parameters())
    tuned = {f"visual.{k}": visual[k] for k in script_names(net)}
    ctx = ctx0.clone().requires_grad_(True)
    for p in tuned.values():
        p.requires_grad_(True)
    try:
        image = F.normalize(net.visual(images), dim=-1)
        text = F.normalize(script_text_features(net, tokenizer, class_names, ctx), dim=-1)
        outputs = torch.softmax(SCALE * image @ text.t(), dim=1)
        mean_outputs = torch.mm(torch.diag(1 / weight), outputs).sum(dim=0) / (1 / weight).sum()
        loss = (entropy(outputs) * weight).sum() / weight.sum() - entropy(mean_outputs)
        grads = torch.autograd.grad(loss, [ctx, *tuned.values()])
    finally:
        for p in tuned.values():
            p.requires_grad_(False)
    new = {"prompt.ctx": (ctx0 - lr_prompt * grads[0]).detach()}
    for (k, p), g in zip(tuned.items(), grads[1:], strict=True):
        new[k] = (p - lr_norm * g).detach()
    return new


def close(got: torch.Tensor, expected: torch.Tensor, step: torch.Tensor) -> None:
    """Equal to 1e-5 relative, and the steps equal to 1e-4 of their size: fp32 summation order
    alone (the same batch, permuted) moves a step by up to 3e-5 of its size on these models."""
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4 * float(step))


def one_full_batch(model, images: ImageSet, **recipe) -> dict[str, torch.Tensor]:
    """`adapt()` for one epoch of a single full batch without augmentation: one SGD step."""
    recipe = Recipe(epochs=1, batch_size=len(images), augment="none", **recipe)
    adapt(model, images, recipe, QUIET)
    return {k: v.clone() for k, v in model.adapter_state(recipe.norm_layers).items()}


def first_images(images, model, n: int) -> torch.Tensor:
    """The first `n` images through the model's test transform, as one batch."""
    dataset = ImageDataset(images, model.clip.test_transform())
    return dataset.finish(collate([dataset[i] for i in range(n)])[0])


def test_one_step_matches_the_script(image_folder, single_thread):
    """ResNet: the script's name rule and ueo's default tune the same tensors, to the same
    values; `--norm-layers all` adds exactly the projection shortcuts' BatchNorms."""
    images = load_image_set(image_folder, CLASSES)
    lr = 0.05  # large enough that one step moves every tuned tensor visibly
    model = load_calibrated("test-tiny-rn")
    net, tok = model.net, model.clip.tokenizer
    batch = first_images(images, model, 30)
    before = {k: v.clone() for k, v in model.adapter_state("all").items()}
    expected = script_step(net, tok, CLASSES, batch, lr, lr)

    got = one_full_batch(model, images, lr_prompt=lr, lr_norm=lr)
    assert sorted(got) == sorted(expected)
    assert not any("downsample" in k for k in got)
    for k in expected:
        step = (expected[k] - before[k]).abs().max()
        assert step > 1e-3 * before[k].abs().max(), f"{k} barely moved: the test would be blind"
        close(got[k], expected[k], step)

    every = one_full_batch(
        load_calibrated("test-tiny-rn"), images, lr_prompt=lr, lr_norm=lr, norm_layers="all"
    )
    shortcut = sorted(set(every) - set(expected))
    assert shortcut and all(".downsample." in k for k in shortcut)
    assert len(shortcut) == 2 * 4  # weight and bias of layer1..layer4's shortcut BatchNorm
    for k in shortcut:
        assert not torch.equal(every[k], before[k])
    for k in expected:  # on the first step the extra tensors change no other gradient
        torch.testing.assert_close(every[k], expected[k], rtol=1e-5, atol=1e-6)


def test_one_step_matches_the_script_vit(image_folder, single_thread):
    """ViT: every LayerNorm is named ln_*, so both rules (and `all`) pick the same tensors.

    The bundled ueo-tiny-vit is trained: a random ViT maps these images to nearly one feature,
    where UEO's two entropy terms cancel and the prompt gets almost no gradient."""
    images = load_image_set(image_folder, CLASSES)
    lr = 5.0  # one step that visibly moves every LayerNorm of the trained model
    model = UeoModel(load_clip("ueo-tiny-vit", "bundled"), CLASSES)
    net, tok = model.net, model.clip.tokenizer
    batch = first_images(images, model, 30)
    before = {k: v.clone() for k, v in model.adapter_state().items()}
    assert set(model.norm_parameters("all")) == set(model.norm_parameters("reference"))
    expected = script_step(net, tok, CLASSES, batch, lr, lr)
    got = one_full_batch(model, images, lr_prompt=lr, lr_norm=lr)
    assert sorted(got) == sorted(expected)
    assert {k.split(".")[-2] for k in got if k != "prompt.ctx"} == {
        "ln_pre",
        "ln_1",
        "ln_2",
        "ln_post",
    }
    for k in expected:
        step = (expected[k] - before[k]).abs().max()
        assert step > 1e-3 * before[k].abs().max(), f"{k} barely moved: the test would be blind"
        close(got[k], expected[k], step)


class RecordingLoader:
    """Wraps ueo's training loader and records the dataset indices of every batch it yields."""

    def __init__(self, loader: DataLoader, seen: list[int]):
        self.loader, self.seen = loader, seen
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, idx, errors in self.loader:
            self.seen += idx.tolist()
            yield x, idx, errors


@pytest.mark.parametrize("workers", [0, 2])
def test_training_order_and_one_load_per_image(image_folder, monkeypatch, workers, single_thread):
    """adapt() visits the images in the order of a plain DataLoader with a seeded
    RandomSampler, whatever the number of workers, and loads each image once per pass."""
    images = load_image_set(image_folder, CLASSES)
    n, epochs, batch, seed = len(images), 3, 8, 7
    seen: list[int] = []
    real_make_loader = ueo.training.make_loader
    monkeypatch.setattr(
        ueo.training,
        "make_loader",
        lambda *a, **k: RecordingLoader(real_make_loader(*a, **k), seen),
    )
    loads = mp.Array("i", n)  # shared with the worker processes
    real_getitem = ueo.loader.ImageDataset.__getitem__

    def counted(self, key):
        with loads.get_lock():
            loads[key[1] if isinstance(key, tuple) else key] += 1  # training keys: (epoch, i)
        return real_getitem(self, key)

    monkeypatch.setattr(ueo.loader.ImageDataset, "__getitem__", counted)
    recipe = Recipe(epochs=epochs, batch_size=batch, seed=seed, lr_norm=0.0)
    adapt(load_calibrated("test-tiny-vit"), images, recipe, QUIET.replace(workers=workers))

    data = list(range(n))
    plain = DataLoader(
        data,
        batch_size=batch,
        sampler=RandomSampler(data, generator=torch.Generator().manual_seed(seed)),
    )
    expected = [i for _ in range(epochs) for b in plain for i in b.tolist()]
    assert seen == expected
    assert seen[:n] != seen[n : 2 * n]  # reshuffled every epoch
    # zero-shot pass + one load per epoch + the final evaluation, nothing prefetched and dropped
    assert list(loads) == [epochs + 2] * n


def test_eval_every_leaves_the_adapter_unchanged(image_folder, single_thread):
    """Learning-curve evaluations are read-only: same final tensors, curves at the right epochs."""
    images = load_image_set(image_folder, CLASSES)
    test = images.subset(np.arange(len(images)) % 2 == 0)
    recipe = Recipe(epochs=3, batch_size=8, lr_prompt=0.01, lr_norm=0.01)
    states, curves = {}, {}
    for every in (0, 1, 2):
        model = load_calibrated("test-tiny-rn")
        result = adapt(model, images, recipe, QUIET.replace(eval_every=every), test=test)
        states[every], curves[every] = model.adapter_state(), result.curves
    for every in (1, 2):
        assert states[every].keys() == states[0].keys()
        for k, v in states[0].items():
            assert torch.equal(states[every][k], v), k
    assert [c["epoch"] for c in curves[0]] == [0, 3]
    assert [c["epoch"] for c in curves[1]] == [0, 1, 2, 3]
    assert [c["epoch"] for c in curves[2]] == [0, 2, 3]
    assert set(curves[1][1]) == {"epoch", "unlabeled", "test", "label_free"}
    assert curves[1][1]["test"]["n"] == len(test)
    assert curves[1][-1]["test"] == curves[0][-1]["test"]
    assert curves[1][-1]["label_free"] == curves[0][-1]["label_free"]


@pytest.mark.parametrize(
    ("name", "tag", "quick"), [("RN50", "openai", True), ("ViT-B-32", "laion2b_s34b_b79k", False)]
)
def test_openai_weights_get_quickgelu(monkeypatch, name, tag, quick):
    """OpenAI's CLIPs were trained with QuickGELU; open_clip's plain configs use GELU unless
    told, so ueo asks for it when the tag's pretrained config says so (no download here)."""
    asked = []
    real_create = open_clip.create_model

    def fake_create(model_name, pretrained=None, **kwargs):
        asked.append((model_name, pretrained, kwargs.get("force_quick_gelu")))
        return real_create("test-tiny-vit", pretrained=None)

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    load_clip(name, tag)
    assert asked == [(name, tag, quick)]


@pytest.mark.parametrize("norm_layers", ["all", "reference"])
def test_adapter_keeps_the_norm_layer_choice(
    image_folder, tmp_path, calibrated_loads, norm_layers, single_thread
):
    """The adapter stores the recipe; load_adapted (eval, predict) loads exactly its tensors."""
    images = load_image_set(image_folder, CLASSES)
    recipe = Recipe(epochs=1, batch_size=16, lr_prompt=0.05, lr_norm=0.05, norm_layers=norm_layers)
    model = load_model("test-tiny-rn", "none", CLASSES, recipe)
    pristine = {k: v.clone() for k, v in model.norm_parameters("all").items()}
    result = adapt(model, images, recipe, QUIET)
    save_run(tmp_path / "run", model, result)

    tensors, meta = load_adapter(tmp_path / "run")
    assert meta["recipe"]["norm_layers"] == norm_layers
    shortcut = [k for k in pristine if ".downsample." in k]
    assert len(shortcut) == 8
    assert all((k in tensors) == (norm_layers == "all") for k in shortcut)

    loaded, _ = load_adapted(tmp_path / "run")
    adapted = model.norm_parameters("all")
    for k, p in loaded.norm_parameters("all").items():
        assert torch.equal(p, adapted[k]), k
        if k in shortcut:
            assert torch.equal(p, pristine[k]) == (norm_layers == "reference"), k
    assert torch.equal(loaded.prompt.ctx, model.prompt.ctx)
