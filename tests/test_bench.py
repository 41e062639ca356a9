"""`ueo bench`: a whole grid over a fake Office-Home tree, its report, resuming, shards, and
what makes a finished cell reusable (its recipe, never its runtime)."""

import csv
import json
import logging
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from conftest import CLASSES, UNKNOWN, draw
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import ueo.bench.sweep
from ueo.bench.cells import cell_components, cell_fingerprint, status
from ueo.bench.grid import bench_recipe, parse_shard
from ueo.bench.jobs import bench
from ueo.bench.plan import Cell, Domain, Suite, Sweep, cell_costs, plan, split
from ueo.bench.protocol import DATASETS, PAPER_SCENARIOS, class_names
from ueo.bench.scores import load_scores
from ueo.bench.suites import folder_suite
from ueo.bench.sweep import run_sweep
from ueo.cli import build_parser, main
from ueo.data import ImageSet
from ueo.errors import UeoError
from ueo.fingerprint import digest
from ueo.methods import METHODS, Method, get_method, method_names
from ueo.recipe import Recipe, Runtime

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Model .* has RANDOM weights"),
]


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
    real_infer = ueo.bench.sweep.infer
    monkeypatch.setattr(
        ueo.bench.sweep,
        "infer",
        lambda *a, **k: zeroshot_passes.append(k["desc"]) or real_infer(*a, **k),
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
    monkeypatch.setattr(ueo.bench.sweep, "adapt", lambda *a, **k: pytest.fail("recomputed a cell"))
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
        "--all-classes",
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
    assert "not in --all-classes" in capsys.readouterr().err


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


# --- the grid, shards and policy, without running a model --------------------------------------


def small_suite(domains=("a", "b", "c")) -> Suite:
    """A suite with no images: enough for planning (5 classes, 3 known)."""
    empty = ImageSet([], [])
    splits = {
        "CDA": {"known": [0, 1, 2], "unlabeled": [0, 1, 2], "test": [0, 1, 2, 3, 4]},
        "ODA": {"known": [0, 1, 2], "unlabeled": [0, 1, 2, 3], "test": [0, 1, 2, 3, 4]},
        "PDA": {"known": [0, 1, 2], "unlabeled": [0, 1], "test": [0, 1, 2, 3, 4]},
    }
    names = ["v", "w", "x", "y", "z"]
    return Suite("small", names, [Domain(d, empty, empty) for d in domains], splits)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_shards_cover_the_grid_exactly_once(n):
    suite = small_suite()
    sweep = Sweep(
        "test-tiny-rn",
        "none",
        scenarios=["CDA", "ODA", "PDA"],
        methods=["zeroshot", "ueo"],
        seeds=[1, 2],
    )
    grid = plan(suite, sweep)
    assert len(grid) == len(set(grid)) == 3 * 3 * 2 * 2
    shards = [plan(suite, replace(sweep, shard=(k, n))) for k in range(n)]
    together = [cell for shard in shards for cell in shard]
    assert sorted(together, key=grid.index) == grid  # every cell, none twice
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    # Each shard keeps the grid's order (domain-major, so zero-shot passes are shared).
    for shard in shards:
        assert shard == [c for c in grid if c in shard]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.5, 1000, allow_nan=False), min_size=0, max_size=40),
    st.integers(1, 9),
)
def test_split_gives_contiguous_parts_of_about_equal_work(costs, n):
    parts = split(costs, n)
    assert len(parts) == n
    assert [i for part in parts for i in part] == list(range(len(costs)))  # in order, once
    if costs:
        share, largest = sum(costs) / n, max(costs)
        for part in parts:
            assert abs(sum(costs[i] for i in part) - share) <= largest + 1e-9 * sum(costs)
    sizes = [len(part) for part in split([1.0] * len(costs), n)]
    assert max(sizes) - min(sizes) <= 1


