"""`ueo eval`: metrics of an adapted or zero-shot model on labelled images (ueo.jobs.eval_job)."""

from __future__ import annotations

from ueo.checks import check_data, check_eval_source, check_input_path, check_output_dir
from ueo.cli.options import (
    PRETRAINED_HELP,
    add_data_args,
    add_model_args,
    add_runtime_args,
    main_process,
    runtime_of,
    use_available_cpus,
)
from ueo.errors import UeoError
from ueo.names import parse_classes


def add(sub) -> None:
    p = sub.add_parser("eval", help="evaluate an adapted or zero-shot model on labelled images")
    p.add_argument("--adapter", default=None, help="adapter.safetensors (or its run directory)")
    p.add_argument("--zeroshot", action="store_true", help="evaluate the zero-shot model instead")
    add_model_args(
        p,
        required=False,
        pretrained_help=f"with --zeroshot: {PRETRAINED_HELP} (default openai); with --adapter: "
        "other base weights than those the adapter names (default: the adapter's)",
    )
    p.add_argument("--classes", default=None, help="known class names (with --zeroshot)")
    add_data_args(p)
    p.add_argument("--out", default=None, help="directory for metrics.json")
    add_runtime_args(p)
    p.set_defaults(check=check, run=run)


def check(args) -> None:
    if args.unlabeled:
        raise UeoError(
            "ueo eval measures the predictions against the images' labels; --unlabeled reads "
            "the images without them."
        )
    check_eval_source(bool(args.adapter), args.zeroshot, bool(args.model), bool(args.classes))
    runtime_of(args)
    if args.out is not None:
        check_output_dir(args.out)
    if args.adapter:
        check_input_path(args.adapter, "Adapter file")
    check_data(args.data)
    if args.classes:
        parse_classes(args.classes)


def run(args) -> int:
    use_available_cpus()
    from ueo.jobs import eval_job
    from ueo.reports import metrics_table

    runtime = runtime_of(args)
    record = eval_job(
        args.data,
        adapter=args.adapter,
        model=args.model,
        pretrained=args.pretrained,
        classes=args.classes,
        runtime=runtime,
        data_root=args.data_root,
        out=args.out,
    )
    phase = "zeroshot" if args.zeroshot else "adapted"
    if main_process():
        print(metrics_table({phase: {"eval": record["metrics"]}}))
    return 0
