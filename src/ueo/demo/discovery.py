"""The demo's `ueo discover` step: group and name the images each open-set UEO run rejects.

For every ODA and OPDA cell of the `ueo` method, the adapted model groups the unlabeled images
it rejects (its own threshold) and names the groups. The bundled tiny models know only the
testbed's 15 class words, so the vocabulary is those 15 names minus the cell's known classes:
the 5 unknown class names. On a real CLIP the default vocabulary is WordNet's ~118,000 nouns.
The testbed is labelled, so each discovery is scored against the truth (`evaluate_discovery`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from ueo.api import load_adapted
from ueo.bench.plan import Cell, Suite, Sweep
from ueo.discovery.files import write_discovery
from ueo.discovery.groups import discover, evaluate_discovery
from ueo.discovery.settings import DiscoverSettings
from ueo.discovery.vocabulary import Vocabulary, without_known
from ueo.files import write_json
from ueo.reports import fmt

log = logging.getLogger("ueo")

SCENARIOS = ("ODA", "OPDA")  # the scenarios whose unlabeled images hold unknown classes
METHOD = "ueo"
FOLDER = "discover"
VOCABULARY_SOURCE = "the testbed's 15 class names"


def run_discovery(suite: Suite, sweep: Sweep, out: Path) -> dict:
    """Discover in every open-set `ueo` cell of the sweep; write OUT/discover/<domain>/<scenario>/
    and OUT/discover/summary.json; returns the summary."""
    if METHOD not in sweep.methods:
        return {"cells": []}
    start = time.perf_counter()
    seed = sweep.seeds[0]
    vocabulary = Vocabulary(tuple(suite.class_names), VOCABULARY_SOURCE)
    rows = []
    domains = sweep.domains or [d.name for d in suite.domains]
    for domain in domains:
        for scenario in [s for s in sweep.scenarios if s in SCENARIOS]:
            cell = Cell(domain, scenario, METHOD, seed)
            rows.append(_discover_cell(suite, sweep, out, cell, vocabulary))
    summary = {
        "method": METHOD,
        "seed": seed,
        "vocabulary": f"{VOCABULARY_SOURCE} minus the known ones",
        "settings": asdict(DiscoverSettings()),
        "cells": rows,
        "wall_time_s": round(time.perf_counter() - start, 3),
    }
    if rows:
        write_json(out / FOLDER / "summary.json", summary)
        log.info("discover: %d cells in %.1f s", len(rows), summary["wall_time_s"])
    return summary


def _discover_cell(suite: Suite, sweep: Sweep, out: Path, cell: Cell, vocabulary: Vocabulary):
    domain = suite.domain(cell.domain)
    known, unlabeled, _ = suite.scenario_sets(domain, cell.scenario)
    truth = dict(zip(domain.unlabeled.paths, domain.unlabeled.labels.tolist(), strict=True))
    model, meta = load_adapted(cell.path(out), sweep.runtime.device)
    found = discover(
        model,
        unlabeled,
        meta["threshold"],
        without_known(vocabulary, known),
        sweep.runtime.replace(progress=False),
        precision=meta["recipe"]["precision"],
    )
    folder = out / FOLDER / cell.domain / cell.scenario
    shutil.rmtree(folder, ignore_errors=True)
    record = {
        "adapter": str(cell.path(out)),
        "vocabulary": {"source": VOCABULARY_SOURCE, "size": len(found.vocabulary)},
        "threshold": meta["threshold"],
    }
    write_discovery(folder, found, record)
    true_names = [suite.class_names[truth[p]] for p in found.paths]
    return {
        "domain": cell.domain,
        "scenario": cell.scenario,
        "images": len(unlabeled),
        "names": [[c.name, c.size] for c in found.clusters],
        **evaluate_discovery(found, true_names, known),
    }


def demo_discovery_table(summary: dict) -> str:
    """One line per cell: rejected images (of unknown classes), k (true k), cluster accuracy,
    NMI, ARI, naming accuracy, and the named groups with their sizes."""
    if not summary.get("cells"):
        return ""
    lines = [
        f"\nueo discover on the images UEO rejects (vocabulary: {summary['vocabulary']}; "
        f"{FOLDER}/ has every group)",
        f"{'scenario':<9}{'domain':<10}{'rejected':>9}{'unknown':>8}{'k (true)':>9}"
        f"{'acc':>7}{'NMI':>7}{'ARI':>7}{'name':>7}  groups",
    ]
    for r in summary["cells"]:
        groups = ", ".join(f"{n or '-'} {size}" for n, size in r["names"])
        lines.append(
            f"{r['scenario']:<9}{r['domain']:<10}{r['rejected']:>9}{r['rejected_unknown']:>8}"
            f"{r['k']:>5} ({r['true_k']}){fmt(r['cluster_acc']):>7}{fmt(r['nmi']):>7}"
            f"{fmt(r['ari']):>7}{fmt(r['name_top1']):>7}  {groups}"
        )
    return "\n".join(lines)


def read_summary(out: Path) -> dict:
    path = out / FOLDER / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}
