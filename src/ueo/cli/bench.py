"""`ueo bench`: a benchmark grid of domains x scenarios x methods x seeds (ueo.bench.jobs),
in one process, a torchrun world or --shard jobs."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ueo.bench.grid import (
    bench_recipe,
    check_grid,
    check_known,
    check_source,
    default_methods,
    parse_shard,
)
from ueo.bench.protocol import DATASETS, PAPER_SCENARIOS
from ueo.checks import check_input_path, check_output_dir
from ueo.cli.options import (
    BENCH_GRID_FIELDS,
    add_recipe_args,
    add_runtime_args,
    comma_list,
    recipe_settings,
    runtime_of,
    use_available_cpus,
)
from ueo.errors import UeoError
from ueo.launch import launch_from_env
from ueo.logs import setup_logging
from ueo.names import parse_classes
from ueo.recipe import Recipe

log = logging.getLogger("ueo")


def add(sub) -> None:
    methods = default_methods()
    p = sub.add_parser("bench", help="run a benchmark grid: domains x scenarios x methods x seeds")
    src = p.add_argument_group("data (a paper benchmark, or a labelled folder of your own)")
    src.add_argument("--dataset", default=None, help=", ".join(DATASETS))
    src.add_argument("--root", default=None, help="dataset folder as downloaded")
    src.add_argument("--lists", default=None, help="list files of `ueo prepare` (default: made)")
    src.add_argument("--data", default=None, help="labelled folder root/<class>/<img>")
    src.add_argument("--all-classes", default=None, help="all class names of --data, label order")
    src.add_argument("--classes", dest="old_classes", default=None, help=argparse.SUPPRESS)
    src.add_argument("--known", type=int, default=None, help="the first N classes are known")
    src.add_argument("--known-classes", default=None, help="comma list of the known classes")
    p.add_argument("--domains", default=None, help="comma list (default: all with data)")
    p.add_argument("--scenarios", default=",".join(PAPER_SCENARIOS), help="default %(default)s")
    p.add_argument("--methods", default=",".join(methods), help="default %(default)s")
    p.add_argument("--seeds", default=str(Recipe().seed), help="comma list (default %(default)s)")
    p.add_argument("--model", default="RN50", help="default RN50")
    p.add_argument("--pretrained", default="openai", help="default openai")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument(
        "--shard",
        default="0/1",
        help="K/N: run the K-th of N parts of the grid (N jobs of a scheduler); under torchrun "
        "the processes share the grid without it",
    )
    p.add_argument("--dry-run", action="store_true", help="list the cells and what exists")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="compute nothing: write the report from the cells that exist, naming those missing",
    )
    add_recipe_args(p, skip=BENCH_GRID_FIELDS, helps={"epochs": _bench_epochs_help()})
    add_runtime_args(p, training=True)
    p.set_defaults(check=check, run=run)


def _bench_epochs_help() -> str:
    """The truth about bench's default epochs: each paper dataset's recipe."""
    default = Recipe().epochs
    other = [f"{name} {info.epochs}" for name, info in DATASETS.items() if info.epochs != default]
    return (
        f"passes over the unlabeled set (default: the dataset's recipe, {default}; "
        f"{', '.join(other)})"
    )


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in comma_list(text) or []]
    except ValueError:
        raise UeoError(f"--seeds must be integers, not {text!r}.") from None


def bench_source(args) -> dict:
    """`bench`'s data source, as `check_source` and `bench_suite` take it."""
    return {
        "dataset": args.dataset,
        "root": args.root,
        "lists": args.lists,
        "data": args.data,
        "all_classes": args.all_classes,
        "known": args.known,
        "known_classes": comma_list(args.known_classes),
    }


def bench_grid(args) -> dict:
    """`bench`'s grid, as `check_grid` and `Sweep` take it."""
    return {
        "methods": comma_list(args.methods) or [],
        "scenarios": [s.upper() for s in comma_list(args.scenarios) or []],
        "seeds": _seeds(args.seeds),
        "domains": comma_list(args.domains),
        "shard": parse_shard(args.shard),
    }


def _print_plan(suite, sweep, out: Path, processes: int) -> None:
    """The cells and which exist; under torchrun, also which process will compute each."""
    from ueo.bench.cells import status
    from ueo.bench.plan import shares

    cells = status(suite, sweep, out)
    owner = {}
    if processes > 1:
        todo = [c for c, done in cells if not done]
        parts = shares(suite, sweep, todo, processes)
        owner = {c: f"rank {r}  " for r, part in enumerate(parts) for c in part}
    for cell, done in cells:
        print(f"{'done' if done else 'todo'}  {owner.get(cell, '')}{cell.path(out)}")
    print(f"{sum(d for _, d in cells)}/{len(cells)} cells complete")


def check(args) -> None:
    if args.old_classes:
        if args.all_classes:
            raise UeoError("--classes is the former name of --all-classes: give only one.")
        print(
            "ueo: warning: bench --classes is deprecated: it names all classes in label order, "
            "now --all-classes.",
            file=sys.stderr,
        )
        args.all_classes, args.old_classes = args.old_classes, None
    source = bench_source(args)
    check_source(**source)
    check_grid(**bench_grid(args))
    bench_recipe(args.dataset, **recipe_settings(args))
    runtime_of(args)
    if args.dry_run and args.report_only:
        raise UeoError("Give --dry-run or --report-only, not both.")
    check_output_dir(args.out)
    if args.data:
        check_input_path(args.data)
        check_known(parse_classes(args.all_classes), args.known, source["known_classes"])
    else:
        check_input_path(args.root, "Dataset root")
        if args.lists:
            check_input_path(args.lists, "--lists")


def run(args) -> int:
    use_available_cpus()
    from ueo.bench.jobs import bench, bench_suite, canonical_domains
    from ueo.bench.plan import Sweep
    from ueo.bench.world import OtherRankFailed, cell_board

    launch = launch_from_env()
    recipe = bench_recipe(args.dataset, **recipe_settings(args))
    sweep = Sweep(
        model=args.model,
        pretrained=args.pretrained,
        recipe=recipe,
        runtime=runtime_of(args),
        **bench_grid(args),
    ).validate()
    setup_logging(args.quiet, epochs=False)
    suite = bench_suite(args.out, **bench_source(args), domains=comma_list(args.domains))
    sweep.domains = canonical_domains(suite, sweep.domains)
    if (args.dry_run or args.report_only) and launch.rank > 0:
        return 0  # rank 0 says it for every process
    if args.dry_run:
        _print_plan(suite, sweep, Path(args.out), launch.size)
        return 0
    if args.report_only:
        report = bench(suite, sweep, args.out, report_only=True)
    else:
        with cell_board(launch) as board:
            try:
                report = bench(suite, sweep, args.out, board=board)
            except OtherRankFailed as exc:
                if exc.echo:
                    raise
                return 2  # rank 0 says what failed
    if not report["files"]:
        return 0  # another process (rank 0) writes the report
    print(report["files"]["md"].read_text())
    for name, path in report["files"].items():
        log.info("wrote %s: %s", name, path)
    return 0
