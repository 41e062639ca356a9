"""The method registry, through the worked example of docs/adding-a-method.md.

The example's code block is taken from the page and run as if pasted into methods.py; the
method it registers is then checked the way the page asks of a new method: its loss on a
hand-made batch against a hand computation (and `ueo_loss` with `trade = 0`, which it is), its
fixed values on a few cosines, and `ueo adapt --method entmin-mcm` end to end.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_folder
from docblocks import ROOT, block, exec_block

import ueo.methods
from ueo.cli import main
from ueo.methods import Batch, get_method, method_names
from ueo.objectives import ueo_loss
from ueo.recipe import Recipe

PAGE = ROOT / "docs" / "adding-a-method.md"

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Model .* has RANDOM weights"),
]


@pytest.fixture
def entmin_mcm(monkeypatch):
    """The worked example registered, in a copy of the registry restored after the test."""
    monkeypatch.setattr(ueo.methods, "METHODS", dict(ueo.methods.METHODS))
    exec_block(block(PAGE, '"entmin-mcm"'))
    return get_method("entmin-mcm")


def test_the_worked_example_registers_a_training_method(entmin_mcm):
    assert "entmin-mcm" in method_names(trains_only=True)
    assert entmin_mcm.fixed is not None and not entmin_mcm.needs_labels


def test_its_loss_is_the_confidence_weighted_entropy(entmin_mcm):
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    w = torch.tensor([0.9, 0.3])
    features = torch.eye(3)[:2]
    batch = Batch(logits, features, torch.eye(3), {"weight": w}, Recipe())
    # By hand: H(p) = -sum p log(p + 1e-5) per row, then the w-weighted mean.
    entropies = []
    for row in logits.tolist():
        z = [math.exp(v) for v in row]
        p = [v / sum(z) for v in z]
        entropies.append(-sum(q * math.log(q + 1e-5) for q in p))
    expected = (0.9 * entropies[0] + 0.3 * entropies[1]) / 1.2
    loss = entmin_mcm.loss(batch)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(ueo_loss(logits, w, trade=0.0).item(), rel=1e-6)


def test_its_fixed_values_are_the_zero_shot_mcm_scores(entmin_mcm):
    cos = torch.tensor([[0.30, 0.10, 0.20], [0.25, 0.25, 0.25]])
    labels = torch.tensor([0, -2])
    weight = entmin_mcm.fixed(cos, labels, Recipe())["weight"]
    first = math.exp(0.30) / (math.exp(0.30) + math.exp(0.10) + math.exp(0.20))
    assert weight.tolist() == pytest.approx([first, 1 / 3], rel=1e-6)


def test_ueo_adapt_runs_the_new_method(entmin_mcm, tmp_path, image_folder, classes_file, capsys):
    make_folder(image_folder, per_class=2)
    out = tmp_path / "run"
    argv = ["adapt", "--model", "test-tiny-rn", "--pretrained", "none", "--data", image_folder]
    argv += ["--classes", classes_file, "--method", "entmin-mcm", "--epochs", "1"]
    argv += ["--batch-size", "8", "--out", out, "--workers", "0", "--quiet", "--device", "cpu"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    record = json.loads((out / "metrics.json").read_text())
    assert record["recipe"]["method"] == "entmin-mcm"
    assert len(record["history"]) == 1
