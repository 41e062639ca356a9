"""The benchmark scripts run end to end on a tiny model (their numbers, not their timings)."""

import json
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from conftest import run_curves_grid

from ueo.errors import UeoError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import batch_finish  # noqa: E402
import diagnostics_check  # noqa: E402
import diagnostics_cost  # noqa: E402
import epoch_speed  # noqa: E402
import export_speed  # noqa: E402
import frozen_norm  # noqa: E402
import gpu_table  # noqa: E402
import step_speed  # noqa: E402
import upl_precision  # noqa: E402

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


def test_step_speed_low_precision_and_profile(tmp_path, capsys):
    """The GPU benchmark's extra figures, on the CPU: the reference and ueo's step under the
    same autocast, back to back, and a profiler table."""
    argv = ["--model", "test-tiny-vit", "--classes", "65", "--batch", "4", "--device", "cpu"]
    argv += ["--precision", "bf16", "--profile", str(tmp_path), "--json"]
    assert step_speed.main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["reference_s_per_step_bf16"] > 0 and record["ueo_s_per_step_bf16"] > 0
    assert record["images_per_s_ueo_bf16"] > 0 and record["speedup_bf16"] > 0
    profile = record["profile"]
    assert profile["aten_ops_per_step"] > 100 and profile["wall_ms_per_step"] > 0
    assert "aten::" in Path(profile["table"]).read_text()


def test_frozen_norm_forms_agree_and_the_table_reads_them(tmp_path, capsys):
    """The BatchNorm lead of the GPU benchmark: ueo's step with the frozen affine form gives
    PyTorch's numbers to float rounding (and the tuned tensors did move), with a profile of
    each form; gpu.sh's table prints the comparison."""
    argv = ["--model", "test-tiny-rn", "--classes", "65", "--batch", "4", "--device", "cpu"]
    argv += ["--steps", "1", "--repeats", "1", "--profile", str(tmp_path), "--json"]
    assert frozen_norm.main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["batchnorm_layers"] > 0
    assert record["max_abs_loss_diff_3_steps_fp32"] < 1e-5
    assert record["max_abs_param_diff_after_3_steps_fp32"] < 1e-5
    for form in ("native", "affine"):
        assert record[f"{form}_s_per_step"] > 0
        assert record["profile_per_step"][form]["aten_ops_per_step"] > 100
    ops = {k: v["aten_ops_per_step"] for k, v in record["profile_per_step"].items()}
    assert ops["affine"] > ops["native"]  # the affine form is more ops in eager mode
    (tmp_path / "frozen_norm.json").write_text(line + "\n")
    assert gpu_table.main([str(tmp_path)]) == 0
    assert "BatchNorm as a frozen affine op (test-tiny-rn, 65 classes, fp32)" in (
        capsys.readouterr().out
    )
    with pytest.raises(SystemExit, match="no BatchNorm"):
        frozen_norm.main([*argv[:1], "test-tiny-vit", *argv[2:]])


