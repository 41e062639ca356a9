"""The benchmark grid: domain x scenario x method x seed, resumable, one zero-shot pass shared.

A `Suite` describes the data (class names in label order, one unlabeled list and one test list
per domain, the class sets of each scenario); `run_suite` runs every cell with the recipe of
SPEC.md and writes one run directory per cell plus the tables and plots of `ueo.results`.
The paper's benchmarks, a user's labelled folder and the offline testbed are all suites.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ueo.adaptation import METHODS, AdaptConfig, adapt
from ueo.api import save_run
from ueo.benchmarks import SCENARIOS, custom_scenario_split, dataset_info, scenario_split
from ueo.clip import LoadedClip, load_clip
from ueo.data import OOD, ImageSet, load_image_set, normalize_name
from ueo.errors import UeoError
from ueo.inference import Outputs, infer
from ueo.io import atomic_write, write_text
from ueo.model import UeoModel, norm_parameters
from ueo.runtime import captured_log, resolve_device

log = logging.getLogger("ueo")

METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.npz"


@dataclass
class Domain:
    """One target domain: unlabeled and test images with labels in the suite's label space."""

    name: str
    unlabeled: ImageSet
    test: ImageSet


@dataclass
class Suite:
    """What a sweep runs on; `splits[scenario]` = {"known", "unlabeled", "test"} index lists."""

    name: str
    class_names: list[str]
    domains: list[Domain]
    splits: dict[str, dict[str, list[int]]]

    def scenario_sets(self, domain: Domain, scenario: str) -> tuple[list[str], ImageSet, ImageSet]:
        """Known class names, and the unlabeled and test sets filtered to the scenario's classes.

        Labels are mapped to the known list: known index, or OOD for the other classes.
        """
        split = self.splits[scenario]
        names = [self.class_names[i] for i in split["known"]]
        to_known = np.full(len(self.class_names), OOD, dtype=np.int64)
        to_known[split["known"]] = np.arange(len(split["known"]))

        def pick(images: ImageSet, classes: list[int]) -> ImageSet:
            kept = images.subset(np.isin(images.labels, classes))
            return ImageSet(kept.paths, to_known[kept.labels], images.source)

        return names, pick(domain.unlabeled, split["unlabeled"]), pick(domain.test, split["test"])


@dataclass(frozen=True)
class Cell:
    domain: str
    scenario: str
    method: str
    seed: int

    def path(self, out: Path) -> Path:
        return out / "runs" / self.domain / self.scenario / self.method / f"seed{self.seed}"


@dataclass
class SweepOptions:
    """The grid and the recipe; `config` holds the adaptation settings shared by every cell."""

    scenarios: list[str]
    methods: list[str]
    seeds: list[int]
    model: str
    pretrained: str
    config: AdaptConfig = field(default_factory=AdaptConfig)
    domains: list[str] | None = None
    shard: tuple[int, int] = (0, 1)
    progress: bool = True


def benchmark_suite(dataset: str, lists: str | Path, root: str | Path) -> Suite:
    """A paper benchmark from the list files of `ueo prepare` (DomainNet: train/test lists)."""
    from ueo.benchmarks import class_names

    info = dataset_info(dataset)
    names = class_names(info.name)
    lists = Path(lists)
    domains = []
    for d in info.domains:
        if info.name == "domainnet":
            files = (lists / f"{d}_train.txt", lists / f"{d}_test.txt")
        else:
            files = (lists / f"{d}.txt", lists / f"{d}.txt")
        if not all(f.is_file() for f in files):
            continue
        unlabeled = load_image_set(files[0], names, root)
        test = unlabeled if files[1] == files[0] else load_image_set(files[1], names, root)
        domains.append(Domain(d, unlabeled, test))
    splits = {s: scenario_split(info.name, s) for s in SCENARIOS}
    return Suite(info.name, names, domains, splits)


