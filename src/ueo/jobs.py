"""What each `ueo` command does, as one Python call: the command line only parses and prints.

Each job reads its inputs, runs the API of ueo.api and writes its files; the return value is
plain data the caller may print.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

from ueo import __version__
from ueo.api import adapt, evaluate, load_adapted, load_model, predict, save_run
from ueo.clip import check_model
from ueo.data import load_image_set, parse_classes
from ueo.errors import UeoError
from ueo.io import check_output_dir, check_output_file, load_adapter, write_json, write_text
from ueo.recipe import Recipe, Runtime
from ueo.runs import LOG_FILE, METRICS_FILE
from ueo.runtime import captured_log, checked_runtime

log = logging.getLogger("ueo")

PREDICTION_FIELDS = ("path", "pred", "prob", "mcm", "is_unknown")


def adapt_job(
    out: str | os.PathLike,
    *,
    model: str,
    pretrained: str,
    data: str,
    classes: str | list[str],
    recipe: Recipe | None = None,
    runtime: Runtime | None = None,
    test_data: str | None = None,
    data_root: str | None = None,
) -> dict:
    """`ueo adapt`: adapt on `data`, write adapter.safetensors, metrics.json and log.txt."""
    recipe = (recipe or Recipe()).validate()
    runtime = checked_runtime(runtime, recipe.precision)
    out = check_output_dir(out)
    check_model(model, pretrained)
    with captured_log() as buffer:
        try:
            names = parse_classes(classes) if isinstance(classes, str) else list(classes)
            unlabeled = load_image_set(data, names, data_root)
            test = load_image_set(test_data, names, data_root) if test_data else None
            log.info(
                "ueo %s adapt: %s/%s, %d classes, %d unlabeled images, method %s",
                __version__,
                model,
                pretrained,
                len(names),
                len(unlabeled),
                recipe.method,
            )
            net = load_model(
                model,
                pretrained,
                names,
                recipe,
                device=runtime.device,
                channels_last=runtime.channels_last,
            )
            out.mkdir(parents=True, exist_ok=True)
            result = adapt(net, unlabeled, recipe, runtime, test=test)
            record = save_run(
                out, net, result, {"data": str(data), "test_data": test_data and str(test_data)}
            )
            log.info("wrote %s (%.1f s)", out, result.wall_time_s)
        finally:
            if out.is_dir():
                write_text(out / LOG_FILE, buffer.getvalue())
    return record


def eval_job(
    data: str,
    *,
    adapter: str | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    classes: str | list[str] | None = None,
    runtime: Runtime | None = None,
    data_root: str | None = None,
    out: str | os.PathLike | None = None,
) -> dict:
    """`ueo eval`: metrics of an adapter (or, without one, of the zero-shot `model`)."""
    runtime = checked_runtime(runtime)
    if out is not None:
        check_output_dir(out)
    if adapter:
        if model or classes:
            raise UeoError("--model and --classes go with --zeroshot; an adapter names its own.")
        meta = adapter_metadata(adapter, runtime, pretrained)
        images = load_image_set(data, meta["class_names"], data_root)
        net, meta = load_adapted(adapter, runtime.device, pretrained, runtime.channels_last)
        precision = meta["recipe"]["precision"]
        # The base weights used: the adapter's, or the `pretrained` that overrides them.
        source = {
            "adapter": str(adapter),
            "model": meta["model"],
            "pretrained": net.clip.pretrained,
        }
    else:
        if not (model and classes):
            raise UeoError("A zero-shot evaluation needs --model, --pretrained and --classes.")
        pretrained = pretrained or "openai"
        check_model(model, pretrained)
        names = parse_classes(classes) if isinstance(classes, str) else list(classes)
        images = load_image_set(data, names, data_root)
        net = load_model(
            model, pretrained, names, device=runtime.device, channels_last=runtime.channels_last
        )
        precision = "fp32"
        source = {"model": model, "pretrained": pretrained, "zeroshot": True}
    metrics = evaluate(net, images, runtime, precision=precision)
    record = {**source, "data": str(data), "metrics": metrics}
    if out:
        write_json(Path(out) / METRICS_FILE, record)
    return record


def predict_job(
    adapter: str,
    images: str,
    out: str | os.PathLike,
    *,
    pretrained: str | None = None,
    threshold: float | None = None,
    runtime: Runtime | None = None,
    data_root: str | None = None,
) -> dict:
    """`ueo predict`: one CSV row per readable image; returns counts and the threshold used."""
    runtime = checked_runtime(runtime)
    check_threshold(threshold)
    out = check_output_file(out)
    meta = adapter_metadata(adapter, runtime, pretrained)
    threshold = threshold if threshold is not None else meta.get("threshold")
    if threshold is None:
        raise UeoError("The adapter stores no threshold; pass --threshold.")
    image_set = load_image_set(images, meta["class_names"], data_root)
    net, meta = load_adapted(adapter, runtime.device, pretrained, runtime.channels_last)
    rows = predict(net, image_set, threshold, runtime, precision=meta["recipe"]["precision"])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(PREDICTION_FIELDS))
    writer.writeheader()
    writer.writerows(rows)
    write_text(out, buf.getvalue())
    return {
        "images": len(rows),
        "unknown": sum(r["is_unknown"] for r in rows),
        "skipped": len(image_set) - len(rows),
        "threshold": threshold,
        "out": str(out),
    }


def check_threshold(threshold: float | None) -> None:
    """An MCM threshold is a softmax probability: a number in [0, 1] (None: the adapter's)."""
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise UeoError(f"--threshold must be a number in [0, 1], not {threshold!r}.")
    if not 0.0 <= threshold <= 1.0:  # NaN fails both comparisons
        raise UeoError(f"--threshold must be in [0, 1] (an MCM score), not {threshold}.")


def adapter_metadata(adapter: str | os.PathLike, runtime: Runtime, pretrained: str | None) -> dict:
    """An adapter's metadata once its recipe, model and base weights (or the `pretrained` that
    overrides them) and the runtime's device for its precision are known to be usable; only
    the small adapter file is read."""
    _, meta = load_adapter(adapter)
    try:
        recipe = Recipe.from_dict(meta["recipe"]).validate()
    except UeoError as exc:
        raise UeoError(f"Adapter {adapter} stores an invalid recipe: {exc}") from None
    checked_runtime(runtime, recipe.precision)
    check_model(meta["model"], pretrained or meta["pretrained"])
    return meta
