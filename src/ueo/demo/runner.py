"""`ueo demo`: the benchmark sweep run over the offline testbed with a bundled tiny CLIP.

It is `ueo bench` on the testbed (ueo.demo.testbed): same grid runner, same report, plus the
figures that show what adaptation does to OOD detection (ROC curves, MCM histograms).

The demo recipe differs from the reference recipe in two settings: a testbed target domain
holds 570 unlabeled images, so an epoch is a handful of steps, and the demo must run in a few
minutes on two CPU cores, so it trains 5 epochs at a learning rate of 4e-3 (40x the
reference). The first demo recipe, fixed before any result was seen, trained 20 epochs at 1e-3;
the 4-minute budget cut the epochs 4x, and the learning rate went up 4x by that rule alone, so
the sum of learning rates over the steps (the cosine schedule's area) is unchanged
(docs/demo.md compares the two). Everything else is the reference recipe of docs/spec.md.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ueo.bench.grid import default_methods
from ueo.bench.jobs import bench
from ueo.bench.plan import Domain, Suite, Sweep, plan
from ueo.bench.plots import histogram_plot, roc_plot
from ueo.bench.protocol import PAPER_SCENARIOS, custom_scenario_split
from ueo.bench.scores import load_scores
from ueo.bench.sweep import run_sweep
from ueo.checks import check_output_dir
from ueo.cpus import available_cpus
from ueo.data import load_image_set
from ueo.demo import BUNDLED_MODELS
from ueo.demo.discovery import demo_discovery_table, run_discovery
from ueo.demo.processes import part_context
from ueo.demo.testbed import build_testbed
from ueo.errors import UeoError
from ueo.recipe import Recipe, Runtime
from ueo.reports import fmt
from ueo.runtime import resolve_device

log = logging.getLogger("ueo")

DEMO_RECIPE = Recipe(epochs=5, lr_prompt=4e-3, lr_norm=4e-3)
QUICK_EPOCHS = 2


def testbed_suite(testbed, domains: list[str] | None = None) -> Suite:
    """The testbed as a suite: each shifted domain with its unlabeled and test lists."""
    names = testbed.class_names
    chosen = domains or list(testbed.domains)
    suite_domains = [
        Domain(
            d, load_image_set(unl, names, testbed.root), load_image_set(test, names, testbed.root)
        )
        for d, (unl, test) in testbed.domains.items()
        if d in chosen
    ]
    splits = {s: custom_scenario_split(len(names), testbed.known, s) for s in PAPER_SCENARIOS}
    return Suite("testbed", list(names), suite_domains, splits)


def demo_methods() -> list[str]:
    """Every label-free method and the oracle: the testbed is labelled, so the ceiling of
    better sample weights can be shown beside the methods."""
    return [*default_methods(), "ueo-oracle"]


def demo_recipe(quick: bool = False) -> Recipe:
    return DEMO_RECIPE.replace(epochs=QUICK_EPOCHS) if quick else DEMO_RECIPE


def run_demo(
    out: str | Path = "runs/demo",
    *,
    quick: bool = False,
    model: str = "ueo-tiny-rn",
    recipe: Recipe | None = None,
    runtime: Runtime | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    processes: int | None = None,
) -> dict:
    """Run the demo grid and write results.{json,md,csv} and plots, then `ueo discover` in
    the open-set UEO cells (ueo.demo.discovery); returns results.json with the discovery
    summary under "discover".

    `quick`: one domain and fewer epochs. `recipe` replaces the demo recipe. `processes`: how
    many processes share the cells on the CPU (default one per available CPU, see `parts`).
    `seeds` (default: the recipe's) repeat every adapted cell with other seeds.
    """
    out = check_output_dir(out)
    if model not in BUNDLED_MODELS:
        raise UeoError(f"The demo runs a bundled model ({', '.join(BUNDLED_MODELS)}), not {model}.")
    sweep = Sweep(
        model=model,
        pretrained="bundled",
        recipe=recipe or demo_recipe(quick),
        runtime=runtime or Runtime(device="cpu", workers=0),
        methods=methods or demo_methods(),
        seeds=seeds or [(recipe or demo_recipe(quick)).seed],
    ).validate()
    testbed = build_testbed()
    domains = list(testbed.domains)[:1] if quick else None
    suite = testbed_suite(testbed, domains)
    if resolve_device(sweep.runtime.device).type == "cpu":
        sweeps = parts(suite, sweep, processes or available_cpus())
        run_parts(suite, sweeps, out, sweep.runtime.progress)
    report = bench(suite, sweep, out, title=f"ueo demo: {model} on the offline testbed")
    figures(report["results"], out)
    results = json.loads((out / "results.json").read_text())
    results["discover"] = run_discovery(suite, sweep, out)
    return results


def parts(suite: Suite, sweep: Sweep, n: int) -> list[Sweep]:
    """The grid split into at most `n` sub-grids of whole domains (each domain's zero-shot
    pass and decoded images then serve all its cells), or of a domain's scenarios when there
    are fewer domains than processes."""
    domains = sweep.domains or [d.name for d in suite.domains]
    if n >= 2 * len(domains):
        k = min(len(sweep.scenarios), n // len(domains))
        return [
            replace(sweep, domains=[d], scenarios=sweep.scenarios[i::k])
            for d in domains
            for i in range(k)
        ]
    k = min(n, len(domains))
    return [replace(sweep, domains=domains[i::k]) for i in range(k)]


def run_parts(suite: Suite, sweeps: list[Sweep], out: Path, progress: bool = False) -> None:
    """Run sub-grids in parallel processes, the CPUs shared out as intra-op threads.

    Each process runs `run_sweep` on its part and writes its cells; the caller's sweep then
    finds every cell done and writes the report. Cells compute the same numbers as in one
    process: each is seeded, starts from the pristine model and gets the same zero-shot pass.
    The parts report each finished cell on a queue, which drives one progress bar here.
    """
    if len(sweeps) < 2:
        return
    threads = max(1, available_cpus() // len(sweeps))
    quiet = [replace(s, runtime=s.runtime.replace(progress=False)) for s in sweeps]
    log.info("Running the grid in %d processes of %d thread(s)", len(sweeps), threads)
    context = part_context()
    cells = context.SimpleQueue()
    total = sum(len(plan(suite, s)) for s in sweeps)
    with (
        ProcessPoolExecutor(len(sweeps), context, _start_part, (threads, cells)) as pool,
        tqdm(total=total, desc="demo cells", unit="cell", disable=not progress) as bar,
    ):
        parts = [pool.submit(run_sweep, suite, s, out, _cell_done) for s in quiet]
        while not all(p.done() for p in parts):
            wait(parts, timeout=0.5)
            while not cells.empty():
                cells.get()
                bar.update()
        for part in parts:
            part.result()


_cells_done = None


def _start_part(threads: int, cells) -> None:
    """A part's process: its share of the CPUs, its queue of finished cells, and only
    warnings on the terminal (cells keep their log lines in their log.txt)."""
    global _cells_done
    _cells_done = cells
    torch.set_num_threads(threads)
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    log.addHandler(handler)
    log.propagate = False


def _cell_done(cell) -> None:
    _cells_done.put(cell.domain)


def figures(results: list, out: Path) -> dict[str, Path]:
    """ROC curves and MCM histograms of the test images, zero-shot vs adapted, domains pooled."""
    pooled: dict = {}
    for cell, _ in results:
        scores = load_scores(cell.path(out))
        v = scores["valid"]
        is_id = scores["label"][v] >= 0
        entry = pooled.setdefault(cell.scenario, {})
        if cell.method == "zeroshot":
            entry.setdefault("zero-shot", []).append((is_id, scores["zeroshot_score"][v]))
        else:
            entry.setdefault(cell.method, []).append((is_id, scores["adapted_score"][v]))
    curves = {
        s: {
            label: tuple(np.concatenate(parts) for parts in zip(*runs, strict=True))
            for label, runs in lines.items()
        }
        for s, lines in pooled.items()
    }
    files = {"roc": roc_plot(curves, out / "plots" / "roc.png")}
    panels = {
        s: {"zero-shot": lines["zero-shot"], "after UEO": lines["ueo"]}
        for s, lines in curves.items()
        if "zero-shot" in lines and "ueo" in lines
    }
    if panels:
        files["histograms"] = histogram_plot(panels, out / "plots" / "mcm_histograms.png")
    return files


def results_table(results_json: dict) -> str:
    """The compact terminal table: per scenario, each method's ACC / AUROC / H (test, mean);
    then the discovery's table, if any."""
    lines = [f"{'scenario':<9}{'method':<10}{'ACC':>7}{'AUROC':>8}{'H':>7}{'FPR95':>8}"]
    for scenario, methods in results_json["mean"].items():
        for method, m in methods.items():
            lines.append(
                f"{scenario:<9}{method:<10}{fmt(m['acc']):>7}{fmt(m['auroc']):>8}"
                f"{fmt(m['h']):>7}{fmt(m['fpr95']):>8}"
            )
    if results_json.get("discover"):
        lines.append(demo_discovery_table(results_json["discover"]))
    return "\n".join(lines)