def folder_suite(
    data: str | Path,
    class_names: list[str],
    known: int | None = None,
    known_classes: list[str] | None = None,
) -> Suite:
    """A user's labelled folder as a one-domain benchmark (unlabeled = test = the folder).

    Known classes come first: the first `known` names, or the names in `known_classes`
    followed by the remaining ones. Scenarios follow `custom_scenario_split`.
    """
    if known_classes:
        wanted = {normalize_name(n) for n in known_classes}
        missing = wanted - {normalize_name(n) for n in class_names}
        if missing:
            raise UeoError(f"--known-classes not in --classes: {', '.join(sorted(missing))}")
        first = [n for n in class_names if normalize_name(n) in wanted]
        class_names = first + [n for n in class_names if normalize_name(n) not in wanted]
        known = len(first)
    if known is None:
        raise UeoError("Give --known N or --known-classes for a custom benchmark.")
    images = load_image_set(data, class_names)
    if not images.labelled:
        raise UeoError(f"{data} has no class folders; a benchmark needs labelled images.")
    unmatched = int((images.labels == OOD).sum())
    if unmatched:
        raise UeoError(f"{unmatched} images in {data} are in folders not named in --classes.")
    splits = {}
    for s in SCENARIOS:
        if s in ("ODA", "OPDA") and known == len(class_names):
            continue
        splits[s] = custom_scenario_split(len(class_names), known, s)
    name = Path(data).name
    return Suite(name, list(class_names), [Domain(name, images, images)], splits)


def plan(suite: Suite, options: SweepOptions) -> list[Cell]:
    """Every cell of the grid, in run order (domain-major so zero-shot passes are reused)."""
    unknown = [m for m in options.methods if m not in METHODS]
    if unknown:
        raise UeoError(f"Unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    missing = [s for s in options.scenarios if s not in suite.splits]
    if missing:
        raise UeoError(
            f"Scenario(s) {', '.join(missing)} not available for {suite.name}; "
            f"available: {', '.join(suite.splits)}."
        )
    have = [d.name for d in suite.domains]
    wanted = options.domains or have
    absent = [d for d in wanted if d not in have]
    if absent or not wanted:
        raise UeoError(
            f"No data for domain(s) {', '.join(absent) or '(none)'} of {suite.name}; "
            f"available: {', '.join(have) or 'none'} (run `ueo prepare` or pass --lists)."
        )
    cells = [
        Cell(d, s, m, seed)
        for d in wanted
        for s in options.scenarios
        for m in options.methods
        for seed in options.seeds
    ]
    k, n = options.shard
    return [c for i, c in enumerate(cells) if i % n == k]


def is_done(cell: Cell, out: Path, recipe: str) -> bool:
    """Complete and made with the same recipe; anything else is (re)computed."""
    metrics, scores = cell.path(out) / METRICS_FILE, cell.path(out) / SCORES_FILE
    if not (metrics.is_file() and scores.is_file()):
        return False
    try:
        settings = json.loads(metrics.read_text())["settings"]
    except (ValueError, KeyError):
        return False
    if settings.get("recipe") != recipe:
        log.warning("%s was made with other settings; recomputing it", cell.path(out))
        return False
    return True


def _restore(net: torch.nn.Module, pristine: dict[str, torch.Tensor]) -> None:
    """Undo a cell's adaptation: only the norm affines of the shared model ever change."""
    with torch.no_grad():
        for name, p in norm_parameters(net).items():
            p.copy_(pristine[name])


def run_suite(
    suite: Suite,
    options: SweepOptions,
    out: str | Path,
) -> list[tuple[Cell, dict]]:
    """Run every missing cell; complete cells are read back, so a sweep resumes where it stopped.

    Returns (cell, metrics record) for every cell of the plan.
    """
    out = Path(out)
    cells = plan(suite, options)
    device = resolve_device(options.config.device)
    clip: LoadedClip | None = None
    pristine: dict[str, torch.Tensor] = {}
    zeroshot_cache: dict[tuple, tuple[dict[str, int], Outputs]] = {}
    results = []
    recipe = recipe_hash(options)
    for n, cell in enumerate(cells, 1):
        if is_done(cell, out, recipe):
            record = json.loads((cell.path(out) / METRICS_FILE).read_text())
            results.append((cell, record))
            continue
        if clip is None:
            clip = load_clip(options.model, options.pretrained, device)
            pristine = {k: v.detach().clone() for k, v in norm_parameters(clip.model).items()}
        else:
            _restore(clip.model, pristine)
        domain = next(d for d in suite.domains if d.name == cell.domain)
        names, unlabeled, test = suite.scenario_sets(domain, cell.scenario)
        if not len(unlabeled):
            raise UeoError(f"Domain {cell.domain} has no images of the {cell.scenario} classes.")
        model = UeoModel(clip, names).to(device)
        log.info(
            "[%d/%d] %s %s %s seed %d: %d unlabeled, %d test images",
            n,
            len(cells),
            cell.domain,
            cell.scenario,
            cell.method,
            cell.seed,
            len(unlabeled),
            len(test),
        )
        zs = _shared_zeroshot(
            zeroshot_cache, model, domain, names, unlabeled, test, options, device
        )
        config = replace(copy.deepcopy(options.config), method=cell.method, seed=cell.seed)
        start = time.perf_counter()
        with captured_log() as cell_log:
            result = adapt(model, unlabeled, config, test, zs, progress=options.progress)
            log.info("  done in %.1f s", time.perf_counter() - start)
        extra = {"cell": cell.__dict__, "suite": suite.name, "recipe": recipe}
        write_text(cell.path(out) / "log.txt", cell_log.getvalue())
        _save_scores(cell.path(out) / SCORES_FILE, result, test)
        record = save_run(cell.path(out), model, result, extra)
        results.append((cell, record))
    return results


def _shared_zeroshot(cache, model, domain, names, unlabeled, test, options, device):
    """Zero-shot outputs of the scenario's sets, sliced from one pass over the whole domain."""
    key = (domain.name, tuple(names))
    if key not in cache:
        paths = sorted(set(domain.unlabeled.paths) | set(domain.test.paths))
        everything = ImageSet(paths, np.full(len(paths), OOD), domain.name)
        c = options.config
        out = infer(
            model,
            everything,
            device,
            c.eval_batch_size,
            c.workers,
            c.precision,
            desc=f"zero-shot {domain.name}",
            progress=options.progress,
        )
        cache.clear()
        cache[key] = ({p: i for i, p in enumerate(paths)}, out)
    index, out = cache[key]

    def take(images: ImageSet) -> Outputs:
        rows = np.array([index[p] for p in images.paths], dtype=np.int64)
        return Outputs(out.cos[rows], out.valid[rows])

    return {"unlabeled": take(unlabeled), "test": take(test)}


def _save_scores(path: Path, result, test: ImageSet) -> None:
    """Per-image test scores before and after adaptation, for ROC curves and histograms."""
    zs, ad = result.outputs["zeroshot"]["test"], result.outputs["adapted"]["test"]
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            label=test.labels,
            valid=ad.valid & zs.valid,
            zeroshot_score=zs.score,
            zeroshot_pred=zs.pred,
            adapted_score=ad.score,
            adapted_pred=ad.pred,
        )


