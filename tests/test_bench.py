"""`ueo bench`: a whole grid over a fake Office-Home tree, its report, and resuming."""

import csv
import json

import numpy as np
import pytest
from conftest import draw

import ueo.sweep
from ueo.benchmarks import class_names
from ueo.cli import main


@pytest.fixture
def officehome(tmp_path):
    """Two Office-Home domains in the download layout, one or two images per real class."""
    rng = np.random.default_rng(0)
    root = tmp_path / "OfficeHome"
    styles = ["red square", "green_circle", "blue stripes", "yellow cross", "black noise"]
    for domain in ("Art", "Clipart"):
        for i, name in enumerate(class_names("officehome")):
            folder = root / domain / name.title()
            folder.mkdir(parents=True)
            for j in range(1 + i % 2):
                draw(styles[i % len(styles)], rng, size=24).save(folder / f"{j:05d}.jpg")
    return root


def bench_args(root, out, *extra):
    return [
        "bench",
        "--dataset",
        "officehome",
        "--root",
        str(root),
        "--domains",
        "Art,Clipart",
        "--scenarios",
        "CDA,ODA",
        "--methods",
        "zeroshot,ueo",
        "--seeds",
        "1,2",
        "--model",
        "test-tiny-rn",
        "--pretrained",
        "none",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def test_bench_grid_report_and_resume(officehome, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    zeroshot_passes = []
    real_infer = ueo.sweep.infer
    monkeypatch.setattr(
        ueo.sweep, "infer", lambda *a, **k: zeroshot_passes.append(k["desc"]) or real_infer(*a, **k)
    )
    assert main(bench_args(officehome, out)) == 0
    # One zero-shot pass per domain, shared by both scenarios, all methods and seeds.
    assert zeroshot_passes == ["zero-shot Art", "zero-shot Clipart"]

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 * 2 * 2 * 2
    assert {r["scenario"] for r in table} == {"CDA", "ODA"}
    oda = [r for r in table if r["scenario"] == "ODA"]
    assert all(0 <= float(r["test_auroc"]) <= 1 for r in oda)
    # The test set holds all 65 classes in every scenario (known ones are ID).
    metrics = json.loads((out / "runs/Art/CDA/ueo/seed1/metrics.json").read_text())
    n_images = sum(1 + i % 2 for i in range(65))
    assert metrics["adapted"]["test"]["n"] == n_images
    assert metrics["adapted"]["unlabeled"]["n_ood"] == 0
    oda_metrics = json.loads((out / "runs/Art/ODA/ueo/seed1/metrics.json").read_text())
    assert oda_metrics["adapted"]["unlabeled"]["n_ood"] == sum(1 + i % 2 for i in range(50, 60))
    assert (out / "runs/Art/ODA/ueo/seed2/adapter.safetensors").is_file()
    # Each cell has its log, epochs included; the terminal got no per-epoch lines.
    assert "epoch 1/1 loss" in (out / "runs/Art/ODA/ueo/seed2/log.txt").read_text()
    err = capsys.readouterr().err
    assert "[16/16] Clipart ODA ueo seed 2" in err and "epoch 1/1 loss" not in err

    md = (out / "results.md").read_text()
    assert "## ODA — AUROC" in md and "| Art | Clipart | Avg |" in md and " ± " in md
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["mean"]) == {"CDA", "ODA"}
    assert set(summary["mean"]["ODA"]) == {"zeroshot", "ueo"}
    for scenario in ("CDA", "ODA"):
        png = out / "plots" / f"{scenario}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Resume: nothing is recomputed, results are identical.
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/**/metrics.json")}
    monkeypatch.setattr(ueo.sweep, "adapt", lambda *a, **k: pytest.fail("recomputed a cell"))
    zeroshot_passes.clear()
    assert main(bench_args(officehome, out)) == 0
    assert zeroshot_passes == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/**/metrics.json")} == before

    capsys.readouterr()
    assert main(bench_args(officehome, out, "--dry-run", "--seeds", "1,3")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("done") for line in lines) == 8
    assert sum(line.startswith("todo") for line in lines) == 8


def test_bench_custom_folder(image_folder, tmp_path, capsys):
    classes = tmp_path / "all.txt"
    classes.write_text("red square\ngreen_circle\nblue stripes\nyellow cross\nblack noise\n")
    out = tmp_path / "custom"
    args = [
        "bench",
        "--data",
        str(image_folder),
        "--classes",
        str(classes),
        "--known",
        "3",
        "--methods",
        "zeroshot,infomax",
        "--model",
        "test-tiny-vit",
        "--pretrained",
        "none",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["mean"]) == {"CDA", "PDA", "ODA", "OPDA"}
    # ODA adds ceil(2/3 * 2) = 2 unknown classes of 6 images each to the 3 known ones.
    oda = json.loads((out / "runs/images/ODA/infomax/seed2023/metrics.json").read_text())
    assert oda["adapted"]["unlabeled"]["n_ood"] == 12
    i = args.index("--known")
    assert main(args[:i] + ["--known-classes", "nope"] + args[i + 2 :]) == 2
    assert "not in --classes" in capsys.readouterr().err


def test_bench_errors(officehome, tmp_path, capsys):
    base = ["bench", "--model", "test-tiny-rn", "--pretrained", "none", "--out", str(tmp_path)]
    assert main(base + ["--dataset", "officehome"]) == 2
    assert (
        main(base + ["--dataset", "officehome", "--root", str(officehome), "--domains", "Product"])
        == 2
    )
    assert "Product" in capsys.readouterr().err
    assert (
        main(
            base
            + [
                "--dataset",
                "officehome",
                "--root",
                str(officehome),
                "--domains",
                "Art",
                "--methods",
                "magic",
            ]
        )
        == 2
    )
    assert "magic" in capsys.readouterr().err