def test_shards_share_out_work_not_cells():
    """A large domain's cells are worth more than a small one's, a training method's more
    than zero-shot's: a shard is a contiguous part of the grid with its share of the work."""

    def images(n: int) -> ImageSet:
        return ImageSet([f"{i}.png" for i in range(n)], [i % 3 for i in range(n)])

    suite = small_suite()
    suite.domains = [Domain(d, images(n), images(n)) for d, n in [("a", 300), ("b", 30), ("c", 30)]]
    sweep = Sweep("test-tiny-rn", "none", Recipe(epochs=2), scenarios=["CDA"], seeds=[1])
    grid = plan(suite, replace(sweep, methods=["zeroshot", "ueo"]))
    # Evaluation of both sets, and three passes per unlabeled image and epoch of training.
    assert cell_costs(suite, sweep, grid[:2]) == [600, 600 + 3 * 2 * 300]
    sweep = replace(sweep, methods=["ueo"])
    grid = plan(suite, sweep)
    assert cell_costs(suite, sweep, grid) == [2400, 240, 240]
    halves = [plan(suite, replace(sweep, shard=(k, 2))) for k in range(2)]
    assert halves == [grid[:1], grid[1:]]  # 2400 and 480, not two cells and one (2640, 240)


def test_shard_values_are_checked():
    assert parse_shard("1/2") == (1, 2)
    for bad in ("2/2", "-1/2", "0/0", "1", "a/b", "1/2/3"):
        with pytest.raises(UeoError, match="K/N"):
            parse_shard(bad)
    with pytest.raises(UeoError, match="shard"):
        plan(small_suite(), Sweep("test-tiny-rn", "none", scenarios=["CDA"], shard=(2, 2)))


def test_grid_is_checked_before_anything_runs():
    suite = small_suite()
    with pytest.raises(UeoError, match="twice"):
        plan(suite, Sweep("test-tiny-rn", "none", scenarios=["CDA", "CDA"]))
    with pytest.raises(UeoError, match="OPDA"):
        plan(suite, Sweep("test-tiny-rn", "none", scenarios=["OPDA"]))
    with pytest.raises(UeoError, match="No data for domain"):
        plan(suite, Sweep("test-tiny-rn", "none", scenarios=["CDA"], domains=["d"]))
    with pytest.raises(UeoError, match="magic"):
        plan(suite, Sweep("test-tiny-rn", "none", scenarios=["CDA"], methods=["magic"]))


def test_fingerprint_covers_the_whole_recipe_and_only_it():
    """Every recipe setting but the per-cell method and seed changes a cell's fingerprint;
    runtime settings never do."""
    suite = small_suite(("a",))
    sweep = Sweep("test-tiny-rn", "none", scenarios=["CDA"], methods=["ueo"], seeds=[1])
    cell = Cell("a", "CDA", "ueo", 1)
    base = cell_fingerprint(suite, sweep, cell)
    changed = {
        "epochs": 3,
        "batch_size": 7,
        "lr_prompt": 0.5,
        "lr_norm": 0.5,
        "trade": 0.25,
        "augment": "none",
        "precision": "bf16",
        "norm_layers": "all",
        "n_ctx": 4,
        "ctx_init": "a picture of a",
        "pouf_transport": 0.5,
        "pouf_im": 0.1,
        "upl_k": 4,
        "on_nonfinite": "skip",
    }
    per_cell = {"method", "seed"}
    assert set(changed) | per_cell == {f.name for f in fields(Recipe)}  # a new field needs a line
    for name, value in changed.items():
        other = replace(sweep, recipe=sweep.recipe.replace(**{name: value}))
        assert cell_fingerprint(suite, other, cell) != base, name
    # Set by the cell, whatever the sweep's recipe says.
    other = replace(sweep, recipe=sweep.recipe.replace(method="entmin", seed=99))
    assert cell_fingerprint(suite, other, cell) == base
    runtime = Runtime(
        device="cpu",
        workers=3,
        eval_batch_size=5,
        progress=False,
        compile=True,
        on_bad_image="error",
        channels_last=False,
    )
    assert {f.name for f in fields(Runtime)} == set(vars(runtime))
    assert cell_fingerprint(suite, replace(sweep, runtime=runtime), cell) == base
    # The model and the cell's data count too.
    assert cell_fingerprint(suite, replace(sweep, pretrained="openai"), cell) != base
    assert cell_fingerprint(suite, sweep, Cell("a", "CDA", "ueo", 2)) != base


