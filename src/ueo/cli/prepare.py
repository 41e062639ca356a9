"""`ueo prepare`: image-list files of a benchmark dataset as downloaded (ueo.bench.prepare)."""

from __future__ import annotations

from ueo.checks import check_input_path, check_output_dir
from ueo.cli.options import add_dataset_arg, comma_list, dataset_of


def add(sub) -> None:
    p = sub.add_parser("prepare", help="write image-list files for a benchmark dataset")
    add_dataset_arg(p)
    p.add_argument("--root", required=True, help="dataset folder as downloaded")
    p.add_argument("--out", required=True, help="folder for the list files")
    p.add_argument("--domains", default=None, help="comma list (default: all domains)")
    p.set_defaults(check=check, run=run)


def check(args) -> None:
    args.dataset = dataset_of(args)
    check_output_dir(args.out)
    check_input_path(args.root, "Dataset root")


def run(args) -> int:
    from ueo.bench.prepare import prepare_lists

    written = prepare_lists(dataset_of(args), args.root, args.out, comma_list(args.domains))
    for name, path in written.items():
        n = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"{name}: {n} images -> {path}")
    return 0
