"""The benchmark scripts run end to end on a tiny model (their numbers, not their timings)."""

import json
import sys
from pathlib import Path

import pytest

from ueo.errors import UeoError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import batch_finish  # noqa: E402
import epoch_speed  # noqa: E402
import step_speed  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("model", ["test-tiny-rn", "test-tiny-vit"])
def test_step_speed_reference_and_ueo_steps_agree(model, capsys):
    assert (
        step_speed.main(
            ["--model", model, "--classes", "65", "--batch", "4", "--device", "cpu", "--json"]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["model"] == model and record["classes"] == 65
    # Same numbers from the plain full-length step and ueo's step, and not trivially so.
    assert record["max_abs_loss_diff_3_steps"] < 1e-5
    assert record["max_abs_param_diff_after_3_steps"] < 1e-5
    assert record["max_abs_param_change_after_3_steps"] > 1e-5
    assert record["first_grad_norm"] > 1e-6
    assert record["reference_s_per_step"] > 0 and record["ueo_s_per_step"] > 0


def test_epoch_speed_reports_three_rates(tmp_path, capsys):
    assert (
        epoch_speed.main(
            [
                "--model",
                "test-tiny-rn",
                "--images",
                "24",
                "--batch",
                "8",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--folder",
                str(tmp_path / "jpegs"),
                "--json",
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["images"] == 24
    for key in ("loader_images_per_s", "model_images_per_s", "epoch_images_per_s"):
        assert record[key] > 0
    assert len(list((tmp_path / "jpegs").glob("*.jpg"))) == 24


def test_batch_finish_compares_equal_batches(capsys):
    try:
        code = batch_finish.main(["--passes", "1", "--limit", "150", "--json"])
    except UeoError as exc:
        pytest.skip(f"testbed data not installed: {exc}")
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and record["equal"] and record["images"] == 150
    assert record["per_image_s"] > 0 and record["per_batch_s"] > 0


def test_discover_eval_scores_every_variant_of_a_demo_cell(tmp_path, capsys):
    """An untrained UEO cell of the demo's layout (blur, ODA): every variant is scored."""
    import discover_eval

    from ueo.api import adapt, load_model, save_run
    from ueo.bench.sweep import Cell
    from ueo.demo.runner import testbed_suite
    from ueo.demo.testbed import build_testbed
    from ueo.recipe import Recipe, Runtime

    try:
        suite = testbed_suite(build_testbed())
    except UeoError as exc:
        pytest.skip(f"testbed data not installed: {exc}")
    cell = Cell("blur", "ODA", "ueo", Recipe().seed)
    known, unlabeled, _ = suite.scenario_sets(suite.domain("blur"), "ODA")
    model = load_model("ueo-tiny-rn", "bundled", known)
    runtime = Runtime(device="cpu", workers=0, progress=False)
    save_run(cell.path(tmp_path), model, adapt(model, unlabeled, Recipe(epochs=0), runtime))
    assert discover_eval.main(["--runs", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "discover_eval" / "discover_eval.json").read_text())
    (only,) = record["cells"]
    assert (only["domain"], only["scenario"], only["images"]) == ("blur", "ODA", len(unlabeled))
    variants = only["variants"]
    assert len(variants) == 5 and "per-image naming (no clusters)" in variants
    for scores in variants.values():
        assert scores["true_k"] == 4 and scores["rejected"] > 0
        for key in ("cluster_acc", "nmi", "ari", "name_top1", "name_top5"):
            assert 0.0 <= scores[key] <= 1.0, key
    true_k = next(v for name, v in variants.items() if name.startswith("true k: unknown"))
    assert true_k["k"] == 4
    assert "| ueo discover (silhouette) |" in capsys.readouterr().out


def test_discover_cost_measures_its_three_parts(tmp_path, capsys):
    import discover_cost

    vocabulary = tmp_path / "names.txt"
    vocabulary.write_text("\n".join(f"thing {i}" for i in range(40)))
    argv = ["--model", "test-tiny-rn", "--pretrained", "none", "--vocabulary", str(vocabulary)]
    argv += ["--names", "30", "--images", "200", "--pass-images", "4", "--json"]
    argv += ["--folder", str(tmp_path / "jpegs")]
    assert discover_cost.main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["names"] == 30 and record["images"] == 200 and 2 <= record["k"] <= 15
    for key in ("encode_s", "cached_read_s", "image_pass_s", "groups_s"):
        assert record[key] > 0
