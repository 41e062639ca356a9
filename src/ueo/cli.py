"""The `ueo` command: parses arguments and calls the Python API, nothing more."""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from ueo import __version__
from ueo.errors import UeoError

if TYPE_CHECKING:
    from ueo.adaptation import AdaptConfig

log = logging.getLogger("ueo")


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--model",
        required=required,
        help="open_clip architecture, e.g. RN50, ViT-B/16, ueo-tiny-rn",
    )
    p.add_argument(
        "--pretrained",
        default=None if not required else "openai",
        help="open_clip tag (openai, laion2b_s34b_b79k, ...), a local checkpoint file, "
        "'bundled' (ueo's tiny models) or 'none' (random weights, tests only). Default: openai",
    )


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    from ueo.runtime import PRECISIONS

    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes (default 4)")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=list(PRECISIONS),
        help="autocast precision; parameters and loss stay fp32 (default fp32)",
    )
    p.add_argument("--eval-batch-size", type=int, default=256, help="inference batch (default 256)")
    p.add_argument(
        "--on-bad-image",
        default="skip",
        choices=["skip", "error"],
        help="unreadable images: skip with a warning (default) or stop",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_data_args(p: argparse.ArgumentParser, flag: str = "--data") -> None:
    p.add_argument(
        flag,
        required=True,
        dest="data",
        help="image folder (root/<class>/<img>), image-list file or folder of loose images",
    )
    p.add_argument("--data-root", default=None, help="root for relative paths of an image list")


def build_parser() -> argparse.ArgumentParser:
    from ueo.adaptation import METHODS, AdaptConfig
    from ueo.prompts import DEFAULT_CTX_INIT

    d = AdaptConfig()
    parser = argparse.ArgumentParser(
        prog="ueo",
        description="Unsupervised universal fine-tuning of CLIP models (UEO, ICML 2024).",
    )
    parser.add_argument("--version", action="version", version=f"ueo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("adapt", help="adapt a model on unlabeled images")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument(
        "--classes", required=True, help="class names: a file (one per line) or a comma list"
    )
    p.add_argument("--test-data", default=None, help="optional labelled test set to evaluate on")
    p.add_argument("--method", default=d.method, choices=METHODS, help=f"default {d.method}")
    p.add_argument("--out", required=True, help="run directory (adapter, metrics.json, log.txt)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--lr-prompt", type=float, default=d.lr_prompt, help="context lr; 0 freezes it")
    p.add_argument(
        "--lr-norm", type=float, default=d.lr_norm, help="norm-affine lr; 0 freezes them"
    )
    p.add_argument(
        "--trade", type=float, default=d.trade, help="lambda of the marginal entropy term"
    )
    p.add_argument(
        "--n-ctx", type=int, default=None, help="context tokens (default: length of --ctx-init)"
    )
    p.add_argument(
        "--ctx-init",
        default=DEFAULT_CTX_INIT,
        help=f"context initialisation (default '{DEFAULT_CTX_INIT}'; '' = random)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument(
        "--augment",
        default="default",
        choices=["default", "none"],
        help="'none' trains with the test transform (deterministic)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the image tower (GPU)")
    _add_runtime_args(p)

    p = sub.add_parser("eval", help="evaluate an adapted or zero-shot model on labelled images")
    p.add_argument("--adapter", default=None, help="adapter.safetensors (or its run directory)")
    p.add_argument("--zeroshot", action="store_true", help="evaluate the zero-shot model instead")
    _add_model_args(p, required=False)
    p.add_argument("--classes", default=None, help="class names (with --zeroshot)")
    _add_data_args(p)
    p.add_argument("--out", default=None, help="directory for metrics.json")
    _add_runtime_args(p)

    p = sub.add_parser("predict", help="label images with an adapted model")
    p.add_argument("--adapter", required=True, help="adapter.safetensors (or its run directory)")
    p.add_argument("--pretrained", default=None, help="override the base weights in the adapter")
    p.add_argument("--images", required=True, help="folder of images or an image-list file")
    p.add_argument("--data-root", default=None, help="root for relative paths of an image list")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="MCM threshold below which an image is unknown (default: stored in adapter)",
    )
    _add_runtime_args(p)

    p = sub.add_parser("models", help="list model architectures and pretrained tags")
    p.add_argument("--tags", action="store_true", help="also list pretrained tags")

    _add_protocol_commands(sub)
    _add_bench_command(sub)

    p = sub.add_parser(
        "demo", help="offline demo: a bundled tiny CLIP on the universal-shift testbed"
    )
    p.add_argument("--out", default="runs/demo", help="default runs/demo")
    p.add_argument("--quick", action="store_true", help="one domain, fewer epochs (~2 minutes)")
    p.add_argument("--model", default="ueo-tiny-rn", choices=["ueo-tiny-rn", "ueo-tiny-vit"])
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _add_protocol_commands(sub) -> None:
    from ueo.benchmarks import DATASETS, SCENARIOS

    p = sub.add_parser("prepare", help="write image-list files for a benchmark dataset")
    p.add_argument("dataset", help=", ".join(DATASETS))
    p.add_argument("--root", required=True, help="dataset folder as downloaded")
    p.add_argument("--out", required=True, help="folder for the list files")
    p.add_argument("--domains", default=None, help="comma list (default: all domains)")

    p = sub.add_parser("protocol", help="class-index sets of a benchmark scenario")
    p.add_argument("dataset", help=", ".join(DATASETS))
    p.add_argument("--scenario", required=True, type=str.upper, choices=SCENARIOS)
    p.add_argument("--json", action="store_true", help="print JSON (default: readable text)")


