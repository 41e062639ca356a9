"""The `ueo` command: parses arguments, calls one Python function per command, prints.

Each command has three parts: `_add_<name>_command` builds its parser, `check_<name>` checks
every option that can be checked without a heavy library (numbers, choices, option
combinations, class lists, input and output paths), and `cmd_<name>` runs it. Building the
parser and the checks import no torch, open_clip, scikit-learn or matplotlib, so that
`ueo --help` and a mistyped option are answered at once: each command imports what it runs
when it runs. The command line sits above the three layers (ueo, ueo.bench, ueo.demo) and may
use all of them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from ueo import __version__
from ueo.bench.grid import bench_recipe, check_grid, check_known, check_source, parse_shard
from ueo.bench.protocol import DATASETS, PAPER_SCENARIOS, SCENARIOS, dataset_info
from ueo.checks import (
    check_data,
    check_input_path,
    check_output_dir,
    check_output_file,
    check_threshold,
)
from ueo.demo import BUNDLED_MODELS
from ueo.errors import UeoError
from ueo.launch import check_launch_device, launch_from_env
from ueo.methods import get_method, method_names
from ueo.names import parse_classes
from ueo.recipe import (
    AUGMENTATIONS,
    BAD_IMAGE_POLICIES,
    LOG_TARGETS,
    NONFINITE_POLICIES,
    NORM_LAYERS,
    PRECISIONS,
    DiscoverSettings,
    Recipe,
    Runtime,
)

log = logging.getLogger("ueo")

# The recipe's options, declared once for `adapt` and `bench`: field -> (type, help, choices).
RECIPE_OPTIONS: dict[str, tuple] = {
    "method": (str, "training method", None),
    "epochs": (int, "passes over the unlabeled set", None),
    "batch_size": (int, "training batch size", None),
    "lr_prompt": (float, "prompt-context learning rate; 0 freezes it", None),
    "lr_norm": (float, "norm-affine learning rate; 0 freezes them", None),
    "trade": (float, "lambda, weight of the marginal-entropy term", None),
    "seed": (int, "random seed", None),
    "augment": (str, "'none' trains with the test transform (deterministic)", AUGMENTATIONS),
    "precision": (str, "autocast precision; parameters and loss stay fp32", PRECISIONS),
    "norm_layers": (
        str,
        "image-tower norm layers tuned: the reference script's set, or all of them",
        NORM_LAYERS,
    ),
    "n_ctx": (int, "context tokens (default: length of --ctx-init)", None),
    "ctx_init": (str, "context initialisation ('' = random, needs --n-ctx)", None),
    "pouf_transport": (float, "pouf: weight of the conditional-transport term", None),
    "pouf_im": (float, "pouf: weight of the information-maximisation term", None),
    "upl_k": (int, "upl: pseudo-labelled images kept per predicted class", None),
    "on_nonfinite": (
        str,
        "a non-finite loss, gradient or parameter: stop the run, or skip the step",
        NONFINITE_POLICIES,
    ),
}
BENCH_GRID_FIELDS = ("method", "seed")  # bench takes lists of these: --methods, --seeds
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_recipe_args(
    p: argparse.ArgumentParser, skip: tuple[str, ...] = (), helps: dict[str, str] | None = None
) -> None:
    """The recipe's options; `helps` replaces the help of some (a default that differs)."""
    defaults = Recipe()
    group = p.add_argument_group("recipe (what determines the numbers)")
    for name, (kind, text, choices) in RECIPE_OPTIONS.items():
        if name in skip:
            continue
        if name == "method":
            choices = method_names()
        default = getattr(defaults, name)
        group.add_argument(
            _flag(name),
            dest=name,
            type=kind,
            choices=choices,
            default=argparse.SUPPRESS,
            help=(helps or {}).get(name)
            or (f"{text} (default {default!r})" if default is not None else text),
        )