def test_bench_defaults_come_from_the_protocol_and_the_registry(monkeypatch):
    """A newly registered method is a CLI choice and a bench default; label-using ones are not
    benchmark defaults; the default scenarios are the paper's four."""
    monkeypatch.setitem(METHODS, "halfway", Method("halfway", "a test method", loss=lambda b: 0))
    args = build_parser().parse_args(["bench", "--out", "x"])
    assert (
        args.scenarios.split(",")
        == list(PAPER_SCENARIOS)
        == Sweep("test-tiny-rn", "none").scenarios
    )
    defaults = [m for m in method_names() if not get_method(m).needs_labels]
    assert args.methods.split(",") == defaults == Sweep("test-tiny-rn", "none").methods
    assert "halfway" in defaults and "ueo-oracle" not in defaults
    argv = ["adapt", "--model", "m", "--data", "d", "--classes", "c", "--out", "o"]
    assert build_parser().parse_args([*argv, "--method", "halfway"]).method == "halfway"
    assert Recipe(method="halfway").validate().method == "halfway"


def test_bench_recipe_uses_each_datasets_reference_epochs():
    for name, info in DATASETS.items():
        assert bench_recipe(name).epochs == info.epochs
    assert bench_recipe("DomainNet").epochs == 5 and bench_recipe("office31").epochs == 50
    assert bench_recipe("domainnet", epochs=2, lr_norm=0.0) == Recipe(epochs=2, lr_norm=0.0)
    assert bench_recipe(None) == Recipe()
    with pytest.raises(UeoError, match="batch-size"):
        bench_recipe("office31", batch_size=0)


# --- a real tiny sweep: what recomputes a finished cell ----------------------------------------


def test_recipe_change_recomputes_a_cell_and_runtime_change_does_not(
    image_folder, tmp_path, monkeypatch, calibrated_loads
):
    suite = folder_suite(image_folder, CLASSES + UNKNOWN, known=3)
    quiet = Runtime(device="cpu", workers=0, progress=False)
    recipe = Recipe(epochs=1, batch_size=8, lr_prompt=1e-2, lr_norm=1e-2)
    sweep = Sweep(
        "test-tiny-rn", "none", recipe, quiet, scenarios=["ODA"], methods=["ueo"], seeds=[1]
    )
    out = tmp_path / "sweep"
    adapted = []
    real_adapt = ueo.bench.sweep.adapt
    monkeypatch.setattr(
        ueo.bench.sweep, "adapt", lambda *a, **k: adapted.append(a[2]) or real_adapt(*a, **k)
    )
    first = bench(suite, sweep, out)["results"]
    assert adapted == [recipe.replace(method="ueo", seed=1)]
    [(cell, record)] = first
    metrics = cell.path(out) / "metrics.json"
    stamp = metrics.stat().st_mtime_ns

    # Another runtime: nothing is recomputed, the stored numbers come back.
    runtime = Runtime(
        device="cpu", workers=2, eval_batch_size=7, progress=True, on_bad_image="error"
    )
    assert status(suite, replace(sweep, runtime=runtime), out) == [(cell, True)]
    monkeypatch.setattr(ueo.bench.sweep, "adapt", lambda *a, **k: pytest.fail("recomputed"))
    again = bench(suite, replace(sweep, runtime=runtime), out)["results"]
    assert again == first and metrics.stat().st_mtime_ns == stamp

    # Another recipe (a learning rate): the cell is recomputed, with the new recipe.
    monkeypatch.setattr(
        ueo.bench.sweep, "adapt", lambda *a, **k: adapted.append(a[2]) or real_adapt(*a, **k)
    )
    lower = replace(sweep, recipe=recipe.replace(lr_prompt=1e-3))
    assert status(suite, lower, out) == [(cell, False)]
    [(_, redone)] = bench(suite, lower, out)["results"]
    assert adapted[-1].lr_prompt == 1e-3 and len(adapted) == 2
    assert (
        redone["recipe"]["lr_prompt"] == 1e-3
        and redone["cell_fingerprint"] != (record["cell_fingerprint"])
    )
    assert metrics.stat().st_mtime_ns != stamp
    assert json.loads(metrics.read_text())["recipe"]["lr_prompt"] == 1e-3


