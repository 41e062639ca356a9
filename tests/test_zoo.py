"""The bundled tiny models: integrity, size, what is tuned, and zero-shot accuracy on the
source domain through the core's own path (`--pretrained bundled`, prompts, inference)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ueo.api import evaluate, load_model
from ueo.data import load_image_set
from ueo.demo import testbed as tb
from ueo.demo import zoo
from ueo.errors import UeoError
from ueo.recipe import Runtime

pytestmark = pytest.mark.usefixtures("single_thread")

MAX_BYTES = 15 * 1024 * 1024
# Floors a few points under the accuracy measured on this subset (all 15 classes, the spec's
# "a photo of a {name}." prompt): ueo-tiny-rn 97.4%, ueo-tiny-vit 89.6%.
ZERO_SHOT_FLOOR = {"ueo-tiny-rn": 0.94, "ueo-tiny-vit": 0.86}
# Tuned norm tensors (weight + bias per layer). ueo-tiny-rn: 19 BatchNorms, 4 of them in
# projection shortcuts (`downsample`), which the reference selection leaves out.
NORM_TENSORS = {
    "ueo-tiny-rn": {"reference": 30, "all": 38},
    "ueo-tiny-vit": {"reference": 20, "all": 20},
}


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


@pytest.mark.parametrize("name", zoo.BUNDLED)
def test_norm_selection_of_the_bundled_models(name):
    """`reference` leaves out exactly the projection shortcuts' BatchNorms; `all` keeps them."""
    model = load_model(name, "bundled", list(tb.CLASS_NAMES))
    reference, every = model.norm_parameters("reference"), model.norm_parameters("all")
    counts = NORM_TENSORS[name]
    assert (len(reference), len(every)) == (counts["reference"], counts["all"])
    assert set(reference) <= set(every)
    left_out = set(every) - set(reference)
    assert all(".downsample." in n for n in left_out)
    assert not any(".downsample." in n for n in reference)
    norm = torch.nn.BatchNorm2d if name.endswith("-rn") else torch.nn.LayerNorm
    modules = dict(model.net.named_modules())
    assert all(isinstance(modules[n.rsplit(".", 1)[0]], norm) for n in every)


@pytest.fixture(scope="module")
def source_test_subset(tmp_path_factory):
    """500 source test images (every third, all classes) as PNG files, as a labelled set."""
    try:
        images, labels = tb.source_arrays("test")
    except UeoError as exc:
        pytest.skip(f"testbed data not installed: {exc}")
    root = tmp_path_factory.mktemp("source-test")
    for i, (image, label) in enumerate(zip(images[::3], labels[::3], strict=True)):
        folder = root / tb.CLASS_NAMES[label]
        folder.mkdir(exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")
    return root


@pytest.mark.parametrize("name", zoo.BUNDLED)
def test_zero_shot_on_source_test_subset(name, source_test_subset):
    """The shipped weights, loaded and run by the core, classify the clean domain."""
    names = list(tb.CLASS_NAMES)
    model = load_model(name, "bundled", names)
    assert model.clip.pretrained == "bundled"
    images = load_image_set(source_test_subset, names)
    assert len(images) == 500 and set(images.labels.tolist()) == set(range(len(names)))
    metrics = evaluate(model, images, Runtime(device="cpu", workers=0, progress=False))
    assert metrics["gacc"] >= ZERO_SHOT_FLOOR[name]  # overall accuracy, all 15 classes known


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


def _pretrain_tool():
    """tools/pretrain.py, the recipe of the bundled models (not part of the package)."""
    path = Path(__file__).resolve().parents[1] / "tools" / "pretrain.py"
    spec = importlib.util.spec_from_file_location("ueo_pretrain_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrain_tool_measures_the_shipped_weights_as_recorded():
    tool = _pretrain_tool()
    name = "ueo-tiny-rn"
    try:
        measured = tool.source_zero_shot(zoo.load_bundled(name), name)
    except UeoError as exc:
        pytest.skip(f"testbed data not installed: {exc}")
    recorded = zoo.bundled_recipe(name)["zero_shot_source_test"]
    assert measured == pytest.approx(recorded, abs=1e-6)


def test_pretrain_tool_leaves_the_shipped_weights_alone_by_default():
    """Rebuilt weights differ by machine: only an explicit --out replaces the shipped ones."""
    tool = _pretrain_tool()
    out = tool.build_parser().parse_args(["--model", "ueo-tiny-rn"]).out
    shipped = zoo.bundled_checkpoint("ueo-tiny-rn").parent.resolve()
    assert out.resolve() != shipped and shipped not in out.resolve().parents
    assert not out.is_absolute()  # under the folder it is run from


def test_pretrain_tool_runs(tmp_path, monkeypatch, capsys):
    """A two-step pretraining on a slice of the source domain writes a checkpoint that loads,
    and a recipe file that describes it."""
    tool = _pretrain_tool()
    try:
        train, test = tb.source_arrays("train"), tb.source_arrays("test")
    except UeoError as exc:
        pytest.skip(f"testbed data not installed: {exc}")
    subsets = {"train": (train[0][::137], train[1][::137]), "test": (test[0][::50], test[1][::50])}
    monkeypatch.setattr(tool, "source_arrays", lambda split: subsets[split])
    argv = ["--model", "ueo-tiny-rn", "--out", str(tmp_path), "--epochs", "1"]
    threads = torch.get_num_threads()
    try:
        assert tool.main([*argv, "--batch-size", "32", "--threads", "1", "--log-every", "0"]) == 0
    finally:  # the tool sets both for its process
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    weights = tmp_path / "ueo-tiny-rn.safetensors"
    recipe = json.loads(weights.with_suffix(".json").read_text())
    assert recipe["sha256"] == zoo.sha256_file(weights)
    assert recipe["settings"]["epochs"] == 1 and recipe["settings"]["logit_scale"] == 100
    assert recipe["command"].startswith("python tools/pretrain.py --model ueo-tiny-rn")
    model = zoo.load_weights("ueo-tiny-rn", weights)
    shipped = zoo.load_bundled("ueo-tiny-rn")
    assert not torch.equal(model.visual.conv1.weight, shipped.visual.conv1.weight)
    assert "zero_shot_source_test" in capsys.readouterr().out
