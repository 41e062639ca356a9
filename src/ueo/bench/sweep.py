"""The benchmark grid: domain x scenario x method x seed, resumable, one zero-shot pass shared.

A `Suite` describes the data (class names in label order, one unlabeled list and one test list
per domain, the class sets of each scenario); `run_sweep` runs every cell with the sweep's
recipe and writes one run directory per cell. The paper's benchmarks, a user's labelled
folder and the offline testbed are all suites (ueo.bench.suites).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from socket import gethostname

import numpy as np
import torch

from ueo.adaptation import adapt
from ueo.bench.grid import check_grid
from ueo.bench.protocol import PAPER_SCENARIOS
from ueo.cache import ImageCache
from ueo.checkpoint import CHECKPOINT_FILE, load_checkpoint
from ueo.clip import LoadedClip, check_model, load_clip
from ueo.data import OOD, ImageSet
from ueo.errors import UeoError
from ueo.fingerprint import describe_changes, digest, run_identity
from ueo.inference import Outputs, infer
from ueo.io import atomic_write
from ueo.methods import get_method, method_names
from ueo.model import UeoModel, norm_parameters
from ueo.pathkeys import PathIndex
from ueo.recipe import Recipe, Runtime
from ueo.runs import LOG_FILE, METRICS_FILE, logged_to, publish, save_run, staging_dir
from ueo.runtime import checked_runtime, resolve_device

log = logging.getLogger("ueo")

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

    def domain(self, name: str) -> Domain:
        return next(d for d in self.domains if d.name == name)

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

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.scenario}/{self.method}/seed{self.seed}"

    def path(self, out: Path) -> Path:
        return out / "runs" / self.domain / self.scenario / self.method / f"seed{self.seed}"


def default_methods() -> list[str]:
    """Every registered method that needs no labels: what a benchmark compares by default."""
    return [m for m in method_names() if not get_method(m).needs_labels]


@dataclass
class Sweep:
    """The grid, the model and the recipe (its method and seed are set per cell)."""

    model: str
    pretrained: str
    recipe: Recipe = field(default_factory=Recipe)
    runtime: Runtime = field(default_factory=Runtime)
    scenarios: list[str] = field(default_factory=lambda: list(PAPER_SCENARIOS))
    methods: list[str] = field(default_factory=default_methods)
    seeds: list[int] = field(default_factory=lambda: [Recipe().seed])
    domains: list[str] | None = None
    shard: tuple[int, int] = (0, 1)

    def cell_recipe(self, cell: Cell) -> Recipe:
        return self.recipe.replace(method=cell.method, seed=cell.seed)

    def validate(self) -> Sweep:
        """Check the grid (ueo.bench.grid), recipe, runtime and model before any data or model
        is loaded; returns self."""
        self.recipe.validate()
        check_grid(self.methods, self.scenarios, self.seeds, self.domains, self.shard)
        checked_runtime(self.runtime, self.recipe.precision)
        check_model(self.model, self.pretrained)
        return self


def plan(suite: Suite, sweep: Sweep) -> list[Cell]:
    """Every cell of the grid, in run order (domain-major so zero-shot passes are reused);
    with a shard K/N, the K-th of N contiguous parts of about equal work (`split`)."""
    sweep.validate()
    missing = [s for s in sweep.scenarios if s not in suite.splits]
    if missing:
        raise UeoError(
            f"Scenario(s) {', '.join(missing)} not available for {suite.name}; "
            f"available: {', '.join(suite.splits)}."
        )
    have = [d.name for d in suite.domains]
    wanted = sweep.domains or have
    absent = [d for d in wanted if d not in have]
    if absent or not wanted:
        raise UeoError(
            f"No data for domain(s) {', '.join(absent) or '(none)'} of {suite.name}; "
            f"available: {', '.join(have) or 'none'} (run `ueo prepare` or pass --lists)."
        )
    cells = [
        Cell(d, s, m, seed)
        for d in wanted
        for s in sweep.scenarios
        for m in sweep.methods
        for seed in sweep.seeds
    ]
    k, n = sweep.shard
    return cells if n == 1 else shares(suite, sweep, cells, n)[k]


def shares(suite: Suite, sweep: Sweep, cells: list[Cell], n: int) -> list[list[Cell]]:
    """`cells` (in plan order) cut into `n` contiguous parts of about equal work."""
    return [[cells[i] for i in part] for part in split(cell_costs(suite, sweep, cells), n)]


def cell_costs(suite: Suite, sweep: Sweep, cells: list[Cell]) -> list[float]:
    """Each cell's work, in images through the network: its evaluation passes over the
    unlabeled and test sets, plus, for a method that trains, a forward and a backward pass
    (about three forwards) per unlabeled image and epoch. Enough to share work out evenly."""
    sizes: dict[tuple[str, str], tuple[int, int]] = {}
    costs = []
    for cell in cells:
        key = (cell.domain, cell.scenario)
        if key not in sizes:
            _, unlabeled, test = suite.scenario_sets(suite.domain(cell.domain), cell.scenario)
            sizes[key] = (len(unlabeled), len(test))
        n_unlabeled, n_test = sizes[key]
        epochs = sweep.recipe.epochs if get_method(cell.method).trains else 0
        every = sweep.runtime.eval_every
        evaluations = 1 + (epochs // every if every else 0)
        costs.append(float(max(1, evaluations * (n_unlabeled + n_test) + 3 * epochs * n_unlabeled)))
    return costs


def split(costs: list[float], n: int) -> list[list[int]]:
    """Indices 0..len(costs)-1 cut into `n` contiguous parts of about equal total cost.

    Item i goes to part floor(n * (cost of the items before it + half its own) / total): the
    parts keep the order, their totals differ by at most about the largest item, and with
    equal costs their sizes differ by at most one. Contiguous parts of a domain-major plan
    keep a domain's cells together, so most domains' zero-shot pass and decoded images serve
    all their cells in one process."""
    total = float(sum(costs))
    parts: list[list[int]] = [[] for _ in range(n)]
    before = 0.0
    for i, cost in enumerate(costs):
        middle = before + cost / 2
        parts[min(n - 1, int(n * middle / total))].append(i)
        before += cost
    return parts


def cell_components(suite: Suite, sweep: Sweep, cell: Cell) -> dict:
    """What determines a cell's numbers: its whole recipe, the model and its weights, the
    suite's class names in order, the scenario's class split and the cell's images."""
    names, unlabeled, test = suite.scenario_sets(suite.domain(cell.domain), cell.scenario)
    run = run_identity(
        sweep.model, sweep.pretrained, names, sweep.cell_recipe(cell), unlabeled, test
    )
    return {
        **run,
        "class_names": list(suite.class_names),
        "split": {k: list(v) for k, v in suite.splits[cell.scenario].items()},
        "known_classes": names,
    }