def test_cells_made_with_the_earlier_augmentation_draws_are_recomputed(
    image_folder, tmp_path, caplog
):
    """A cell's identity names how augmentation is drawn: a cell stored by ueo before the keyed
    draws (no such component) is recomputed, and the warning says why; without augmentation
    the draws do not matter and are not part of the identity."""
    suite = folder_suite(image_folder, CLASSES + UNKNOWN, known=3)
    quiet = Runtime(device="cpu", workers=0, progress=False)
    recipe = Recipe(epochs=1, batch_size=8)
    sweep = Sweep("test-tiny-rn", "none", recipe, quiet, scenarios=["ODA"], methods=["ueo"])
    [(cell, _)] = bench(suite, sweep, tmp_path)["results"]
    metrics = cell.path(tmp_path) / "metrics.json"
    record = json.loads(metrics.read_text())
    components = record["cell_fingerprint_components"]
    assert components["augmentation_draws"] == "keyed by (seed, epoch, image)"
    assert status(suite, sweep, tmp_path) == [(cell, True)]
    del components["augmentation_draws"]  # as an earlier ueo stored it
    record["cell_fingerprint"] = digest(components)
    metrics.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="ueo"):
        assert status(suite, sweep, tmp_path) == [(cell, False)]
    assert (
        "how augmentation is drawn (each loader worker's generator (ueo before 2026-11-30) -> "
        "keyed by (seed, epoch, image))" in caplog.text
    )
    plain = replace(sweep, recipe=recipe.replace(augment="none"))
    assert "augmentation_draws" not in cell_components(suite, plain, cell)


def test_every_cell_is_reported_once_computed_or_read_back(image_folder, tmp_path):
    """`on_done` drives the demo's progress bar over its parallel parts."""
    suite = folder_suite(image_folder, CLASSES + UNKNOWN, known=3)
    quiet = Runtime(device="cpu", workers=0, progress=False)
    recipe = Recipe(epochs=1, batch_size=8)
    sweep = Sweep("test-tiny-rn", "none", recipe, quiet, scenarios=["CDA", "ODA"], seeds=[1])
    sweep = replace(sweep, methods=["zeroshot", "ueo"])
    for _ in range(2):  # computed, then read back
        told = []
        results = run_sweep(suite, sweep, tmp_path / "sweep", on_done=told.append)
        assert told == [cell for cell, _ in results] == plan(suite, sweep)
        assert len(told) == 4


def test_a_cells_numbers_do_not_depend_on_the_cells_run_before_it(image_folder, tmp_path):
    """What lets any process run any cell: the seed-2 cell computed alone equals the one
    computed after the seed-1 cell in the same process, even with a random prompt context
    (drawn from the random state, which the earlier cell's training moved on). The bundled
    model: random weights (`--pretrained none`) would be drawn anew at each load."""
    suite = folder_suite(image_folder, CLASSES + UNKNOWN, known=3)
    quiet = Runtime(device="cpu", workers=0, progress=False)
    recipe = Recipe(epochs=1, batch_size=8, lr_prompt=1e-2, ctx_init="", n_ctx=2)
    sweep = Sweep("ueo-tiny-rn", "bundled", recipe, quiet, scenarios=["ODA"], seeds=[1, 2])
    sweep = replace(sweep, methods=["ueo"])
    second = Cell("images", "ODA", "ueo", 2)
    run_sweep(suite, sweep, tmp_path / "both")
    run_sweep(suite, sweep, tmp_path / "alone", cells=[second])
    after, alone = (
        load_file(second.path(tmp_path / o) / "adapter.safetensors") for o in ("both", "alone")
    )
    assert after.keys() == alone.keys() and "prompt.ctx" in after
    assert all(torch.equal(after[k], alone[k]) for k in after)
    first = load_file(
        Cell("images", "ODA", "ueo", 1).path(tmp_path / "both") / "adapter.safetensors"
    )
    assert not torch.equal(first["prompt.ctx"], after["prompt.ctx"])  # the seeds differ
    scores = [load_scores(second.path(tmp_path / o)) for o in ("both", "alone")]
    for key in scores[0]:
        np.testing.assert_array_equal(scores[0][key], scores[1][key], err_msg=key)
