"""`ueo demo --quick`: the offline demo end to end, on the bundled model and the testbed."""

import json

from ueo.cli import main
from ueo.demo import METHODS, SCENARIOS
from ueo.metrics import METRIC_NAMES


def test_quick_demo_writes_valid_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UEO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ueo" in printed and "AUROC" in printed

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"mean", "domains", "settings"}
    assert list(results["mean"]) == SCENARIOS
    assert len(results["domains"]) == 1
    for scenarios in [results["mean"], *results["domains"].values()]:
        for scenario in SCENARIOS:
            assert list(scenarios[scenario]) == METHODS
            for metrics in scenarios[scenario].values():
                assert set(metrics) == set(METRIC_NAMES)
                for value in metrics.values():
                    assert value is None or 0.0 <= value <= 1.0
                # The test split holds unknown classes in every scenario: AUROC is defined.
                assert metrics["auroc"] is not None
    assert results["settings"]["model"] == "ueo-tiny-rn"
    assert results["settings"]["pretrained"] == "bundled"
    # The bundled model does better than chance (10 known classes, 50% AUROC) zero-shot.
    zeroshot = results["mean"]["CDA"]["zeroshot"]
    assert zeroshot["acc"] > 0.2 and zeroshot["auroc"] > 0.55

    for name in [
        "results.md",
        "results.csv",
        "plots/roc.png",
        "plots/mcm_histograms.png",
        *(f"plots/{s}.png" for s in SCENARIOS),
    ]:
        assert (out / name).stat().st_size > 0, name
