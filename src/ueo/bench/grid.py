"""The checks of a benchmark grid's options that need no heavy library (torch-free), and
its recipe.

`ueo bench` runs them before it imports torch, so that a mistyped shard, a value listed twice
or options of two data sources at once are answered at once; `Sweep.validate` and
`bench_suite` run the same checks for Python callers.
"""

from __future__ import annotations

from ueo.bench.protocol import SCENARIOS, dataset_info
from ueo.errors import UeoError
from ueo.methods import get_method, method_names
from ueo.names import normalize_name
from ueo.recipe import MAX_SEED, Recipe


def default_methods() -> list[str]:
    """Every registered method that needs no labels: what a benchmark compares by default."""
    return [m for m in method_names() if not get_method(m).needs_labels]


def bench_recipe(dataset: str | None, **settings) -> Recipe:
    """The reference recipe for `dataset` (its epochs), with `settings` overriding it."""
    base = Recipe(epochs=dataset_info(dataset).epochs) if dataset else Recipe()
    return base.replace(**settings).validate()


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` -> (K, N): this job runs the K-th of N contiguous parts of the grid, of about
    equal work (ueo.bench.plan.plan)."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UeoError(f"--shard must be K/N with 0 <= K < N, not {text!r}.") from None
    if not 0 <= k < n:
        raise UeoError(f"--shard must be K/N with 0 <= K < N, not {text!r}.")
    return k, n


def check_grid(
    methods: list[str],
    scenarios: list[str],
    seeds: list[int],
    domains: list[str] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> None:
    """Known methods and scenarios, seeds in range, a valid shard, and no list empty or naming
    a value twice: a value listed twice would count one run as two in the mean and std."""
    grid = {"methods": methods, "scenarios": scenarios, "seeds": seeds}
    if domains is not None:
        grid["domains"] = domains
    for name, values in grid.items():
        if not values:
            raise UeoError(f"--{name} is empty.")
        seen = set()
        for value in values:
            if value in seen:
                raise UeoError(f"--{name} lists {value} twice.")
            seen.add(value)
    for m in methods:
        get_method(m)
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise UeoError(
            f"Unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}."
        )
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise UeoError(f"--seeds must be integers in [0, {MAX_SEED}], not {seed!r}.")
    k, n = shard
    if not 0 <= k < n:
        raise UeoError(f"A shard must be K/N with 0 <= K < N, not {k}/{n}.")


def check_source(
    *,
    dataset: str | None = None,
    root: str | None = None,
    lists: str | None = None,
    data: str | None = None,
    all_classes: str | list[str] | None = None,
    known: int | None = None,
    known_classes: list[str] | None = None,
) -> None:
    """One data source: a paper dataset (`--dataset` with `--root`) or a labelled folder
    (`--data` with `--all-classes` and `--known` or `--known-classes`), never options of both."""
    if bool(dataset) == bool(data):
        raise UeoError(
            "Give either --dataset (with --root) or --data (with --all-classes, --known)."
        )
    if dataset:
        folder_options = {
            "--all-classes": all_classes,
            "--known": known is not None,
            "--known-classes": known_classes,
        }
        given = [flag for flag, value in folder_options.items() if value]
        if given:
            raise UeoError(f"{', '.join(given)}: only with --data, not with --dataset.")
        if not root:
            raise UeoError("--dataset needs --root, the dataset folder.")
        dataset_info(dataset)
        return
    if root or lists:
        raise UeoError("--root and --lists: only with --dataset, not with --data.")
    if not all_classes:
        raise UeoError("--data needs --all-classes (all class names, label order).")


def check_known(names: list[str], known: int | None, known_classes: list[str] | None) -> None:
    """Which classes of a labelled folder (`names`) are known: `--known N` (1 <= N <= the
    number of classes) or `--known-classes` (names of the list, none twice), not both."""
    if known is not None and known_classes:
        raise UeoError("Give --known or --known-classes, not both.")
    if known_classes:
        seen = set()
        for name in known_classes:
            key = normalize_name(name)
            if key in seen:
                raise UeoError(f"--known-classes lists {name} twice.")
            seen.add(key)
        missing = seen - {normalize_name(n) for n in names}
        if missing:
            raise UeoError(f"--known-classes not in --all-classes: {', '.join(sorted(missing))}")
    elif known is None:
        raise UeoError("Give --known N or --known-classes for a custom benchmark.")
    elif isinstance(known, bool) or not isinstance(known, int) or not 1 <= known <= len(names):
        raise UeoError(
            f"--known must be between 1 and the number of classes ({len(names)}), not {known!r}."
        )