def _add_runtime_args(p: argparse.ArgumentParser, training: bool = False) -> None:
    group = p.add_argument_group("runtime (how to run; never changes the numbers)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    group.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data-loading processes (default: from the CPUs this process may use)",
    )
    group.add_argument(
        "--eval-batch-size", type=int, default=256, help="inference batch (default 256)"
    )
    group.add_argument(
        "--on-bad-image",
        default="skip",
        choices=BAD_IMAGE_POLICIES,
        help="unreadable images: skip with a warning (default) or stop",
    )
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    if training:
        group.add_argument(
            "--compile", action="store_true", help="torch.compile the forward pass (both towers)"
        )
        group.add_argument(
            "--eval-every",
            type=int,
            default=0,
            help="also evaluate every N epochs, for learning curves (default 0: before and after)",
        )
        group.add_argument(
            "--log",
            default="files",
            choices=LOG_TARGETS,
            help="files (default: metrics.json, log.txt) or also TensorBoard events of the curves",
        )


PRETRAINED_HELP = (
    "open_clip tag (openai, laion2b_s34b_b79k, ...), a local checkpoint file, "
    "'bundled' (ueo's tiny models) or 'none' (random weights, tests only)"
)


def _add_model_args(
    p: argparse.ArgumentParser, required: bool = True, pretrained_help: str | None = None
) -> None:
    p.add_argument(
        "--model",
        required=required,
        help="open_clip architecture, e.g. RN50, ViT-B/16, ueo-tiny-rn",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help=pretrained_help or f"{PRETRAINED_HELP}. Default: openai",
    )


DATA_HELP = (
    "image folder (root/<class>/<img>), image list (one 'path label' or one path per line), "
    "- (the list on standard input), a folder of loose images or one image file"
)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """`--data`, the image set of every command (`--images`: predict's former name for it),
    where an image list's paths are rooted, and `--unlabeled`."""
    p.add_argument(
        "--data",
        "--images",
        required=True,
        dest="data",
        metavar="DATA",
        help=f"{DATA_HELP} (--images: the same option, its former name in predict)",
    )
    p.add_argument("--data-root", default=None, help="root for relative paths of an image list")
    p.add_argument(
        "--unlabeled",
        action="store_true",
        help="read --data without labels: every image under the folder, at any depth, in sorted "
        "order, whatever its subfolders are called (a list's labels are dropped)",
    )


def _add_dataset_arg(p: argparse.ArgumentParser) -> None:
    """A paper benchmark, named as an option (`--dataset`, as `ueo bench` does) or positionally."""
    p.add_argument("dataset", nargs="?", default=None, help=", ".join(DATASETS))
    p.add_argument(
        "--dataset",
        dest="dataset_option",
        metavar="NAME",
        default=None,
        help="the same as the positional DATASET",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ueo",
        description="Unsupervised universal fine-tuning of CLIP models (UEO, ICML 2024).",
    )
    parser.add_argument("--version", action="version", version=f"ueo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_adapt_command(sub)
    _add_eval_command(sub)
    _add_predict_command(sub)
    _add_models_command(sub)
    _add_prepare_command(sub)
    _add_protocol_command(sub)
    _add_bench_command(sub)
    _add_discover_command(sub)
    _add_demo_command(sub)
    _add_diagnose_command(sub)
    return parser


def _add_adapt_command(sub) -> None:
    p = sub.add_parser("adapt", help="adapt a model on unlabeled images")
    _add_model_args(p)
    _add_data_args(p)
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
    _add_recipe_args(p)
    _add_runtime_args(p, training=True)


def _add_eval_command(sub) -> None:
    p = sub.add_parser("eval", help="evaluate an adapted or zero-shot model on labelled images")
    p.add_argument("--adapter", default=None, help="adapter.safetensors (or its run directory)")
    p.add_argument("--zeroshot", action="store_true", help="evaluate the zero-shot model instead")
    _add_model_args(
        p,
        required=False,
        pretrained_help=f"with --zeroshot: {PRETRAINED_HELP} (default openai); with --adapter: "
        "other base weights than those the adapter names (default: the adapter's)",
    )
    p.add_argument("--classes", default=None, help="known class names (with --zeroshot)")
    _add_data_args(p)
    p.add_argument("--out", default=None, help="directory for metrics.json")
    _add_runtime_args(p)


def _add_predict_command(sub) -> None:
    p = sub.add_parser("predict", help="label images with an adapted model")
    p.add_argument("--adapter", required=True, help="adapter.safetensors (or its run directory)")
    p.add_argument("--pretrained", default=None, help="override the base weights in the adapter")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="MCM threshold in [0, 1] below which an image is unknown (default: the adapter's)",
    )
    _add_runtime_args(p)