def load_scores(run_dir: Path) -> dict[str, np.ndarray]:
    """Read a cell's scores.npz (plain arrays: no pickle is ever loaded)."""
    with np.load(run_dir / SCORES_FILE, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def recipe_hash(options: SweepOptions) -> str:
    """Fingerprint of what determines a cell's numbers (not device, workers or batch of eval)."""
    c = options.config
    keys = ("epochs", "batch_size", "lr_prompt", "lr_norm", "trade", "augment", "precision")
    blob = {
        "model": options.model,
        "pretrained": options.pretrained,
        **{k: getattr(c, k) for k in keys},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def status(suite: Suite, options: SweepOptions, out: str | Path) -> list[tuple[Cell, bool]]:
    """The plan with what already exists (for --dry-run)."""
    recipe = recipe_hash(options)
    return [(c, is_done(c, Path(out), recipe)) for c in plan(suite, options)]


def bench(suite: Suite, options: SweepOptions, out: str | Path, title: str | None = None) -> dict:
    """Run the grid and write the report; returns {"results": [...], "files": {...}}."""
    from ueo.results import write_report

    out = Path(out)
    results = run_suite(suite, options, out)
    settings = {
        "suite": suite.name,
        "model": options.model,
        "pretrained": options.pretrained,
        "recipe": recipe_hash(options),
        "seeds": options.seeds,
        "config": {k: v for k, v in options.config.__dict__.items() if k != "method"},
    }
    if options.shard[1] > 1:
        # A shard reports on every finished cell of the whole grid, not just its own.
        whole = replace(options, shard=(0, 1))
        results = [
            (c, json.loads((c.path(out) / METRICS_FILE).read_text()))
            for c, done in status(suite, whole, out)
            if done
        ]
    files = write_report(results, out, title or f"{suite.name}: {options.model}", settings)
    return {"results": results, "files": files}
