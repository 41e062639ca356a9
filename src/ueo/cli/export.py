"""`ueo export`: an adapted model as ONNX and as plain open_clip weights (ueo.export)."""

from __future__ import annotations

from ueo.checks import check_choice, check_input_path
from ueo.cli.options import use_available_cpus
from ueo.logs import setup_logging


def add(sub) -> None:
    p = sub.add_parser(
        "export", help="write an adapted model as ONNX and as plain open_clip weights"
    )
    p.add_argument("--adapter", required=True, help="adapter.safetensors (or its run directory)")
    p.add_argument(
        "--out",
        required=True,
        help="folder to write: model.onnx, open_clip/, classes.txt, export.json, README.md",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        help="fp32 (default) or fp16 (the image tower in fp16, for GPU runtimes)",
    )
    p.add_argument("--pretrained", default=None, help="override the base weights in the adapter")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    p.set_defaults(check=check, run=run)


def check(args) -> None:
    from ueo.deploy import PRECISIONS, check_export_dir, needs_onnx

    check_choice("precision", args.precision, PRECISIONS)
    check_input_path(args.adapter, "Adapter file")
    check_export_dir(args.out, args.overwrite)
    needs_onnx("onnx", "onnxruntime")


def run(args) -> int:
    use_available_cpus()
    from ueo.export import export_adapter

    setup_logging(args.quiet)
    record = export_adapter(
        args.adapter,
        args.out,
        precision=args.precision,
        pretrained=args.pretrained,
        overwrite=args.overwrite,
    )
    check = record["self_check"]
    agreed = (
        f"onnxruntime within {check['max_abs_probs']:.1g} of ueo's probabilities on "
        f"{check['images']} random images"
        if check["checked"]
        else f"not checked: {check['why']}"
    )
    print(
        f"{record['model']} with {len(record['class_names'])} classes, {record['precision']}, "
        f"threshold {record['threshold']:.6g} -> {args.out} ({agreed})"
    )
    return 0