def _add_models_command(sub) -> None:
    p = sub.add_parser("models", help="list model architectures and pretrained tags")
    p.add_argument("--tags", action="store_true", help="also list pretrained tags")


def _add_prepare_command(sub) -> None:
    p = sub.add_parser("prepare", help="write image-list files for a benchmark dataset")
    _add_dataset_arg(p)
    p.add_argument("--root", required=True, help="dataset folder as downloaded")
    p.add_argument("--out", required=True, help="folder for the list files")
    p.add_argument("--domains", default=None, help="comma list (default: all domains)")


def _add_protocol_command(sub) -> None:
    p = sub.add_parser("protocol", help="class-index sets of a benchmark scenario")
    _add_dataset_arg(p)
    p.add_argument("--scenario", required=True, type=str.upper, choices=SCENARIOS)
    p.add_argument("--json", action="store_true", help="print JSON (default: readable text)")


def _bench_epochs_help() -> str:
    """The truth about bench's default epochs: each paper dataset's recipe."""
    default = Recipe().epochs
    other = [f"{name} {info.epochs}" for name, info in DATASETS.items() if info.epochs != default]
    return (
        f"passes over the unlabeled set (default: the dataset's recipe, {default}; "
        f"{', '.join(other)})"
    )


def _add_bench_command(sub) -> None:
    methods = [m for m in method_names() if not get_method(m).needs_labels]
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
    _add_recipe_args(p, skip=BENCH_GRID_FIELDS, helps={"epochs": _bench_epochs_help()})
    _add_runtime_args(p, training=True)


def _add_demo_command(sub) -> None:
    p = sub.add_parser(
        "demo", help="offline demo: a bundled tiny CLIP on the universal-shift testbed"
    )
    p.add_argument("--out", default="runs/demo", help="default runs/demo")
    p.add_argument("--quick", action="store_true", help="one domain, fewer epochs")
    p.add_argument("--model", default=BUNDLED_MODELS[0], choices=BUNDLED_MODELS)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_diagnose_command(sub) -> None:
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


def _add_discover_command(sub) -> None:
    p = sub.add_parser(
        "discover", help="group and name the images an adapted model rejects as unknown"
    )
    p.add_argument("--adapter", required=True, help="adapter.safetensors (or its run directory)")
    p.add_argument("--pretrained", default=None, help="override the base weights in the adapter")
    _add_data_args(p)
    p.add_argument(
        "--vocabulary",
        default=None,
        help="candidate names, one per line (default: WordNet's nouns, Debian's wordnet-base)",
    )
    p.add_argument(
        "--out", required=True, help="folder for clusters.csv, clusters.md, sheets/, discover.json"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="MCM threshold in [0, 1] below which an image is unknown (default: the adapter's)",
    )
    p.add_argument(
        "--clusters", type=int, default=None, help="number of clusters (default: chosen)"
    )
    p.add_argument(
        "--k-select",
        default="silhouette",
        choices=("silhouette", "gcd"),
        help="how the number of clusters is chosen (default silhouette)",
    )
    p.add_argument("--max-clusters", type=int, default=15, help="largest number tried (default 15)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    _add_runtime_args(p)


def recipe_settings(args: argparse.Namespace) -> dict:
    """The recipe options given on the command line (the others keep their defaults)."""
    return {f.name: getattr(args, f.name) for f in fields(Recipe) if hasattr(args, f.name)}


def runtime_of(args: argparse.Namespace) -> Runtime:
    """The runtime options, checked; under torchrun, a device every process can take."""
    check_launch_device(launch_from_env(), args.device)
    return Runtime(
        device=args.device,
        workers=args.workers,
        eval_batch_size=args.eval_batch_size,
        progress=not args.quiet,
        compile=getattr(args, "compile", False),
        eval_every=getattr(args, "eval_every", 0),
        log=getattr(args, "log", "files"),
        on_bad_image=args.on_bad_image,
    ).validate()


def _setup_logging(quiet: bool, epochs: bool = True) -> None:
    """Log to stderr; `epochs=False` keeps per-epoch lines of sweeps off the terminal. Under
    torchrun each process says its rank, and only rank 0 says more than warnings."""
    from ueo.runtime import LOG_FORMAT

    launch = launch_from_env()
    log.setLevel(logging.INFO)
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LOG_FORMAT)
    if launch.size > 1:
        marked = f"%(asctime)s %(levelname)s rank {launch.rank}: %(message)s"
        handler.setFormatter(logging.Formatter(marked, LOG_FORMAT.datefmt))
    if quiet or launch.rank > 0:
        handler.setLevel(logging.WARNING)
    if not epochs:
        handler.addFilter(lambda record: record.name != "ueo.epochs")
    log.addHandler(handler)
    log.propagate = False