def cell_fingerprint(suite: Suite, sweep: Sweep, cell: Cell) -> str:
    return digest(cell_components(suite, sweep, cell))


def is_done(cell: Cell, out: Path, components: dict) -> bool:
    """Complete and made with the same components; anything else is (re)computed, and a cell
    made with other settings says which."""
    metrics, scores = cell.path(out) / METRICS_FILE, cell.path(out) / SCORES_FILE
    if not (metrics.is_file() and scores.is_file()):
        return False
    try:
        record = json.loads(metrics.read_text())
        made_with = record["cell_fingerprint"]
    except (ValueError, KeyError):
        return False
    if made_with != digest(components):
        changes = describe_changes(record.get("cell_fingerprint_components", {}), components)
        log.warning(
            "%s was made with other settings or data (%s); recomputing it",
            cell.path(out),
            "; ".join(changes) or "an older ueo",
        )
        return False
    return True


def status(suite: Suite, sweep: Sweep, out: str | Path) -> list[tuple[Cell, bool]]:
    """The plan with what already exists (for --dry-run)."""
    return [
        (c, is_done(c, Path(out), cell_components(suite, sweep, c))) for c in plan(suite, sweep)
    ]


def _restore(net: torch.nn.Module, pristine: dict[str, torch.Tensor]) -> None:
    """Undo a cell's adaptation: only the norm affines of the shared model ever change."""
    with torch.no_grad():
        for name, p in norm_parameters(net, "all").items():
            p.copy_(pristine[name])


