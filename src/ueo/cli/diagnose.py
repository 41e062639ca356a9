"""`ueo diagnose`: runs compared by their label-free scores (ueo.diagnose), torch-free."""

from __future__ import annotations

from ueo.checks import check_input_path


def add(sub) -> None:
    p = sub.add_parser(
        "diagnose", help="compare runs by label-free scores: which to keep, and how sure"
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run folders (or their metrics.json); a folder of runs stands for all of them",
    )
    p.add_argument("--json", action="store_true", help="print JSON (default: readable text)")
    p.set_defaults(check=check, run=run)


def check(args) -> None:
    for run in args.runs:
        check_input_path(run, "Run folder")


def run(args) -> int:
    import json

    from ueo.diagnose import compare_runs, to_json
    from ueo.reports import diagnose_report

    result = compare_runs(args.runs)
    if args.json:
        print(json.dumps(to_json(result), indent=1))
    else:
        print(diagnose_report(result))
    return 0
