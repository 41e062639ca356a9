"""`ueo discover` scored on the offline testbed, where the class of every rejected image is known.

Runs on the runs folder of `ueo demo` (its ODA and OPDA cells of the `ueo` method): for each
cell, one pass of the adapted model over the cell's unlabeled images (features kept), then the
discovery with each rule on the same features, and two baselines:

- `per-image`: no clustering; every rejected image named by its own nearest vocabulary name,
  the images sharing a name forming a group;
- `true k`: k-means with the true number of unknown classes among the rejected images, and
  with the number of all classes among them (known classes rejected by mistake included).

Scores (ueo.discover.evaluate_discovery): cluster accuracy (Hungarian, over all rejected images,
each with its own class), NMI, ARI, k against the truth, naming accuracy over the rejected
images of unknown classes (top-1: their group's name is their class; top-5: their class is
among the group's top 5 names). The vocabulary is the testbed's 15 names minus the known ones,
as in the demo: 5 names, so top-5 naming is trivially reached by any group with 5 names.

    python benchmarks/discover_eval.py --runs runs/demo [--out runs/demo/discover_eval]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ueo.api import load_adapted
from ueo.bench.plan import Cell
from ueo.demo.discovery import METHOD, SCENARIOS, VOCABULARY_SOURCE
from ueo.demo.runner import testbed_suite
from ueo.demo.testbed import build_testbed
from ueo.discovery.groups import discover_outputs, evaluate_discovery, evaluate_per_image
from ueo.discovery.settings import DiscoverSettings
from ueo.discovery.vocabulary import Vocabulary, encode_vocabulary, without_known
from ueo.files import write_json, write_text
from ueo.inference import infer
from ueo.recipe import Recipe, Runtime
from ueo.reports import fmt

SCORES = ("cluster_acc", "nmi", "ari", "name_top1", "name_top5")


def cell_scores(suite, runs: Path, cell: Cell, runtime: Runtime) -> dict:
    """Every variant's scores on one cell, from one pass over its unlabeled images."""
    domain = suite.domain(cell.domain)
    known, unlabeled, _ = suite.scenario_sets(domain, cell.scenario)
    truth = dict(zip(domain.unlabeled.paths, domain.unlabeled.labels.tolist(), strict=True))
    model, meta = load_adapted(cell.path(runs), runtime.device)
    start = time.perf_counter()
    out = infer(model, unlabeled, runtime, precision=meta["recipe"]["precision"], features=True)
    vocabulary = without_known(Vocabulary(tuple(suite.class_names), VOCABULARY_SOURCE), known)
    names, vocab = encode_vocabulary(model, vocabulary, progress=False)
    with torch.no_grad():
        known_text = model.text_features().numpy()
    passed = time.perf_counter() - start

    def run(settings: DiscoverSettings):
        t = time.perf_counter()
        found = discover_outputs(
            out, unlabeled, meta["threshold"], known_text, known, names, vocab.numpy(), settings
        )
        return found, time.perf_counter() - t

    default, seconds = run(DiscoverSettings())
    true_names = [suite.class_names[truth[p]] for p in default.paths]
    rows = {"ueo discover (silhouette)": (default, seconds)}
    rows["ueo discover (gcd)"] = run(DiscoverSettings(k_select="gcd"))
    first = evaluate_discovery(default, true_names, known)
    rows["true k: unknown classes"] = run(DiscoverSettings(clusters=max(1, first["true_k"])))
    rows["true k: all classes rejected"] = run(DiscoverSettings(clusters=first["classes"]))
    result = {
        name: {**evaluate_discovery(found, true_names, known), "seconds": round(s, 3)}
        for name, (found, s) in rows.items()
    }
    result["per-image naming (no clusters)"] = evaluate_per_image(default, true_names, known)
    return {
        "domain": cell.domain,
        "scenario": cell.scenario,
        "images": len(unlabeled),
        "image_pass_and_vocabulary_s": round(passed, 3),
        "variants": result,
    }


def summary_table(cells: list[dict]) -> str:
    """Per scenario and variant: the scores' mean over domains (percent), k and true k."""
    lines = []
    for scenario in sorted({c["scenario"] for c in cells}, key=SCENARIOS.index):
        mine = [c for c in cells if c["scenario"] == scenario]
        rejected = np.mean([next(iter(c["variants"].values()))["rejected"] for c in mine])
        unknown = np.mean([next(iter(c["variants"].values()))["rejected_unknown"] for c in mine])
        lines += [
            f"\n{scenario}, {len(mine)} domain(s): {rejected:.0f} rejected images per domain, "
            f"{unknown:.0f} of them of unknown classes (mean)",
            "",
            "| variant | cluster acc | NMI | ARI | k | unknown classes | classes rejected "
            "| name top-1 | name top-5 | likely known (known majority; flags right) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for variant in mine[0]["variants"]:
            runs = [c["variants"][variant] for c in mine]
            cells_ = [fmt(_mean([r[s] for r in runs])) for s in SCORES]  # percent, or '-'
            known = (
                f"{_mean([r['likely_known_clusters'] for r in runs]):.1f} "
                f"({_mean([r['known_majority_clusters'] for r in runs]):.1f}; "
                f"{fmt(_mean([r['likely_known_agreement'] for r in runs]), 0)}% agree)"
                if "likely_known_clusters" in runs[0]
                else "-"
            )
            lines.append(
                f"| {variant} | {cells_[0]} | {cells_[1]} | {cells_[2]} "
                f"| {_mean([r['k'] for r in runs]):.1f} | {_mean([r['true_k'] for r in runs]):.1f} "
                f"| {_mean([r['classes'] for r in runs]):.1f} | {cells_[3]} | {cells_[4]} "
                f"| {known} |"
            )
    return "\n".join(lines)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="the `ueo demo --out` folder")
    parser.add_argument("--out", type=Path, default=None, help="default RUNS/discover_eval")
    args = parser.parse_args(argv)
    out = args.out or args.runs / "discover_eval"
    results = args.runs / "results.json"
    settings = json.loads(results.read_text())["settings"] if results.is_file() else {}
    testbed = build_testbed()
    suite = testbed_suite(testbed)
    seed = Recipe().seed
    runtime = Runtime(device="cpu", workers=0, progress=False)
    cells = []
    for domain in [d.name for d in suite.domains]:
        for scenario in SCENARIOS:
            cell = Cell(domain, scenario, METHOD, seed)
            if (cell.path(args.runs) / "adapter.safetensors").is_file():
                cells.append(cell_scores(suite, args.runs, cell, runtime))
                print(f"{domain} {scenario}: done", flush=True)
    if not cells:
        raise SystemExit(f"No {METHOD} cell of {', '.join(SCENARIOS)} under {args.runs}/runs")
    write_json(out / "discover_eval.json", {"settings": settings, "cells": cells})
    table = summary_table(cells)
    header = (
        f"ueo discover on the testbed ({settings.get('model')}, runs of {args.runs}); "
        f"vocabulary: {VOCABULARY_SOURCE} minus the known ones"
    )
    write_text(out / "discover_eval.md", header + "\n" + table + "\n")
    print(header + "\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
