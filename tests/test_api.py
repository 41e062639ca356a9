"""The Python API: its top-level names, the README's example, adapters on other base weights,
and a method added to the registry from outside, trained through `adapt`."""

import json
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import CLASSES, UNKNOWN, draw, load_calibrated
from safetensors.torch import load_file, save_file

import ueo.api
from ueo.adaptation import AdaptResult, adapt
from ueo.api import load_adapted, save_run
from ueo.cli import main
from ueo.data import load_image_set
from ueo.methods import METHODS, TRAIN_MASK, Method
from ueo.model import CTX_NAME
from ueo.objectives import infomax_loss
from ueo.recipe import Recipe, Runtime

README = Path(__file__).resolve().parents[1] / "README.md"
QUIET = Runtime(device="cpu", workers=0, progress=False)

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Model .* has RANDOM weights"),
]


def test_top_level_api_names():
    import ueo.adaptation  # noqa: F401  (a submodule import must not shadow `ueo.adapt`)
    from ueo import Recipe, Runtime, adapt, evaluate, load_adapted, load_model, predict, save_run

    assert adapt is ueo.api.adapt and callable(adapt)
    assert (evaluate, load_adapted, load_model, predict, save_run) == (
        ueo.api.evaluate,
        ueo.api.load_adapted,
        ueo.api.load_model,
        ueo.api.predict,
        ueo.api.save_run,
    )
    assert Recipe is ueo.recipe.Recipe and Runtime is ueo.recipe.Runtime
    assert Recipe().epochs == 50
    with pytest.raises(AttributeError, match="no attribute 'AdaptConfig'"):
        ueo.AdaptConfig  # noqa: B018


def _python_block(text: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's Python block, run as written: `load_model` gives a tiny random-weights
    model (no download) and each folder it reads is generated with the README's class names."""
    code = _python_block(README.read_text())
    folders = sorted(set(re.findall(r"load_image_set\(\s*[\"']([^\"']+)[\"']", code)))
    assert folders, "the README example reads no image folder"
    calls = []

    def load_model(model, pretrained, class_names, recipe=None, **kwargs):
        calls.append((model, pretrained, list(class_names)))
        # Labelled folders with the README's classes (each drawn as one of ours) and one
        # class it does not know.
        styles = CLASSES + UNKNOWN
        rng = np.random.default_rng(0)
        for folder in folders:
            for i, name in enumerate([*class_names, "not_a_known_class"]):
                out = tmp_path / folder / name
                out.mkdir(parents=True, exist_ok=True)
                for j in range(4):
                    draw(styles[i % len(styles)], rng).save(out / f"{j}.png")
        recipe = recipe or Recipe()
        return load_calibrated("test-tiny-rn", class_names, n_ctx=recipe.n_ctx)

    monkeypatch.setattr(ueo.api, "load_model", load_model)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    assert len(calls) == 1
    result = namespace["result"]
    assert isinstance(result, AdaptResult) and result.history
    runs = [p.parent for p in tmp_path.rglob("adapter.safetensors")]
    assert len(runs) == 1 and (runs[0] / "metrics.json").is_file()
    assert "acc" in capsys.readouterr().out  # the evaluation it prints
    rows = namespace["rows"]
    n_images = 4 * (len(calls[0][2]) + 1)
    assert len(rows) == n_images and {r["pred"] for r in rows} <= set(calls[0][2])


def _random_checkpoint(path: Path, seed: int) -> Path:
    """An open_clip state dict of test-tiny-rn with other random weights, as a local file."""
    torch.manual_seed(seed)
    net = open_clip.create_model("test-tiny-rn", pretrained=None)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


def test_load_adapted_honours_a_pretrained_override(tmp_path, image_folder, classes_file):
    model = load_calibrated("test-tiny-rn")
    images = load_image_set(image_folder, CLASSES)
    result = adapt(model, images, Recipe(epochs=1, batch_size=8, lr_norm=1e-2), QUIET)
    run = tmp_path / "run"
    save_run(run, model, result)
    checkpoint = _random_checkpoint(tmp_path / "other.safetensors", seed=7)
    stored = load_file(checkpoint)
    conv = "visual.conv1.weight"  # a frozen base weight, not in the adapter

    as_saved, meta = load_adapted(run)
    assert meta["pretrained"] == "none" and as_saved.clip.pretrained == "none"
    other, meta2 = load_adapted(run, pretrained=str(checkpoint))
    assert meta2 == meta  # the adapter's own metadata is returned unchanged
    assert other.clip.pretrained == str(checkpoint.resolve())
    # The base weights are the checkpoint's, not those named in the adapter...
    assert torch.equal(other.net.get_parameter(conv), stored[conv])
    assert not torch.equal(as_saved.net.get_parameter(conv), stored[conv])
    # ...and the tuned tensors are the adapter's, on top of them.
    for name, value in model.adapter_state().items():
        assert torch.equal(other.adapter_state()[name], value)
    assert not torch.equal(stored["visual.bn1.weight"], model.adapter_state()["visual.bn1.weight"])

    # `ueo eval --pretrained` records the base weights it really used.
    argv = ["eval", "--adapter", str(run), "--pretrained", str(checkpoint), "--data"]
    argv += [str(image_folder), "--out", str(tmp_path / "e"), "--workers", "0", "--quiet"]
    assert main(argv) == 0
    record = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert record["pretrained"] == str(checkpoint.resolve())


def test_a_method_added_to_the_registry_trains_through_adapt(monkeypatch, image_folder):
    """One registry entry is a whole method: its fixed values see the zero-shot pass and the
    labels, a `train` mask restricts training to some samples, and its loss is what is minimised."""
    seen = {"fixed": [], "batches": []}

    def fixed(cos, labels, recipe):
        seen["fixed"].append((cos.clone(), labels.clone(), recipe))
        return {TRAIN_MASK: labels >= 0, "index": torch.arange(len(labels))}

    def loss(batch):
        seen["batches"].append(batch.fixed["index"].tolist())
        assert batch.fixed[TRAIN_MASK].all()
        return infomax_loss(batch.logits, batch.recipe.trade)

    monkeypatch.setitem(
        METHODS, "known-only", Method("known-only", "InfoMax on known-class images", loss, fixed)
    )
    model = load_calibrated("test-tiny-rn")
    before = model.adapter_state()[CTX_NAME].clone()
    images = load_image_set(image_folder, CLASSES)
    recipe = Recipe(method="known-only", epochs=2, batch_size=8, lr_prompt=1e-2)
    result = adapt(model, images, recipe, QUIET)

    [(cos, labels, got_recipe)] = seen["fixed"]
    assert cos.shape == (len(images), len(CLASSES)) and got_recipe == recipe
    assert labels.tolist() == images.labels.tolist()
    zeroshot = result.outputs["zeroshot"]["unlabeled"].cos
    assert torch.equal(cos, torch.from_numpy(zeroshot))
    known = {i for i, y in enumerate(images.labels.tolist()) if y >= 0}
    per_epoch = len(known)
    trained = [i for b in seen["batches"] for i in b]
    assert len(trained) == 2 * per_epoch and set(trained) == known  # every known image, twice
    assert len(result.history) == 2
    assert not torch.equal(model.adapter_state()[CTX_NAME], before)
