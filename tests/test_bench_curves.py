"""`ueo bench --eval-every`: learning curves in results.json and plots/curves_<scenario>.png."""

import json

import pytest
from conftest import run_curves_grid, seeded_calibrated_clip

import ueo.bench.sweep
from ueo.bench.plan import Cell
from ueo.bench.results import learning_curves
from ueo.clip import load_clip

PNG = b"\x89PNG\r\n\x1a\n"


def test_bench_plots_learning_curves(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(ueo.bench.sweep, "load_clip", seeded_calibrated_clip(load_clip))
    out = run_curves_grid(image_folder, tmp_path, "zeroshot,ueo")

    for scenario in ("CDA", "ODA"):
        assert (out / "plots" / f"curves_{scenario}.png").read_bytes()[:8] == PNG
        assert (out / "plots" / f"label_free_{scenario}.png").read_bytes()[:8] == PNG
    report = json.loads((out / "results.json").read_text())
    curves = report["curves"]["ODA"]
    assert list(curves["ueo"]) == ["0", "1", "2"]
    assert list(curves["zeroshot"]) == ["0"]
    cell = json.loads((out / "runs/images/ODA/ueo/seed2023/metrics.json").read_text())
    assert [c["epoch"] for c in cell["curves"]] == [0, 1, 2]
    for point in cell["curves"]:  # one domain, one seed: the curve is the cell's
        expected = {k: point["test"][k] for k in ("acc", "auroc")}
        assert curves["ueo"][str(point["epoch"])] == pytest.approx(expected)
    assert curves["ueo"]["2"]["acc"] == pytest.approx(report["mean"]["ODA"]["ueo"]["acc"])
    assert curves["ueo"]["0"] == pytest.approx(curves["zeroshot"]["0"])
    assert curves["ueo"]["1"] != curves["ueo"]["0"]
    # the label-free scores of the unlabeled set, per epoch, as the cells hold them
    scores = report["label_free_curves"]["ODA"]
    assert list(scores["ueo"]) == ["0", "1", "2"]
    for point in cell["curves"]:
        assert scores["ueo"][str(point["epoch"])] == pytest.approx(point["label_free"])


def record(*epochs, acc=0.5):
    point = {"acc": acc, "auroc": 0.7}
    return {"curves": [{"epoch": e, "test": point, "unlabeled": point} for e in epochs]}


def test_curves_only_with_epochs_between_zero_shot_and_the_end():
    """Without --eval-every a cell holds epoch 0 and its last epoch only: no curve to draw."""
    plain = [
        (Cell("a", "ODA", "ueo", 1), record(0, 5)),
        (Cell("a", "ODA", "zeroshot", 1), record(0)),
    ]
    assert learning_curves(plain) == {}
    results = [
        (Cell("a", "ODA", "ueo", 1), record(0, 2, 4, acc=0.2)),
        (Cell("a", "ODA", "ueo", 2), record(0, 2, 4, acc=0.4)),
        (Cell("b", "ODA", "ueo", 1), record(0, 2, 4, acc=0.9)),
        (Cell("a", "CDA", "ueo", 1), record(0, 4)),
    ]
    curves = learning_curves(results)
    assert set(curves) == {"ODA"}
    # seeds averaged within a domain (0.3), then domains averaged with b (0.9)
    assert curves["ODA"]["ueo"][2]["acc"] == pytest.approx(0.6)
    assert list(curves["ODA"]["ueo"]) == [0, 2, 4]