def _add_bench_command(sub) -> None:
    from ueo.adaptation import AdaptConfig

    d = AdaptConfig()
    p = sub.add_parser("bench", help="run a benchmark grid: domains x scenarios x methods x seeds")
    src = p.add_argument_group("data (a paper benchmark, or a labelled folder of your own)")
    src.add_argument("--dataset", default=None, help="office31, officehome, visda-c, domainnet")
    src.add_argument("--root", default=None, help="dataset folder as downloaded")
    src.add_argument("--lists", default=None, help="list files of `ueo prepare` (default: made)")
    src.add_argument("--data", default=None, help="labelled folder root/<class>/<img>")
    src.add_argument("--classes", default=None, help="all class names of --data, label order")
    src.add_argument("--known", type=int, default=None, help="the first N classes are known")
    src.add_argument("--known-classes", default=None, help="comma list of the known classes")
    p.add_argument("--domains", default=None, help="comma list (default: all with data)")
    p.add_argument("--scenarios", default="CDA,PDA,ODA,OPDA", help="default CDA,PDA,ODA,OPDA")
    p.add_argument(
        "--methods",
        default="zeroshot,entmin,infomax,ueo",
        help="default zeroshot,entmin,infomax,ueo",
    )
    p.add_argument("--seeds", default=str(d.seed), help=f"comma list (default {d.seed})")
    p.add_argument("--model", default="RN50", help="default RN50")
    p.add_argument("--pretrained", default="openai", help="default openai")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: 5 for DomainNet, 50 otherwise (the reference recipes)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr-prompt", type=float, default=d.lr_prompt)
    p.add_argument("--lr-norm", type=float, default=d.lr_norm)
    p.add_argument("--trade", type=float, default=d.trade)
    p.add_argument("--augment", default="default", choices=["default", "none"])
    p.add_argument("--shard", default="0/1", help="K/N: run every N-th cell from K (one per GPU)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and what exists")
    _add_runtime_args(p)


def _setup_logging(quiet: bool, epochs: bool = True) -> None:
    """Log to stderr; `epochs=False` keeps per-epoch lines of sweeps off the terminal."""
    from ueo.runtime import LOG_FORMAT

    log.setLevel(logging.INFO)
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LOG_FORMAT)
    if quiet:
        handler.setLevel(logging.WARNING)
    if not epochs:
        handler.addFilter(lambda record: record.name != "ueo.epochs")
    log.addHandler(handler)
    log.propagate = False


