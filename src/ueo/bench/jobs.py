"""`ueo bench` as one Python call, with the policy of the paper's protocol.

The policy: a paper dataset uses its reference number of epochs (DomainNet 5, the others 50)
unless told otherwise and its image lists are prepared under the output folder when none are
given. The checks of the options (ueo.bench.grid) need no torch.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, replace
from pathlib import Path

from ueo.bench.cells import status
from ueo.bench.grid import check_known, check_source
from ueo.bench.plan import Cell, Suite, Sweep
from ueo.bench.prepare import prepare_lists
from ueo.bench.protocol import DATASETS, dataset_info, domain_name
from ueo.bench.results import write_report
from ueo.bench.suites import benchmark_suite, folder_suite
from ueo.bench.sweep import run_sweep
from ueo.bench.world import CellBoard, run_share
from ueo.checks import check_output_dir
from ueo.errors import UeoError
from ueo.layout import METRICS_FILE
from ueo.names import parse_classes

log = logging.getLogger("ueo")


def bench_suite(
    out: str | os.PathLike,
    *,
    dataset: str | None = None,
    root: str | None = None,
    lists: str | None = None,
    data: str | None = None,
    all_classes: str | list[str] | None = None,
    known: int | None = None,
    known_classes: list[str] | None = None,
    domains: list[str] | None = None,
) -> Suite:
    """A paper dataset (lists prepared under `out/lists` unless given) or a labelled folder
    (`all_classes`: every class name of `data`, in label order; `known` or `known_classes`).

    `domains`: the benchmark domains to prepare lists for (default all); only those need to
    exist under `root`.
    """
    check_output_dir(out)
    check_source(
        dataset=dataset,
        root=root,
        lists=lists,
        data=data,
        all_classes=all_classes,
        known=known,
        known_classes=known_classes,
    )
    if dataset:
        info = dataset_info(dataset)
        if lists is None:
            lists = Path(out) / "lists"
            prepare_lists(info.name, root, lists, domains)
        return benchmark_suite(info.name, lists, root)
    names = parse_classes(all_classes) if isinstance(all_classes, str) else list(all_classes)
    check_known(names, known, known_classes)
    return folder_suite(data, names, known, known_classes)


def canonical_domains(suite: Suite, domains: list[str] | None) -> list[str] | None:
    """Benchmark domain names as the protocol spells them; custom suites keep them as given."""
    if not domains or suite.name not in DATASETS:
        return domains
    return [domain_name(suite.name, d) for d in domains]


def bench(
    suite: Suite,
    sweep: Sweep,
    out: str | os.PathLike,
    title: str | None = None,
    *,
    board: CellBoard | None = None,
    report_only: bool = False,
) -> dict:
    """Run the grid and write the report; returns {"results": [...], "missing": [...],
    "files": {...}}.

    Among torchrun's processes (`board`, ueo.bench.world) this process computes its share of
    the missing cells, and rank 0 alone writes the report once every process is done (the
    others return no results and no files). `report_only`: compute nothing, report on the
    cells that exist. The report of a shard, or of a grid not yet complete, names the cells
    still missing.
    """
    out = check_output_dir(out)
    sweep.validate()
    board = board or CellBoard()
    results = None
    if not report_only:
        if board.size > 1:
            run_share(suite, sweep, out, board)
        else:
            results = run_sweep(suite, sweep, out)
    if board.rank != 0:
        return {"results": [], "missing": [], "files": {}}
    missing: list[Cell] = []
    if results is None or sweep.shard[1] > 1:
        # Every finished cell of the whole grid, whichever process or job computed it.
        grid = status(suite, replace(sweep, shard=(0, 1)), out)
        results = [(c, json.loads((c.path(out) / METRICS_FILE).read_text())) for c, d in grid if d]
        missing = [c for c, done in grid if not done]
    if not results:
        raise UeoError(f"No cell of this grid is finished in {out}: nothing to report.")
    if missing:
        log.warning(
            "The report covers %d of the grid's %d cells; missing: %s",
            len(results),
            len(results) + len(missing),
            ", ".join(c.name for c in missing),
        )
    settings = {
        "suite": suite.name,
        "model": sweep.model,
        "pretrained": sweep.pretrained,
        "seeds": sweep.seeds,
        "recipe": {k: v for k, v in asdict(sweep.recipe).items() if k not in ("method", "seed")},
    }
    title = title or f"{suite.name}: {sweep.model}"
    files = write_report(results, out, title, settings, [c.name for c in missing])
    return {"results": results, "missing": missing, "files": files}
