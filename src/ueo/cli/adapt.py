"""`ueo adapt`: adapt a model on unlabeled images (ueo.jobs.adapt_job)."""

from __future__ import annotations

from ueo.checks import check_data, check_input_path, check_output_dir, check_resume_overwrite
from ueo.cli.options import (
    add_data_args,
    add_model_args,
    add_recipe_args,
    add_runtime_args,
    main_process,
    recipe_settings,
    runtime_of,
    use_available_cpus,
)
from ueo.logs import setup_logging
from ueo.names import parse_classes
from ueo.recipe import Recipe


def add(sub) -> None:
    p = sub.add_parser("adapt", help="adapt a model on unlabeled images")
    add_model_args(p)
    add_data_args(p)
    p.add_argument(
        "--classes", required=True, help="class names: a file (one per line) or a comma list"
    )
    p.add_argument("--test-data", default=None, help="optional labelled test set to evaluate on")
    p.add_argument("--out", required=True, help="run directory (adapter, metrics.json, log.txt)")
    p.add_argument(
        "--resume", action="store_true", help="continue the interrupted run of --out (checkpoint)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run already in --out, if any"
    )
    add_recipe_args(p)
    add_runtime_args(p, training=True)
    p.set_defaults(check=check, run=run)


def check(args) -> None:
    Recipe(**recipe_settings(args)).validate()
    runtime_of(args)
    check_resume_overwrite(args.resume, args.overwrite)
    check_output_dir(args.out)
    check_data(args.data)
    if args.test_data:
        check_input_path(args.test_data)
    parse_classes(args.classes)


def run(args) -> int:
    use_available_cpus()
    from ueo.jobs import adapt_job
    from ueo.reports import metrics_table

    recipe = Recipe(**recipe_settings(args)).validate()
    runtime = runtime_of(args)
    setup_logging(args.quiet)
    record = adapt_job(
        args.out,
        model=args.model,
        pretrained=args.pretrained or "openai",
        data=args.data,
        classes=args.classes,
        recipe=recipe,
        runtime=runtime,
        test_data=args.test_data,
        data_root=args.data_root,
        unlabeled=args.unlabeled,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    if main_process():
        print(metrics_table(record))
    return 0