def cmd_adapt(args) -> int:
    from ueo.adaptation import adapt
    from ueo.api import load_model, save_run
    from ueo.data import load_image_set, parse_classes
    from ueo.io import write_text
    from ueo.reports import metrics_table
    from ueo.runtime import captured_log

    _setup_logging(args.quiet)
    out = Path(args.out)
    with captured_log() as buffer:
        try:
            names = parse_classes(args.classes)
            unlabeled = load_image_set(args.data, names, args.data_root)
            test = load_image_set(args.test_data, names, args.data_root) if args.test_data else None
            config = _config(args)
            config.validate()
            log.info(
                "ueo %s adapt: %s/%s, %d classes, %d unlabeled images, method %s",
                __version__,
                args.model,
                args.pretrained,
                len(names),
                len(unlabeled),
                args.method,
            )
            model = load_model(
                args.model, args.pretrained, names, args.n_ctx, args.ctx_init or None, args.device
            )
            out.mkdir(parents=True, exist_ok=True)
            result = adapt(model, unlabeled, config, test, progress=not args.quiet)
            record = save_run(
                out,
                model,
                result,
                {
                    "model": args.model,
                    "pretrained": args.pretrained,
                    "data": args.data,
                    "test_data": args.test_data,
                    "n_ctx": model.prompt.n_ctx,
                    "ctx_init": args.ctx_init,
                },
            )
            print(metrics_table(record))
            log.info("wrote %s (%.1f s)", out, result.wall_time_s)
        finally:
            if out.is_dir():
                write_text(out / "log.txt", buffer.getvalue())
    return 0


def cmd_eval(args) -> int:
    from ueo.api import evaluate, load_adapted, load_model
    from ueo.data import load_image_set, parse_classes
    from ueo.io import write_json
    from ueo.reports import metrics_table

    if bool(args.adapter) == bool(args.zeroshot):
        raise UeoError(
            "Give either --adapter or --zeroshot (with --model, --pretrained, --classes)."
        )
    if args.zeroshot:
        if not (args.model and args.classes):
            raise UeoError("--zeroshot needs --model, --pretrained and --classes.")
        names = parse_classes(args.classes)
        model = load_model(args.model, args.pretrained or "openai", names, device=args.device)
        source = {"model": args.model, "pretrained": args.pretrained or "openai", "zeroshot": True}
    else:
        model, meta = load_adapted(args.adapter, args.device, args.pretrained)
        names = meta["class_names"]
        source = {
            "adapter": str(args.adapter),
            "model": meta["model"],
            "pretrained": meta["pretrained"],
        }
    images = load_image_set(args.data, names, args.data_root)
    metrics = evaluate(
        model,
        images,
        args.device,
        args.eval_batch_size,
        args.workers,
        args.precision,
        args.on_bad_image,
        not args.quiet,
    )
    record = {**source, "data": args.data, "metrics": metrics}
    print(metrics_table({"zeroshot" if args.zeroshot else "adapted": {"eval": metrics}}))
    if args.out:
        write_json(Path(args.out) / "metrics.json", record)
    return 0


def cmd_predict(args) -> int:
    from ueo.api import load_adapted, predict
    from ueo.data import load_image_set
    from ueo.io import write_text

    model, meta = load_adapted(args.adapter, args.device, args.pretrained)
    threshold = args.threshold if args.threshold is not None else meta.get("threshold")
    if threshold is None:
        raise UeoError("The adapter stores no threshold; pass --threshold.")
    images = load_image_set(args.images, meta["class_names"], args.data_root)
    rows = predict(
        model,
        images,
        threshold,
        args.device,
        args.eval_batch_size,
        args.workers,
        args.precision,
        not args.quiet,
    )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "pred", "prob", "mcm", "is_unknown"])
    writer.writeheader()
    writer.writerows(rows)
    write_text(args.out, buf.getvalue())
    unknown = sum(r["is_unknown"] for r in rows)
    print(
        f"{len(rows)} images, {unknown} flagged unknown (threshold {threshold:.6g}) -> {args.out}"
    )
    skipped = len(images) - len(rows)
    if skipped:
        print(f"{skipped} unreadable image(s) skipped", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    import open_clip

    from ueo.zoo import register_tiny_models

    register_tiny_models()
    for name in open_clip.list_models():
        tags = open_clip.list_pretrained_tags_by_model(name) if args.tags else []
        print(name + (f"  [{', '.join(tags)}]" if tags else ""))
    return 0


def cmd_prepare(args) -> int:
    from ueo.prepare import prepare_lists

    domains = args.domains.split(",") if args.domains else None
    written = prepare_lists(args.dataset, args.root, args.out, domains)
    for name, path in written.items():
        n = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"{name}: {n} images -> {path}")
    return 0