def test_epoch_speed_reports_rates_and_decodes_each_image_once(tmp_path, capsys):
    """Loader (decoding, then from the store), model and whole epochs; with a loader worker,
    the first epoch decodes every JPEG and the later ones none."""
    argv = ["--model", "test-tiny-rn", "--images", "24", "--batch", "8", "--workers", "1"]
    argv += ["--device", "cpu", "--folder", str(tmp_path / "jpegs"), "--json"]
    assert epoch_speed.main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["images"] == 24
    rates = ["loader_cold_images_per_s", "loader_images_per_s", "model_images_per_s"]
    for key in [*rates, "first_epoch_images_per_s", "epoch_images_per_s", "epoch_vs_model"]:
        assert record[key] > 0
    assert record["loader_decodes"] == [24, 0] and record["decodes_per_epoch"] == [24, 0, 0]
    assert record["bound_by"] in ("loader", "model") and record["finish_exact"] is None
    assert len(list((tmp_path / "jpegs").glob("*.jpg"))) == 24
    assert epoch_speed.main([*argv, "--loader-only", "--epochs", "1"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["loader_decodes"] == [24, 0] and "model_images_per_s" not in record


def test_batch_finish_compares_equal_batches(capsys):
    try:
        code = batch_finish.main(["--passes", "1", "--limit", "150", "--json"])
    except UeoError as exc:
        pytest.skip(f"testbed data not installed: {exc}")
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and record["equal"] and record["images"] == 150
    assert record["per_image_s"] > 0 and record["per_batch_s"] > 0


def test_upl_precision_counts_what_fp16_ranking_changes(capsys):
    """UPL's selection rule emulated in fp64 keeps exactly ueo's images; ranking rounded to fp16
    keeps others once many confidences round to 1.0, and only then."""
    argv = ["--images", "600", "--classes", "6", "--boosts", "0.05,0.25", "--seeds", "2"]
    assert upl_precision.main([*argv, "--json"]) == 0
    low, high = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    for record in (low, high):
        assert record["kept"] == [96, 96] and record["fp64"] == [0, 0]
    assert low["near_one"] == [0, 0] and low["fp16_confidences"] == [0, 0]
    assert min(high["near_one"]) > 6 * 16  # more images at "1.0" than a class keeps
    assert min(high["fp16_confidences"]) > 0 and min(high["fp16_logits"]) > 0


def test_weighted_spearman_by_hand():
    """Musgrave et al.'s weighted Spearman on three checkpoints, worked out with fractions.

    Scores 1, 2, 3 against accuracies 1, 3, 2: normalised dense ranks (1/3, 2/3, 1) and
    (1/3, 1, 2/3), weights max(...)^2 = (1/9, 1, 1); weighted ranks (weight below plus the
    own weight, no ties) (1/9, 10/9, 19/9) for the scores and (1/9, 19/9, 10/9) for the
    accuracies; then their weighted Pearson correlation."""
    w = [Fraction(1, 9), Fraction(1), Fraction(1)]
    rx = [Fraction(1, 9), Fraction(10, 9), Fraction(19, 9)]
    ry = [Fraction(1, 9), Fraction(19, 9), Fraction(10, 9)]
    mx = sum(a * b for a, b in zip(w, rx, strict=True)) / sum(w)
    my = sum(a * b for a, b in zip(w, ry, strict=True)) / sum(w)
    cov = sum(a * (x - mx) * (y - my) for a, x, y in zip(w, rx, ry, strict=True))
    vx = sum(a * (x - mx) ** 2 for a, x in zip(w, rx, strict=True))
    vy = sum(a * (y - my) ** 2 for a, y in zip(w, ry, strict=True))
    assert vx == vy and cov / vx == Fraction(-5, 14)
    got = diagnostics_check.weighted_spearman([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert got == pytest.approx(-5 / 14)
    # Spearman's rho is +0.5 here: weighted, the swap at the top outweighs the bottom's match.
    # Unweighted (power 0) it is Spearman's rho, ties included.
    from scipy.stats import spearmanr

    x, y = [1.0, 2.0, 2.0, 4.0, 5.0, 3.0], [2.0, 1.0, 4.0, 4.0, 6.0, 3.0]
    assert diagnostics_check.weighted_spearman(x, y, power=0) == pytest.approx(spearmanr(x, y)[0])
    assert diagnostics_check.weighted_spearman(x, x) == pytest.approx(1.0)


def test_diagnostics_check_reads_a_grid_with_learning_curves(
    image_folder, tmp_path, capsys, calibrated_loads
):
    out = run_curves_grid(image_folder, tmp_path, "zeroshot,ueo,entmin")
    capsys.readouterr()
    result_file = tmp_path / "check.json"
    args = ["--out", str(out), "--analyse-only", "--json", str(result_file)]
    assert diagnostics_check.main(args) == 0
    text = capsys.readouterr().out
    result = json.loads(result_file.read_text())
    # 2 tasks: one zero-shot checkpoint each, and 2 methods x 2 epochs
    assert result["tasks"] == 2 and result["checkpoints"] == 2 * (1 + 2 * 2)
    assert result["signs"]["runs"] == 4
    for key in ("snd", "nuclear", "mcm_split"):
        assert set(result["correlations"][key]["h"]["spearman"]) == {
            "images",
            "CDA",
            "ODA",
            "all",
            "pooled",
        }
        assert result["selection"][key]["tasks"] == 2
    assert result["selection"]["agreement"]["picked_zeroshot"] == 2  # 1.0 at zero-shot only
    assert "### Pairs of checkpoints" in text and "| nuclear norm |" in text


def test_diagnostics_cost_times_scores_beside_an_evaluation(capsys):
    try:
        code = diagnostics_cost.main(["--repeats", "1", "--skip-larger", "--json"])
    except UeoError as exc:
        pytest.skip(f"testbed data not installed: {exc}")
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    t = record["testbed"]
    assert code == 0 and t["unlabeled"] > 0 and t["images"] > t["unlabeled"]
    assert t["evaluation_s"] > 0 and t["label_free_s"] > 0
    assert t["ratio"] == pytest.approx(t["label_free_s"] / t["evaluation_s"])


def test_discover_eval_scores_every_variant_of_a_demo_cell(tmp_path, capsys):
    """An untrained UEO cell of the demo's layout (blur, ODA): every variant is scored."""
    import discover_eval

    from ueo.api import adapt, load_model, save_run
    from ueo.bench.plan import Cell
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


def test_export_speed_compares_the_runner_with_ueo_predict(tmp_path, capsys):
    """The export benchmark on its own generated folder (a tiny model adapted here): every
    image answered alike by `ueo predict` and `python -m ueo.deploy`, and by plain open_clip."""
    argv = ["--models", "ueo-tiny-rn", "--own", "14", "--no-speed", "--json"]
    assert export_speed.main([*argv, "--work", str(tmp_path)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["case"] == "own/ueo-tiny-rn" and row["images"] == 16 and row["rows"] == 14
    assert row["pred_differ"] == 0 and row["unknown_differ"] == 0
    assert row["max_abs_prob"] <= 1e-4 and row["max_abs_mcm"] <= 1e-5
    assert row["open_clip_max_abs_cos"] <= 1e-5 and row["self_check"]["checked"]


def test_stream_eval_streams_the_testbed_and_compares_with_predict(tmp_path, capsys):
    """Two domains, 30 images a stream: every stream and method is scored online, the running
    threshold replays to the flags written, the continual stream has a segment per domain,
    and the speed comparison times predict and the stream."""
    import stream_eval

    argv = ["--out", str(tmp_path), "--demo", str(tmp_path / "no-demo"), "--limit", "30"]
    argv += ["--domains", "blur,noise", "--methods", "zeroshot,ueo", "--batches", "8"]
    try:
        code = stream_eval.main([*argv, "--speed-repeats", "1", "--json"])
    except UeoError as exc:
        pytest.skip(f"testbed data not installed: {exc}")
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = record["results"]
    assert code == 0 and len(results) == 5 * 2  # (2 domains x ODA, OPDA + continual) x 2
    for r in results:
        assert r["offline"] is None  # no demo run given
        assert r["online"]["auroc"] is not None and r["images_per_s"] > 0
        assert r["otsu"]["batches"] >= -(-r["images"] // 8)
        assert r["otsu"]["equal"] == r["otsu"]["batches"] and r["otsu"]["rows"] == 0
    continual = [r for r in results if r["continual"]]
    assert [s["domain"] for s in continual[0]["segments"]] == ["blur", "noise"]
    zeroshot = [r for r in results if r["method"] == "zeroshot"]
    adapted = [r for r in results if r["method"] == "ueo"]
    assert [z["online"] for z in zeroshot] != [a["online"] for a in adapted]
    speed = record["speed"]
    assert speed["images"] == 60 and speed["ratio_of_medians"] > 0
    assert "offline" not in (tmp_path / "stream_eval.md").read_text()


def test_scaling_runs_each_command_and_tables_its_growth(tmp_path):
    """benchmarks/scaling.py's pieces on 36 images: the tree, the DomainNet-shaped lists, a
    child of every command (in this process) and the table's growth column."""
    import scaling

    classes = scaling.known_classes()
    images = scaling.build(tmp_path, 36, classes)
    assert len(list(images.rglob("*.png"))) == 36 and (tmp_path / "n36" / "complete").is_file()
    scaling.make_adapter(tmp_path, classes, n=36)
    rows = [scaling.child(c, 36, tmp_path, tmp_path) for c in scaling.COMMANDS]
    for row in rows:
        assert row["images"] == 36 and row["total_s"] >= row["fixed_s"] >= 0, row
        assert row["listing_s"] is not None and row["peak_rss_mb"] >= row["peak_private_mb"] > 0
    lists = tmp_path / "n36" / "domainnet-lists"
    listed = sum(len(p.read_text().splitlines()) for p in lists.glob("*_t*.txt"))
    assert listed == 36 and len(list(lists.glob("*.txt"))) == 12
    bigger = [{**r, "images": 72, "per_image_part_s": 4 * r["per_image_part_s"]} for r in rows]
    table = scaling.table(rows + bigger)
    assert table.count("| 2.00 |") == len(scaling.COMMANDS)  # twice the time per image


def test_distributed_tolerance_compares_two_runs(tmp_path):
    """The comparison of benchmarks/distributed_tolerance.py: a run against itself and
    against a run whose tensor moved."""
    import shutil

    import distributed_tolerance
    import numpy as np
    from conftest import untrained_run
    from safetensors.numpy import load_file, save_file

    run = untrained_run(tmp_path)["adapter"]
    same = distributed_tolerance.compare(run, run)
    assert same == {
        "max_abs": 0.0,
        "max_rel": 0.0,
        "metrics_equal": True,
        "max_metric_diff": 0.0,
        "threshold_diff": 0.0,
    }
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    tensors = load_file(str(moved / "adapter.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + np.float32(1e-3)
    save_file(tensors, str(moved / "adapter.safetensors"))
    assert distributed_tolerance.compare(run, moved)["max_abs"] == pytest.approx(1e-3, rel=1e-3)
    assert len(list(distributed_tolerance.make_images(tmp_path / "img").rglob("*.png"))) == 64
