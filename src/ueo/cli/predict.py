"""`ueo predict`: a CSV row per image from an adapted model (ueo.jobs.predict_job)."""

from __future__ import annotations

import sys

from ueo.checks import check_data, check_input_path, check_output_file, check_threshold
from ueo.cli.options import (
    add_data_args,
    add_runtime_args,
    main_process,
    runtime_of,
    use_available_cpus,
)


def add(sub) -> None:
    p = sub.add_parser("predict", help="label images with an adapted model")
    p.add_argument("--adapter", required=True, help="adapter.safetensors (or its run directory)")
    p.add_argument("--pretrained", default=None, help="override the base weights in the adapter")
    add_data_args(p)
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="MCM threshold in [0, 1] below which an image is unknown (default: the adapter's)",
    )
    add_runtime_args(p)
    p.set_defaults(check=check, run=run)


def check(args) -> None:
    runtime_of(args)
    check_threshold(args.threshold)
    check_output_file(args.out)
    check_input_path(args.adapter, "Adapter file")
    check_data(args.data)


def run(args) -> int:
    use_available_cpus()
    from ueo.jobs import predict_job

    runtime = runtime_of(args)
    summary = predict_job(
        args.adapter,
        args.data,
        args.out,
        pretrained=args.pretrained,
        threshold=args.threshold,
        runtime=runtime,
        data_root=args.data_root,
        unlabeled=args.unlabeled,
    )
    if not main_process():
        return 0
    print(
        f"{summary['images']} images, {summary['unknown']} flagged unknown "
        f"(threshold {summary['threshold']:.6g}) -> {summary['out']}"
    )
    if summary["skipped"]:
        print(f"{summary['skipped']} unreadable image(s) skipped", file=sys.stderr)
    return 0