def _main_process() -> bool:
    """Under torchrun, only rank 0 prints results (every process computes them)."""
    return launch_from_env().rank == 0


def _use_available_cpus() -> None:
    """Import torch, with no more intra-op threads than the CPUs this process may use."""
    from ueo.runtime import use_available_cpus

    use_available_cpus()


# --- checks: everything that can be checked before torch is imported -------------------------


def check_adapt(args) -> None:
    Recipe(**recipe_settings(args)).validate()
    runtime_of(args)
    if args.resume and args.overwrite:
        raise UeoError("Give --resume or --overwrite, not both.")
    check_output_dir(args.out)
    check_data(args.data)
    if args.test_data:
        check_input_path(args.test_data)
    parse_classes(args.classes)


def check_eval(args) -> None:
    if args.unlabeled:
        raise UeoError(
            "ueo eval measures the predictions against the images' labels; --unlabeled reads "
            "the images without them."
        )
    if bool(args.adapter) == bool(args.zeroshot):
        raise UeoError("Give either --adapter or --zeroshot (with --model and --classes).")
    if args.adapter and (args.model or args.classes):
        raise UeoError("--model and --classes go with --zeroshot; an adapter names its own.")
    if args.zeroshot and not (args.model and args.classes):
        raise UeoError(
            "A zero-shot evaluation needs --model and --classes (--pretrained: default openai)."
        )
    runtime_of(args)
    if args.out is not None:
        check_output_dir(args.out)
    if args.adapter:
        check_input_path(args.adapter, "Adapter file")
    check_data(args.data)
    if args.classes:
        parse_classes(args.classes)


def check_predict(args) -> None:
    runtime_of(args)
    check_threshold(args.threshold)
    check_output_file(args.out)
    check_input_path(args.adapter, "Adapter file")
    check_data(args.data)


def discover_settings(args) -> DiscoverSettings:
    return DiscoverSettings(args.clusters, args.k_select, args.max_clusters, args.seed).validate()


def check_discover(args) -> None:
    runtime_of(args)
    discover_settings(args)
    check_threshold(args.threshold)
    check_output_dir(args.out)
    check_input_path(args.adapter, "Adapter file")
    check_data(args.data)
    if args.vocabulary:
        check_input_path(args.vocabulary, "Vocabulary file")


def check_diagnose(args) -> None:
    for run in args.runs:
        check_input_path(run, "Run folder")


def _dataset(args) -> str:
    """The dataset of `prepare` / `protocol`, given positionally or as --dataset (not both
    different); its name is checked."""
    given = [d for d in (args.dataset, args.dataset_option) if d]
    if not given:
        raise UeoError(f"Name the dataset (--dataset NAME): one of {', '.join(DATASETS)}.")
    if len(given) == 2 and dataset_info(given[0]) != dataset_info(given[1]):
        raise UeoError(f"Two datasets given ({given[0]} and {given[1]}): give one.")
    return dataset_info(given[0]).name


