"""`ueo stream`: predict images as they arrive, adapting while predicting
(ueo.stream.run.stream_job)."""

from __future__ import annotations

import sys

from ueo.checks import (
    check_data,
    check_int,
    check_output_dir,
    check_resume_overwrite,
    check_threshold,
)
from ueo.cli.options import (
    add_data_args,
    add_model_args,
    add_recipe_args,
    recipe_settings,
    use_available_cpus,
)
from ueo.launch import check_launch_device, launch_from_env
from ueo.logs import setup_logging
from ueo.names import parse_classes
from ueo.recipe import BAD_IMAGE_POLICIES, Recipe, Runtime
from ueo.stream.settings import DEFAULT_CHECKPOINT_EVERY, RESETS, StreamSettings, stream_methods


def add(sub) -> None:
    p = sub.add_parser(
        "stream",
        help="predict images as they arrive, adapting while predicting",
        description="Take the images of --data in order, B at a time: predict each batch with "
        "the current model (rows appended to OUT/predictions.csv), then update on it.",
    )
    add_model_args(p)
    p.add_argument("--classes", required=True, help="known class names: a file or a comma list")
    add_data_args(p)
    p.add_argument("--out", required=True, help="run folder: predictions.csv, adapter, metrics")
    p.add_argument(
        "--method",
        default="ueo",
        choices=stream_methods(),
        help="the update of every batch: a training method (one step) or tda (default ueo)",
    )
    p.add_argument(
        "--reset",
        default="none",
        choices=RESETS,
        help="back to the zero-shot state: never (default), after every batch, or at each "
        "change of the list's domain column",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="fixed MCM threshold in [0, 1] (default: Otsu's over the scores so far)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=DEFAULT_CHECKPOINT_EVERY,
        help=f"batches between checkpoints (default {DEFAULT_CHECKPOINT_EVERY}; 0: only when "
        "stopped by a signal)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a stream in --out")
    add_recipe_args(
        p,
        skip=("method", "epochs", "augment"),
        helps={"batch_size": "images per batch (default 64; 1 allowed)"},
    )
    group = p.add_argument_group("runtime (how to run; never changes the numbers)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    group.add_argument(
        "--on-bad-image",
        default="skip",
        choices=BAD_IMAGE_POLICIES,
        help="unreadable images: skip with a warning, counted (default), or stop",
    )
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(check=check, run=run)


def settings_of(args) -> StreamSettings:
    recipe = Recipe(**recipe_settings(args))
    return StreamSettings(
        method=args.method,
        batch_size=recipe.batch_size,
        reset=args.reset,
        threshold=args.threshold,
        recipe=recipe,
    )


def runtime_of(args) -> Runtime:
    check_launch_device(launch_from_env(), args.device)
    return Runtime(
        device=args.device, progress=not args.quiet, on_bad_image=args.on_bad_image
    ).validate()


def check(args) -> None:
    runtime_of(args)
    settings_of(args).validate()
    check_threshold(args.threshold)
    check_int("checkpoint-every", args.checkpoint_every, 0)
    check_resume_overwrite(args.resume, args.overwrite)
    check_output_dir(args.out)
    check_data(args.data)
    parse_classes(args.classes)


def run(args) -> int:
    use_available_cpus()
    from ueo.reports import fmt
    from ueo.stream.run import stream_job

    setup_logging(args.quiet)
    record = stream_job(
        args.out,
        model=args.model,
        pretrained=args.pretrained or "openai",
        classes=args.classes,
        data=args.data,
        settings=settings_of(args),
        runtime=runtime_of(args),
        data_root=args.data_root,
        unlabeled=args.unlabeled,
        resume=args.resume,
        overwrite=args.overwrite,
        checkpoint_every=args.checkpoint_every,
    )
    latency = record["latency_s"]["median"]
    print(
        f"{record['images']} images in {record['batches']} batches, {record['unknown']} flagged "
        f"unknown (threshold now {record['threshold']:.6g}); {record['images_per_s']:.1f} "
        f"images/s, median latency {1000 * latency:.1f} ms -> {args.out}"
    )
    online = record["online"]
    if online is not None:
        m = online["all"]
        print(
            f"online: ACC {fmt(m['acc'])}  AUROC {fmt(m['auroc'])}  H {fmt(m['h'])}  "
            f"FPR95 {fmt(m['fpr95'])}"
        )
    if record["skipped_images"]:
        print(f"{record['skipped_images']} unreadable image(s) skipped", file=sys.stderr)
    return 0
