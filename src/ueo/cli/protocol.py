"""`ueo protocol`: the class-index sets of a benchmark scenario (ueo.bench.protocol)."""

from __future__ import annotations

from ueo.bench.protocol import SCENARIOS
from ueo.cli.options import add_dataset_arg, dataset_of


def add(sub) -> None:
    p = sub.add_parser("protocol", help="class-index sets of a benchmark scenario")
    add_dataset_arg(p)
    p.add_argument("--scenario", required=True, type=str.upper, choices=SCENARIOS)
    p.add_argument("--json", action="store_true", help="print JSON (default: readable text)")
    p.set_defaults(check=check, run=run)


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5', the way docs/spec.md writes class sets."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}-{v}" if v != start else str(v))
            start = None
    return ", ".join(parts)


def check(args) -> None:
    args.dataset = dataset_of(args)


def run(args) -> int:
    from ueo.bench.protocol import protocol_json, scenario_split

    dataset = dataset_of(args)
    if args.json:
        print(protocol_json(dataset, args.scenario))
    else:
        split = scenario_split(dataset, args.scenario)
        for key, values in split.items():
            print(f"{key:>9}: {_ranges(values)}  ({len(values)} classes)")
    return 0
