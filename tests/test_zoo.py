"""The bundled tiny models: integrity, size, and zero-shot accuracy on the source domain."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ueo import testbed as tb
from ueo import zoo
from ueo.clip import test_transform as clip_test_transform
from ueo.errors import UeoError

MAX_BYTES = 15 * 1024 * 1024
# Floors a few points under the accuracy measured on this subset (all 15 classes, the SPEC's
# "a photo of a {name}." prompt): ueo-tiny-rn 97.4%, ueo-tiny-vit 89.6%.
ZERO_SHOT_FLOOR = {"ueo-tiny-rn": 0.94, "ueo-tiny-vit": 0.86}


@pytest.fixture(scope="module", params=zoo.BUNDLED)
def bundled(request):
    return request.param, zoo.load_bundled(request.param)


def test_checkpoint_matches_recipe_and_size_limit(bundled):
    name, model = bundled
    path = zoo.bundled_checkpoint(name)
    recipe = zoo.bundled_recipe(name)
    assert zoo.sha256_file(path) == recipe["sha256"]
    assert path.stat().st_size == recipe["file_bytes"] <= MAX_BYTES
    assert recipe["settings"]["logit_scale"] == 100
    assert model.logit_scale.exp().item() == pytest.approx(100, rel=1e-4)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training


def test_bundled_norm_layers(bundled):
    """The RN tower tunes BatchNorm affines, the ViT tower LayerNorm affines (SPEC.md)."""
    name, model = bundled
    norm = torch.nn.BatchNorm2d if name.endswith("-rn") else torch.nn.LayerNorm
    assert any(isinstance(m, norm) for m in model.visual.modules())


def test_zero_shot_on_source_test_subset(bundled):
    name, model = bundled
    try:
        images, labels = tb.source_arrays("test")
    except UeoError as exc:
        pytest.skip(f"testbed data not installed: {exc}")
    images, labels = images[::3], labels[::3]  # 500 images, every class
    cos = zoo.zero_shot_cosines(model, tb.CLASS_NAMES, images, name)
    accuracy = float(np.mean(cos.argmax(dim=1).numpy() == labels))
    assert accuracy >= ZERO_SHOT_FLOOR[name]


def test_preprocess_matches_the_pil_test_transform():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    batch = zoo.preprocess(images, 32)
    transform = clip_test_transform(32)
    expected = torch.stack([transform(Image.fromarray(im).convert("RGB")) for im in images])
    assert batch.shape == (3, 3, 32, 32)
    assert torch.equal(batch, expected)


def test_register_is_idempotent():
    import open_clip

    zoo.register_tiny_models()
    zoo.register_tiny_models()
    assert open_clip.list_models().count("ueo-tiny-rn") == 1


def test_unknown_bundled_model_lists_the_bundled_ones():
    with pytest.raises(UeoError, match="ueo-tiny-rn, ueo-tiny-vit"):
        zoo.load_bundled("RN50")


def test_tampered_checkpoint_is_refused(tmp_path, monkeypatch):
    name = zoo.BUNDLED[0]
    copy = tmp_path / f"{name}.safetensors"
    data = bytearray(zoo.bundled_checkpoint(name).read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    recipe = zoo.bundled_checkpoint(name).with_suffix(".json")
    (tmp_path / f"{name}.json").write_text(recipe.read_text())
    monkeypatch.setattr(zoo, "bundled_checkpoint", lambda _: copy)
    with pytest.raises(UeoError, match="sha256"):
        zoo.load_bundled(name)
