"""`ueo demo --quick`: the offline demo end to end, on the bundled model and the testbed.

The testbed (~15,000 PNGs) is built once and reused between runs: the demo's own cache
(`$UEO_CACHE`, default ~/.cache/ueo), which `build_testbed` reuses when it is complete and made
with the same settings, so `make demo` and the tests share one build.
"""

import json

import pytest
import torch

from ueo.bench.protocol import PAPER_SCENARIOS
from ueo.cli import main
from ueo.demo.runner import demo_methods
from ueo.demo.testbed import build_testbed, default_root
from ueo.errors import UeoError
from ueo.metrics import METRIC_NAMES


@pytest.fixture(scope="module")
def testbed():
    """The full testbed in the persistent cache: built on the first run only."""
    try:
        return build_testbed(default_root())
    except UeoError as exc:
        pytest.skip(f"testbed data not installed: {exc}")


@pytest.fixture(scope="module")
def quick_demo(testbed, tmp_path_factory):
    """One run of `ueo demo --quick`, on one intra-op thread (many times faster on a small,
    shared CPU; see conftest's `single_thread`)."""
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["demo", "--quick", "--quiet", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return code, out, json.loads((out / "results.json").read_text())


def test_quick_demo_writes_valid_results(quick_demo, testbed):
    code, out, results = quick_demo
    assert code == 0
    assert set(results) == {
        "mean",
        "domains",
        "settings",
        "curves",
        "label_free_curves",
        "missing",
        "environment",
        "differences",
    }
    assert results["differences"] == [] and results["environment"]["torch"]
    assert results["missing"] == []  # every cell of the grid is in the report
    assert list(results["mean"]) == list(PAPER_SCENARIOS)
    assert list(results["domains"]) == [next(iter(testbed.domains))]  # --quick: one domain
    for scenarios in [results["mean"], *results["domains"].values()]:
        for scenario in PAPER_SCENARIOS:
            assert list(scenarios[scenario]) == demo_methods()
            for metrics in scenarios[scenario].values():
                assert set(metrics) == set(METRIC_NAMES)
                for value in metrics.values():
                    assert value is None or 0.0 <= value <= 1.0
                # The test split holds unknown classes in every scenario: AUROC is defined.
                assert metrics["auroc"] is not None
    assert results["settings"]["model"] == "ueo-tiny-rn"
    assert results["settings"]["pretrained"] == "bundled"
    for name in [
        "results.md",
        "results.csv",
        "plots/roc.png",
        "plots/mcm_histograms.png",
        *(f"plots/{s}.png" for s in PAPER_SCENARIOS),
    ]:
        assert (out / name).stat().st_size > 0, name


def test_adaptation_changes_the_demo_results(quick_demo):
    _, _, results = quick_demo
    mean = results["mean"]
    zeroshot = mean["CDA"]["zeroshot"]
    # The bundled model does better than chance (10 known classes, 50% AUROC) zero-shot...
    assert zeroshot["acc"] > 0.2 and zeroshot["auroc"] > 0.55
    # ...and UEO improves on it: by ~22 points of ACC and ~10 of AUROC (--quick, blur).
    ueo = mean["CDA"]["ueo"]
    assert ueo["acc"] > zeroshot["acc"] + 0.05
    assert ueo["auroc"] > zeroshot["auroc"] + 0.02
    for scenario in PAPER_SCENARIOS:
        # The zero-shot model is one model: every scenario evaluates it on the same test set.
        assert mean[scenario]["zeroshot"] == zeroshot
        # Every trained method changed the numbers.
        for method in demo_methods():
            if method != "zeroshot":
                assert mean[scenario][method] != mean[scenario]["zeroshot"], (scenario, method)
        assert mean[scenario]["ueo"]["h"] > mean[scenario]["zeroshot"]["h"], scenario


def test_the_demo_discovers_what_ueo_rejects_in_the_open_set_scenarios(quick_demo, testbed):
    """`ueo discover` in the ODA and OPDA cells of UEO: files per cell, a summary with scores
    against the truth. The vocabulary is the 5 unknown class names, so every named group
    carries one of them."""
    _, out, _ = quick_demo
    summary = json.loads((out / "discover" / "summary.json").read_text())
    domain = next(iter(testbed.domains))
    assert [(c["domain"], c["scenario"]) for c in summary["cells"]] == [
        (domain, "ODA"),
        (domain, "OPDA"),
    ]
    unknown = set(testbed.class_names[testbed.known :])
    for cell in summary["cells"]:
        folder = out / "discover" / domain / cell["scenario"]
        for name in ("clusters.csv", "clusters.md", "discover.json", "sheets/cluster-01.png"):
            assert (folder / name).stat().st_size > 0, name
        named = [n for n, _ in cell["names"] if n]
        assert named and set(named) <= unknown and len(named) == len(set(named))
        assert cell["rejected"] == sum(size for _, size in cell["names"]) > 0
        # Most rejected images are grouped, and those of unknown classes named, right
        # (--quick, blur, measured: cluster accuracy 71-77%, naming 75-86%).
        assert cell["true_k"] == 4 and cell["cluster_acc"] > 0.5 and cell["name_top1"] > 0.5


def test_the_testbed_is_reused(testbed):
    manifest = testbed.root / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert build_testbed(testbed.root) == testbed
    assert manifest.stat().st_mtime_ns == before
