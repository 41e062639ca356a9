"""`ueo bench` as one Python call, with the policy of the paper's protocol.

The policy: a paper dataset uses its reference number of epochs (DomainNet 5, the others 50)
unless told otherwise, its image lists are prepared under the output folder when none are
given, and a shard is `K/N` with 0 <= K < N.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from ueo.bench.prepare import prepare_lists
from ueo.bench.protocol import DATASETS, dataset_info, domain_name
from ueo.bench.results import write_report
from ueo.bench.suites import benchmark_suite, folder_suite
from ueo.bench.sweep import Cell, Suite, Sweep, run_sweep, status
from ueo.data import parse_classes
from ueo.errors import UeoError
from ueo.io import check_output_dir
from ueo.names import normalize_name
from ueo.recipe import Recipe
from ueo.runs import METRICS_FILE


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` -> (K, N): this process runs every N-th cell from the K-th (one per GPU)."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UeoError(f"--shard must be K/N with 0 <= K < N, not {text!r}.") from None
    if not 0 <= k < n:
        raise UeoError(f"--shard must be K/N with 0 <= K < N, not {text!r}.")
    return k, n


def bench_recipe(dataset: str | None, **settings) -> Recipe:
    """The reference recipe for `dataset` (its epochs), with `settings` overriding it."""
    base = Recipe(epochs=dataset_info(dataset).epochs) if dataset else Recipe()
    return base.replace(**settings).validate()


def bench_suite(
    out: str | os.PathLike,
    *,
    dataset: str | None = None,
    root: str | None = None,
    lists: str | None = None,
    data: str | None = None,
    classes: str | list[str] | None = None,
    known: int | None = None,
    known_classes: list[str] | None = None,
    domains: list[str] | None = None,
) -> Suite:
    """A paper dataset (lists prepared under `out/lists` unless given) or a labelled folder.

    `domains`: the benchmark domains to prepare lists for (default all); only those need to
    exist under `root`.
    """
    check_output_dir(out)
    if bool(dataset) == bool(data):
        raise UeoError("Give either --dataset (with --root) or --data (with --classes, --known).")
    if dataset:
        folder_options = {
            "--classes": classes,
            "--known": known is not None,
            "--known-classes": known_classes,
        }
        given = [flag for flag, value in folder_options.items() if value]
        if given:
            raise UeoError(f"{', '.join(given)}: only with --data, not with --dataset.")
        if not root:
            raise UeoError("--dataset needs --root, the dataset folder.")
        info = dataset_info(dataset)
        if lists is None:
            lists = Path(out) / "lists"
            prepare_lists(info.name, root, lists, domains)
        return benchmark_suite(info.name, lists, root)
    if root or lists:
        raise UeoError("--root and --lists: only with --dataset, not with --data.")
    if not classes:
        raise UeoError("--data needs --classes (all class names, label order).")
    names = parse_classes(classes) if isinstance(classes, str) else list(classes)
    check_known(names, known, known_classes)
    return folder_suite(data, names, known, known_classes)


def check_known(names: list[str], known: int | None, known_classes: list[str] | None) -> None:
    """Which classes of a labelled folder are known: `--known N` (1 <= N <= the number of
    classes) or `--known-classes` (no name twice), not both."""
    if known is not None and known_classes:
        raise UeoError("Give --known or --known-classes, not both.")
    if known_classes:
        seen = set()
        for name in known_classes:
            key = normalize_name(name)
            if key in seen:
                raise UeoError(f"--known-classes lists {name} twice.")
            seen.add(key)
    elif known is None:
        raise UeoError("Give --known N or --known-classes for a custom benchmark.")
    elif isinstance(known, bool) or not isinstance(known, int) or not 1 <= known <= len(names):
        raise UeoError(
            f"--known must be between 1 and the number of classes ({len(names)}), not {known!r}."
        )


def canonical_domains(suite: Suite, domains: list[str] | None) -> list[str] | None:
    """Benchmark domain names as the protocol spells them; custom suites keep them as given."""
    if not domains or suite.name not in DATASETS:
        return domains
    return [domain_name(suite.name, d) for d in domains]


def bench(suite: Suite, sweep: Sweep, out: str | os.PathLike, title: str | None = None) -> dict:
    """Run the grid and write the report; returns {"results": [...], "files": {...}}."""
    out = check_output_dir(out)
    sweep.validate()
    results = run_sweep(suite, sweep, out)
    if sweep.shard[1] > 1:
        # A shard reports on every finished cell of the whole grid, not just its own.
        results = finished(suite, replace(sweep, shard=(0, 1)), out)
    settings = {
        "suite": suite.name,
        "model": sweep.model,
        "pretrained": sweep.pretrained,
        "seeds": sweep.seeds,
        "recipe": {k: v for k, v in asdict(sweep.recipe).items() if k not in ("method", "seed")},
    }
    files = write_report(results, out, title or f"{suite.name}: {sweep.model}", settings)
    return {"results": results, "files": files}


def finished(suite: Suite, sweep: Sweep, out: Path) -> list[tuple[Cell, dict]]:
    return [
        (c, json.loads((c.path(out) / METRICS_FILE).read_text()))
        for c, done in status(suite, sweep, out)
        if done
    ]