def run_sweep(
    suite: Suite,
    sweep: Sweep,
    out: str | Path,
    on_cell: Callable[[Cell], None] | None = None,
    *,
    cells: list[Cell] | None = None,
    before: Callable[[Cell], bool] | None = None,
    images: ImageCache | None = None,
) -> list[tuple[Cell, dict]]:
    """Run every missing cell; complete cells are read back, so a sweep resumes where it stopped.

    Returns (cell, metrics record) for every cell of the plan (or of `cells`, a part of it);
    `on_cell` is told of each cell as it is done or read back (progress of a sweep run in
    another process); `before` is asked before a cell is computed, and False stops the sweep
    there. `images` holds the decoded images (default: a store of the default size).

    A cell's numbers do not depend on the cells run before it in the process: each starts
    from the pristine model, its prompt is built after seeding with its seed, and its
    zero-shot outputs are those of its own prompt.
    """
    out = Path(out)
    cells = plan(suite, sweep) if cells is None else cells
    device = resolve_device(sweep.runtime.device)
    clip: LoadedClip | None = None
    pristine: dict[str, torch.Tensor] = {}
    zeroshot_cache: dict[tuple, tuple[dict[str, int], Outputs]] = {}
    images = images if images is not None else ImageCache()  # each image decoded once
    results = []
    for n, cell in enumerate(cells, 1):
        components = cell_components(suite, sweep, cell)
        if is_done(cell, out, components):
            record = json.loads((cell.path(out) / METRICS_FILE).read_text())
            results.append((cell, record))
            if on_cell is not None:
                on_cell(cell)
            continue
        if before is not None and not before(cell):
            break
        if clip is None:
            clip = load_clip(sweep.model, sweep.pretrained, device, sweep.runtime.channels_last)
            pristine = {k: v.detach().clone() for k, v in norm_parameters(clip.model).items()}
        else:
            _restore(clip.model, pristine)
        domain = suite.domain(cell.domain)
        names, unlabeled, test = suite.scenario_sets(domain, cell.scenario)
        if not len(unlabeled):
            raise UeoError(f"Domain {cell.domain} has no images of the {cell.scenario} classes.")
        recipe = sweep.cell_recipe(cell)
        ctx = (recipe.n_ctx, recipe.ctx_init.strip())  # a random context: from the cell's seed
        model = UeoModel(clip, names, *ctx, seed=recipe.seed).to(device)
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
            zeroshot_cache, model, domain, names, unlabeled, test, recipe, sweep.runtime, images
        )
        staging = staging_dir(cell.path(out))
        resume = _resumable(staging, model, recipe, unlabeled, test)
        staging.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with logged_to(staging / LOG_FILE):
            log.info("computed by process %d on %s, device %s", os.getpid(), gethostname(), device)
            result = adapt(
                model,
                unlabeled,
                recipe,
                sweep.runtime,
                test=test,
                zeroshot=zs,
                checkpoint_dir=staging,
                resume=resume,
                cache=images,
            )
            log.info("  done in %.1f s", time.perf_counter() - start)
            extra = {
                "cell": asdict(cell),
                "suite": suite.name,
                "cell_fingerprint": digest(components),
                "cell_fingerprint_components": components,
            }
            _save_scores(staging / SCORES_FILE, result, test)
            record = save_run(staging, model, result, extra)
        publish(staging, cell.path(out))
        results.append((cell, record))
        if on_cell is not None:
            on_cell(cell)
    return results


def _resumable(staging: Path, model: UeoModel, recipe: Recipe, unlabeled, test) -> bool:
    """Whether a cell's interrupted run can be continued; one made with other settings or
    data is discarded, saying what changed."""
    path = staging / CHECKPOINT_FILE
    if not path.is_file():
        if staging.exists():
            shutil.rmtree(staging)
        return False
    current = run_identity(
        model.clip.model_name, model.clip.pretrained, model.class_names, recipe, unlabeled, test
    )
    try:
        stored = load_checkpoint(path)[1].get("identity") or {}
    except UeoError as exc:
        log.warning("%s; starting the cell over", exc)
        stored = {}
    changes = describe_changes(stored, current)
    if changes:
        log.warning("Discarding %s, made with other settings: %s", path, "; ".join(changes))
        shutil.rmtree(staging)
        return False
    return True


def _shared_zeroshot(
    cache, model, domain, names, unlabeled, test, recipe, runtime, images
) -> dict[str, Outputs]:
    """Zero-shot outputs of the scenario's sets, sliced from one pass over the whole domain.

    The pass serves every cell whose prompt starts the same: the same known classes and
    context, and, for a random context (--ctx-init ''), the same seed."""
    r = recipe
    seed = None if r.ctx_init.strip() else r.seed
    key = (domain.name, tuple(names), r.precision, r.ctx_init, r.n_ctx, seed)
    if key not in cache:
        paths = sorted(set(domain.unlabeled.paths) | set(domain.test.paths))
        everything = ImageSet(paths, np.full(len(paths), OOD), domain.name)
        out = infer(
            model,
            everything,
            runtime,
            precision=r.precision,
            desc=f"zero-shot {domain.name}",
            cache=images,
        )
        cache.clear()
        cache[key] = (PathIndex(paths), out)
    index, out = cache[key]

    def take(images: ImageSet) -> Outputs:
        rows = index.positions(images.paths)
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
    path = run_dir / SCORES_FILE
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # object arrays: ValueError
        raise UeoError(f"{path} is not a file of plain score arrays: {exc}") from None