def cmd_protocol(args) -> int:
    from ueo.benchmarks import protocol_json, scenario_split

    if args.json:
        print(protocol_json(args.dataset, args.scenario))
    else:
        split = scenario_split(args.dataset, args.scenario)
        for key, values in split.items():
            print(f"{key:>9}: {_ranges(values)}  ({len(values)} classes)")
    return 0


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5', the way SPEC.md writes class sets."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}-{v}" if v != start else str(v))
            start = None
    return ", ".join(parts)


def cmd_bench(args) -> int:
    from ueo.adaptation import AdaptConfig
    from ueo.data import parse_classes
    from ueo.sweep import SweepOptions, bench, benchmark_suite, folder_suite, status

    _setup_logging(args.quiet, epochs=False)
    out = Path(args.out)
    if bool(args.dataset) == bool(args.data):
        raise UeoError("Give either --dataset (with --root) or --data (with --classes, --known).")
    if args.dataset:
        if not args.root:
            raise UeoError("--dataset needs --root, the dataset folder.")
        from ueo.benchmarks import dataset_info
        from ueo.prepare import prepare_lists

        info = dataset_info(args.dataset)
        lists = args.lists
        if lists is None:
            lists = out / "lists"
            prepare_lists(info.name, args.root, lists, _split(args.domains))
        suite = benchmark_suite(info.name, lists, args.root)
        epochs = args.epochs if args.epochs is not None else (5 if info.name == "domainnet" else 50)
    else:
        if not args.classes:
            raise UeoError("--data needs --classes (all class names, label order).")
        known_classes = _split(args.known_classes)
        suite = folder_suite(args.data, parse_classes(args.classes), args.known, known_classes)
        epochs = args.epochs if args.epochs is not None else AdaptConfig().epochs
    try:
        k, n = (int(v) for v in args.shard.split("/"))
        assert 0 <= k < n
    except (ValueError, AssertionError):
        raise UeoError(f"--shard must be K/N with 0 <= K < N, not {args.shard!r}.") from None
    try:
        seeds = [int(s) for s in _split(args.seeds)]
    except ValueError:
        raise UeoError(f"--seeds must be integers, not {args.seeds!r}.") from None
    config = _config(args, epochs=epochs)
    config.validate()
    options = SweepOptions(
        scenarios=[s.upper() for s in _split(args.scenarios)],
        methods=_split(args.methods),
        seeds=seeds,
        model=args.model,
        pretrained=args.pretrained,
        config=config,
        domains=_domains(suite.name, args.domains) if args.domains else None,
        shard=(k, n),
        progress=not args.quiet,
    )
    if args.dry_run:
        cells = status(suite, options, out)
        for cell, done in cells:
            print(f"{'done' if done else 'todo'}  {cell.path(out)}")
        print(f"{sum(d for _, d in cells)}/{len(cells)} cells complete")
        return 0
    report = bench(suite, options, out)
    print((out / "results.md").read_text())
    for name, path in report["files"].items():
        log.info("wrote %s: %s", name, path)
    return 0


def cmd_demo(args) -> int:
    from ueo.demo import run_demo, table

    _setup_logging(args.quiet, epochs=False)
    results = run_demo(args.out, args.quick, args.model, args.device, not args.quiet)
    print(table(results))
    print(f"\nwrote {args.out}/results.json, results.md, results.csv and plots/*.png")
    return 0


def _config(args, **overrides) -> AdaptConfig:
    """The adaptation settings named on the command line (every AdaptConfig field it has)."""
    from ueo.adaptation import AdaptConfig

    given = {f.name: getattr(args, f.name) for f in fields(AdaptConfig) if hasattr(args, f.name)}
    return AdaptConfig(**{**given, **overrides})


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _domains(suite: str, text: str) -> list[str]:
    """Canonical benchmark domain names; custom suites keep the names as given."""
    from ueo.benchmarks import DATASETS, domain_name

    names = _split(text)
    return [domain_name(suite, d) for d in names] if suite in DATASETS else names


COMMANDS = {
    "bench": cmd_bench,
    "demo": cmd_demo,
    "adapt": cmd_adapt,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "models": cmd_models,
    "prepare": cmd_prepare,
    "protocol": cmd_protocol,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2; no tracebacks for them."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UeoError as exc:
        print(f"ueo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ueo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
