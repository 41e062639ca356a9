"""A benchmark grid as data: the suite it runs on (domains, class names, scenarios' class
sets), its cells (domain x scenario x method x seed) in run order, and their shares of work
for shards and processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ueo.bench.grid import check_grid, default_methods
from ueo.bench.protocol import PAPER_SCENARIOS
from ueo.clip import check_model
from ueo.data import OOD, ImageSet
from ueo.errors import UeoError
from ueo.methods import get_method
from ueo.recipe import Recipe, Runtime
from ueo.runtime import checked_runtime


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