def check_prepare(args) -> None:
    args.dataset = _dataset(args)
    check_output_dir(args.out)
    check_input_path(args.root, "Dataset root")


def check_protocol(args) -> None:
    args.dataset = _dataset(args)


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in _split(text) or []]
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
        "known_classes": _split(args.known_classes),
    }


def bench_grid(args) -> dict:
    """`bench`'s grid, as `check_grid` and `Sweep` take it."""
    return {
        "methods": _split(args.methods) or [],
        "scenarios": [s.upper() for s in _split(args.scenarios) or []],
        "seeds": _seeds(args.seeds),
        "domains": _split(args.domains),
        "shard": parse_shard(args.shard),
    }


def check_bench(args) -> None:
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


def check_demo(args) -> None:
    Runtime(device=args.device, workers=0, progress=not args.quiet).validate()
    check_output_dir(args.out)


# --- commands -------------------------------------------------------------------------------


def cmd_adapt(args) -> int:
    _use_available_cpus()
    from ueo.jobs import adapt_job
    from ueo.reports import metrics_table

    recipe = Recipe(**recipe_settings(args)).validate()
    runtime = runtime_of(args)
    _setup_logging(args.quiet)
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
    if _main_process():
        print(metrics_table(record))
    return 0


def cmd_eval(args) -> int:
    _use_available_cpus()
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
    if _main_process():
        print(metrics_table({phase: {"eval": record["metrics"]}}))
    return 0


def cmd_predict(args) -> int:
    _use_available_cpus()
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
    if not _main_process():
        return 0
    print(
        f"{summary['images']} images, {summary['unknown']} flagged unknown "
        f"(threshold {summary['threshold']:.6g}) -> {summary['out']}"
    )
    if summary["skipped"]:
        print(f"{summary['skipped']} unreadable image(s) skipped", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    from ueo.clip import list_models

    for name, tags in list_models(args.tags):
        print(name + (f"  [{', '.join(tags)}]" if tags else ""))
    return 0


def cmd_prepare(args) -> int:
    from ueo.bench.prepare import prepare_lists

    written = prepare_lists(_dataset(args), args.root, args.out, _split(args.domains))
    for name, path in written.items():
        n = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"{name}: {n} images -> {path}")
    return 0


def cmd_protocol(args) -> int:
    from ueo.bench.protocol import protocol_json, scenario_split

    dataset = _dataset(args)
    if args.json:
        print(protocol_json(dataset, args.scenario))
    else:
        split = scenario_split(dataset, args.scenario)
        for key, values in split.items():
            print(f"{key:>9}: {_ranges(values)}  ({len(values)} classes)")
    return 0


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


def cmd_bench(args) -> int:
    _use_available_cpus()
    from ueo.bench.jobs import bench, bench_suite, canonical_domains
    from ueo.bench.sweep import Sweep
    from ueo.bench.world import OtherRankFailed, joined

    launch = launch_from_env()
    recipe = bench_recipe(args.dataset, **recipe_settings(args))
    sweep = Sweep(
        model=args.model,
        pretrained=args.pretrained,
        recipe=recipe,
        runtime=runtime_of(args),
        **bench_grid(args),
    ).validate()
    _setup_logging(args.quiet, epochs=False)
    suite = bench_suite(args.out, **bench_source(args), domains=_split(args.domains))
    sweep.domains = canonical_domains(suite, sweep.domains)
    if (args.dry_run or args.report_only) and launch.rank > 0:
        return 0  # rank 0 says it for every process
    if args.dry_run:
        _print_plan(suite, sweep, Path(args.out), launch.size)
        return 0
    if args.report_only:
        report = bench(suite, sweep, args.out, report_only=True)
    else:
        with joined(launch) as world:
            try:
                report = bench(suite, sweep, args.out, world=world)
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


