"""`ueo.adaptation.adapt` through the Python API: every registered method, reproducibility,
the oracle's labels."""

import numpy as np
import pytest
import torch
from conftest import CLASSES, load_calibrated, make_folder

from ueo.adaptation import adapt
from ueo.api import load_adapted, save_run
from ueo.data import load_image_set
from ueo.errors import UeoError
from ueo.methods import method_names
from ueo.metrics import METRIC_NAMES
from ueo.model import CTX_NAME
from ueo.recipe import Recipe, Runtime

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Model .* has RANDOM weights"),
]

QUIET = Runtime(device="cpu", workers=0, progress=False)


@pytest.mark.parametrize("method", method_names())
def test_every_method_through_the_api(method, image_folder, tmp_path):
    model = load_calibrated("test-tiny-rn")
    before = model.adapter_state()
    before = {k: v.clone() for k, v in before.items()}
    images = load_image_set(image_folder, CLASSES)
    recipe = Recipe(method=method, epochs=1, batch_size=8, lr_prompt=1e-2, lr_norm=1e-2)
    result = adapt(model, images, recipe, QUIET)
    after = model.adapter_state()
    zs, ad = result.metrics["zeroshot"]["unlabeled"], result.metrics["adapted"]["unlabeled"]
    assert set(METRIC_NAMES) <= set(zs) and set(METRIC_NAMES) <= set(ad)
    assert result.recipe == recipe
    if method == "zeroshot":
        assert result.history == [] and ad == zs
        assert all(torch.equal(before[k], after[k]) for k in before)
    else:
        assert len(result.history) == 1 and np.isfinite(result.history[0]["loss"])
        assert not torch.equal(before[CTX_NAME], after[CTX_NAME])
        # The learning rates the epoch's steps used, first and last: cosine annealing from
        # the recipe's down, never the next epoch's (zero at the end of the schedule).
        lrs = result.history[0]["lr"]
        assert set(lrs) == {"prompt", "norm"}
        for first, last in lrs.values():
            assert first == 1e-2 and 0 < last < first
    # Parameters are frozen again after adaptation.
    assert not any(p.requires_grad for p in model.parameters())
    # The saved run rebuilds exactly this model's tuned tensors.
    record = save_run(tmp_path / "run", model, result)
    assert record["adapted"] == result.metrics["adapted"]
    with pytest.warns(UserWarning, match="RANDOM"):
        rebuilt, meta = load_adapted(tmp_path / "run")
    assert meta["recipe"]["method"] == method
    assert all(torch.equal(v, after[k]) for k, v in rebuilt.adapter_state().items())


def test_adaptation_is_reproducible(image_folder):
    images = load_image_set(image_folder, CLASSES)
    states = []
    for _ in range(2):
        model = load_calibrated("test-tiny-vit")
        recipe = Recipe(epochs=1, batch_size=8, lr_prompt=1e-2, lr_norm=1e-2)
        adapt(model, images, recipe, QUIET)
        states.append(model.adapter_state())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_oracle_needs_labels(tmp_path):
    loose = tmp_path / "loose"
    make_folder(loose, per_class=2)
    for f in list(loose.rglob("*.png")):
        f.rename(loose / f"{f.parent.name}_{f.name}")
    images = load_image_set(loose, CLASSES)
    assert not images.labelled
    model = load_calibrated("test-tiny-rn")
    with pytest.raises(UeoError, match="labels"):
        adapt(model, images, Recipe(method="ueo-oracle", epochs=1), QUIET)


def test_oracle_weights_follow_labels(image_folder):
    """ueo-oracle trains; with all samples ID it is infomax up to the weights' constant."""
    images = load_image_set(image_folder, CLASSES)
    known = images.subset(images.labels >= 0)
    results = {}
    for method in ("ueo-oracle", "infomax"):
        model = load_calibrated("test-tiny-rn")
        recipe = Recipe(method=method, epochs=1, batch_size=8, lr_prompt=1e-2)
        adapt(model, known, recipe, QUIET)
        results[method] = model.adapter_state()[CTX_NAME]
    torch.testing.assert_close(results["ueo-oracle"], results["infomax"], atol=1e-6, rtol=0)