def _print_plan(suite, sweep, out: Path, processes: int) -> None:
    """The cells and which exist; under torchrun, also which process will compute each."""
    from ueo.bench.sweep import shares, status

    cells = status(suite, sweep, out)
    owner = {}
    if processes > 1:
        todo = [c for c, done in cells if not done]
        parts = shares(suite, sweep, todo, processes)
        owner = {c: f"rank {r}  " for r, part in enumerate(parts) for c in part}
    for cell, done in cells:
        print(f"{'done' if done else 'todo'}  {owner.get(cell, '')}{cell.path(out)}")
    print(f"{sum(d for _, d in cells)}/{len(cells)} cells complete")


def cmd_demo(args) -> int:
    if args.device == "cpu":
        # The parts' fork server starts before this process imports torch, so that its
        # imports run while this process makes its own (ueo.demo.processes).
        from ueo.demo.processes import start_part_server

        start_part_server()
    _use_available_cpus()
    from ueo.demo.runner import run_demo, table

    runtime = Runtime(device=args.device, workers=0, progress=not args.quiet).validate()
    _setup_logging(args.quiet, epochs=False)
    results = run_demo(args.out, quick=args.quick, model=args.model, runtime=runtime)
    print(table(results))
    print(f"\nwrote {args.out}/results.json, results.md, results.csv and plots/*.png")
    return 0


def cmd_diagnose(args) -> int:
    import json

    from ueo.compare import compare_runs, plain
    from ueo.reports import diagnose_report

    result = compare_runs(args.runs)
    if args.json:
        print(json.dumps(plain(result), indent=1))
    else:
        print(diagnose_report(result))
    return 0


def cmd_discover(args) -> int:
    _use_available_cpus()
    from ueo.discovery_files import discovery_table
    from ueo.jobs import discover_job

    settings = discover_settings(args)
    runtime = runtime_of(args)
    _setup_logging(args.quiet)
    found, _ = discover_job(
        args.adapter,
        args.data,
        args.out,
        vocabulary=args.vocabulary,
        pretrained=args.pretrained,
        threshold=args.threshold,
        settings=settings,
        runtime=runtime,
        data_root=args.data_root,
        unlabeled=args.unlabeled,
    )
    print(discovery_table(found))
    print(f"\nwrote {args.out}/clusters.csv, clusters.md, discover.json and sheets/*.png")
    return 0


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


COMMANDS = {
    "adapt": cmd_adapt,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "models": cmd_models,
    "prepare": cmd_prepare,
    "protocol": cmd_protocol,
    "bench": cmd_bench,
    "demo": cmd_demo,
    "diagnose": cmd_diagnose,
    "discover": cmd_discover,
}
CHECKS = {  # run before anything heavy is imported; a command without one has nothing to check
    "adapt": check_adapt,
    "eval": check_eval,
    "predict": check_predict,
    "prepare": check_prepare,
    "protocol": check_protocol,
    "bench": check_bench,
    "demo": check_demo,
    "diagnose": check_diagnose,
    "discover": check_discover,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2; no tracebacks for them.

    A command's options are checked (CHECKS) before it imports torch. A closed output
    (`ueo models | head -0`) ends the command with one line and exit code 141.
    """
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:  # --help, --version or a usage error, printed: flushed here too
            sys.stdout.flush()
            raise
        check = CHECKS.get(args.command)
        if check is not None:
            check(args)
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed output is found here, not at the interpreter's exit
        return code
    except UeoError as exc:
        print(f"ueo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"ueo: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _output_closed()
    finally:
        if "ueo.distributed" in sys.modules:  # leave torchrun's process group cleanly
            sys.modules["ueo.distributed"].end_world()


def _output_closed() -> int:
    """The reader of stdout went away: say so on stderr and point stdout at /dev/null, so
    that Python's last flush of the unwritten output at exit does not fail a second time."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a Python caller's stream: no descriptor
        fd = None
    if fd is not None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    try:
        print("ueo: stopped: the output was closed (broken pipe)", file=sys.stderr)
    except OSError:
        pass
    return BROKEN_PIPE_EXIT


if __name__ == "__main__":
    sys.exit(main())
