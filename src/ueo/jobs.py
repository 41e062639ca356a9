"""What each `ueo` command does, as one Python call: the command line only parses and prints.

Each job reads its inputs, runs the API of ueo.api and writes its files; the return value is
plain data the caller may print.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from ueo import __version__
from ueo.api import AdaptResult, adapt, discover, evaluate, load_adapted, load_model, predict
from ueo.checks import (
    check_eval_source,
    check_output_dir,
    check_output_file,
    check_resume_overwrite,
    check_threshold,
)
from ueo.clip import check_model
from ueo.data import ImageSet, load_image_set
from ueo.discovery.files import JSON_FILE, write_discovery
from ueo.discovery.groups import Discovery
from ueo.discovery.settings import DiscoverSettings
from ueo.discovery.vocabulary import load_vocabulary, without_known
from ueo.distributed import World, on_main, start_world
from ueo.errors import UeoError
from ueo.files import write_json
from ueo.fingerprint import images_digest, weights_identity
from ueo.layout import ADAPTER_FILE, CHECKPOINT_FILE, METRICS_FILE
from ueo.logs import captured_log
from ueo.model import UeoModel
from ueo.names import OOD, normalize_name, parse_classes
from ueo.provenance import environment
from ueo.recipe import Recipe, Runtime
from ueo.runs import adapt_into, is_finished, load_adapter, publish, staging_dir
from ueo.runtime import checked_runtime
from ueo.timing import Clock

log = logging.getLogger("ueo")


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
    resume: bool = False,
    overwrite: bool = False,
    unlabeled: bool = False,
) -> dict:
    """`ueo adapt`: adapt on `data`, write adapter.safetensors, metrics.json and log.txt.

    The run is written into a staging folder next to `out` (with its checkpoint and log) and
    swapped in when complete. `resume` continues an interrupted run from its checkpoint;
    `overwrite` replaces a finished run or discards an interrupted one; without either, both
    are refused (docs/reliability.md). `unlabeled` reads `data` without labels
    (`ueo.data.load_image_set`); `test_data` must carry labels.
    """
    recipe = (recipe or Recipe()).validate()
    runtime = checked_runtime(runtime, recipe.precision)
    world, runtime = _in_world(runtime)
    out = check_output_dir(out)
    check_model(model, pretrained)
    on_main(world, lambda: _prepare_run_dir(out, resume, overwrite), "preparing the run folder")
    clock = Clock()
    with captured_log() as buffer:
        names = parse_classes(classes) if isinstance(classes, str) else list(classes)
        with clock("listing"):
            images = load_image_set(
                data, names, data_root, unlabeled=unlabeled, progress=runtime.progress
            )
            require_known_classes(images, names, data, unlabeled_hint=True)
            test = None
            if test_data:
                test = load_image_set(test_data, names, data_root, progress=runtime.progress)
                require_labels(test, "--test-data", "the test set is evaluated against them")
                require_known_classes(test, names, test_data)
        log.info(
            "ueo %s adapt: %s/%s, %d classes, %d unlabeled images, method %s",
            __version__,
            model,
            pretrained,
            len(names),
            len(images),
            recipe.method,
        )
        with clock("model"):
            net = load_model(
                model,
                pretrained,
                names,
                recipe,
                device=runtime.device,
                channels_last=runtime.channels_last,
            )
        extra = {"data": str(data), "test_data": test_data and str(test_data)}
        if unlabeled:
            extra["unlabeled"] = True
        if world.size > 1:
            extra["processes"] = world.size

        def run(staging: Path) -> AdaptResult:
            result = adapt(
                net, images, recipe, runtime, test=test, checkpoint_dir=staging, resume=resume
            )
            result.timings = {**clock.phases(other=False), **result.timings}
            return result

        return adapt_into(out, net, run, extra, log_header=buffer.getvalue(), writes=world.main)


def _prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> Path:
    """The staging folder of `out`, after the rules of one run per run folder."""
    check_resume_overwrite(resume, overwrite)
    if out.exists() and not out.is_dir():
        raise UeoError(f"--out {out} is a file; give a folder for the run.")
    if out.is_dir() and not is_finished(out) and any(out.iterdir()):
        raise UeoError(f"--out {out} holds other files and no ueo run; give a new or empty folder.")
    staging = staging_dir(out)
    checkpoint = (staging / CHECKPOINT_FILE).is_file()
    if is_finished(out) and not overwrite and not (resume and checkpoint):
        raise UeoError(
            f"{out} holds a finished run: add --overwrite to replace it, or give another --out."
        )
    if staging.exists() and (overwrite or not checkpoint):
        shutil.rmtree(staging)
    elif checkpoint and not resume:
        raise UeoError(
            f"An interrupted run of {out} is in {staging}: add --resume to continue it, or "
            "--overwrite to start over."
        )
    return staging


def require_known_classes(
    images: ImageSet, names: list[str], data: str, unlabeled_hint: bool = False
) -> None:
    """Labelled data none of whose classes is on the list is a mistake (a wrong --classes,
    most likely): say so, with the folder names closest to the list, and, where unlabeled
    images will do (`unlabeled_hint`), that --unlabeled reads the folders as they are."""
    if not images.labelled or (images.labels != OOD).any():
        return
    folders = sorted({_class_folder(p, images.source) for p in images.paths})
    close = sorted(
        {m for n in names for m in difflib.get_close_matches(normalize_name(n), folders, 3, 0.5)}
    )
    hint = f"; closest folder names: {', '.join(close)}" if close else ""
    if unlabeled_hint:
        hint += (
            f". If its folders are not classes (dates, cameras...), add --unlabeled: every "
            f"image under {data} is then read without a label"
        )
    raise UeoError(
        f"None of the classes of {data} ({', '.join(folders[:5])}"
        f"{', ...' if len(folders) > 5 else ''}) is on the class list "
        f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}){hint}."
    )


def require_labels(images: ImageSet, what: str, why: str) -> None:
    """Data that must carry labels (an evaluation's) and carries none: one line saying why."""
    if not images.labelled:
        raise UeoError(
            f"{what} {images.source} carries no labels, and {why}: give a class-folder tree "
            "(root/<class>/<image>) or a list of 'path label' lines."
        )


def _holds_training_run(folder: Path) -> bool:
    """An adapter, or a metrics.json that `ueo adapt` wrote (it has a recipe)."""
    metrics = folder / METRICS_FILE
    if (folder / ADAPTER_FILE).is_file():
        return True
    try:
        return metrics.is_file() and "recipe" in json.loads(metrics.read_text())
    except ValueError:
        return True  # not ours to overwrite either


def _class_folder(path: str, root: str) -> str:
    try:
        return Path(path).relative_to(root).parts[0]
    except (ValueError, IndexError):
        return Path(path).parent.name


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
    """`ueo eval`: metrics of an adapter (or, without one, of the zero-shot `model`) on
    labelled `data`."""
    runtime = checked_runtime(runtime)
    world, runtime = _in_world(runtime)
    if out is not None:
        check_output_dir(out)
        if _holds_training_run(Path(out)):
            raise UeoError(
                f"--out {out} holds a training run; write evaluation results to another folder."
            )
    clock = Clock()
    check_eval_source(bool(adapter), not adapter, bool(model), bool(classes))
    if adapter:
        meta = read_usable_adapter(adapter, runtime, pretrained)
        with clock("listing"):
            images = load_image_set(data, meta["class_names"], data_root, progress=runtime.progress)
        require_labels(images, "--data", "ueo eval measures the predictions against them")
        with clock("model"):
            net, meta = load_adapted(adapter, runtime.device, pretrained, runtime.channels_last)
        precision = meta["recipe"]["precision"]
        # The base weights used: the adapter's, or the `pretrained` that overrides them.
        source = {
            "adapter": str(adapter),
            "model": meta["model"],
            "pretrained": net.clip.pretrained,
        }
    else:
        pretrained = pretrained or "openai"
        check_model(model, pretrained)
        names = parse_classes(classes) if isinstance(classes, str) else list(classes)
        with clock("listing"):
            images = load_image_set(data, names, data_root, progress=runtime.progress)
        require_labels(images, "--data", "ueo eval measures the predictions against them")
        with clock("model"):
            net = load_model(
                model, pretrained, names, device=runtime.device, channels_last=runtime.channels_last
            )
        precision = "fp32"
        source = {"model": model, "pretrained": pretrained, "zeroshot": True}
    require_known_classes(images, net.class_names, data)
    with clock("evaluation"):
        metrics = evaluate(net, images, runtime, precision=precision)
    record = {**source, "data": str(data), "metrics": metrics, "timings_s": clock.phases()}
    record["environment"] = environment(runtime.device, precision)
    if out and world.main:
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
    unlabeled: bool = False,
) -> dict:
    """`ueo predict`: one CSV row per readable image; returns counts and the threshold used.
    `unlabeled` reads `images` without labels (`ueo.data.load_image_set`)."""
    runtime = checked_runtime(runtime)
    world, runtime = _in_world(runtime)
    check_threshold(threshold)
    out = check_output_file(out)
    meta = read_usable_adapter(adapter, runtime, pretrained)
    threshold = threshold if threshold is not None else meta.get("threshold")
    if threshold is None:
        raise UeoError("The adapter stores no threshold; pass --threshold.")
    clock = Clock()
    image_set, net, meta = _images_and_adapted(
        images, adapter, meta, runtime, pretrained, data_root, unlabeled, clock
    )
    with clock("predict"):
        rows = predict(net, image_set, threshold, runtime, precision=meta["recipe"]["precision"])
    if world.main:
        with clock("write"):
            rows.write_csv(out)
    return {
        "images": len(rows),
        "unknown": int(rows.is_unknown.sum()),
        "skipped": len(image_set) - len(rows),
        "threshold": threshold,
        "out": str(out),
        "timings_s": clock.phases(),
    }


def read_usable_adapter(
    adapter: str | os.PathLike, runtime: Runtime, pretrained: str | None
) -> dict:
    """An adapter's metadata once its recipe, model and base weights (or the `pretrained` that
    overrides them) and the runtime's device for its precision are known to be usable; only
    the small adapter file is read."""
    _, meta = load_adapter(adapter)  # its recipe is checked there
    checked_runtime(runtime, meta["recipe"]["precision"])
    check_model(meta["model"], pretrained or meta["pretrained"])
    return meta


def discover_job(
    adapter: str | os.PathLike,
    data: str,
    out: str | os.PathLike,
    *,
    vocabulary: str | os.PathLike | None = None,
    pretrained: str | None = None,
    threshold: float | None = None,
    settings: DiscoverSettings | None = None,
    runtime: Runtime | None = None,
    data_root: str | None = None,
    unlabeled: bool = False,
) -> tuple[Discovery, dict]:
    """`ueo discover`: group and name the images of `data` that the adapter rejects.

    Writes clusters.csv, clusters.md, sheets/ and discover.json into `out` (a new or empty
    folder, or one holding an earlier discovery, which is replaced whole once the new one is
    complete). `vocabulary` is a file of names; None is WordNet's nouns. Returns the discovery
    and the record discover.json holds besides it. `unlabeled` reads `data` without labels.
    """
    runtime = checked_runtime(runtime)
    settings = (settings or DiscoverSettings()).validate()
    check_threshold(threshold)
    out = _discovery_dir(out)
    meta = read_usable_adapter(adapter, runtime, pretrained)
    vocab = load_vocabulary(vocabulary)
    candidates = without_known(vocab, meta["class_names"])
    clock = Clock()
    images, net, meta = _images_and_adapted(
        data, adapter, meta, runtime, pretrained, data_root, unlabeled, clock
    )
    used = meta["threshold"] if threshold is None else threshold
    with clock("discover"):
        found = discover(
            net, images, used, candidates, runtime, settings, precision=meta["recipe"]["precision"]
        )
    with clock("digest"):
        digest = images_digest(images)
    record = {
        "ueo_version": __version__,
        "adapter": str(adapter),
        "adapter_tensors_sha256": meta["tensors_sha256"],
        "model": meta["model"],
        "pretrained": net.clip.pretrained,
        "weights": weights_identity(net.clip.model_name, net.clip.pretrained),
        "data": str(data),
        "data_root": data_root and str(data_root),
        "images_sha256": digest,
        "threshold": used,
        "threshold_source": "adapter" if threshold is None else "--threshold",
        "vocabulary": {
            "source": vocab.source,
            "names": len(vocab),
            "known_left_out": len(vocab) - len(candidates),
            "size": len(found.vocabulary),
            "sha256": candidates.digest,
        },
        "settings": asdict(settings),
        "precision": meta["recipe"]["precision"],
        "timings_s": clock.phases(),  # the job's phases; `timings` splits `discover`
        "environment": environment(runtime.device, meta["recipe"]["precision"]),
    }
    staging = staging_dir(out)
    if staging.exists():
        shutil.rmtree(staging)
    write_discovery(staging, found, record)
    publish(staging, out)
    return found, record


def _images_and_adapted(
    data: str,
    adapter: str | os.PathLike,
    meta: dict,
    runtime: Runtime,
    pretrained: str | None,
    data_root: str | None,
    unlabeled: bool,
    clock: Clock,
) -> tuple[ImageSet, UeoModel, dict]:
    """The image set of `data` (under the adapter's class names) and the adapted model, each
    timed (`listing`, `model`): what predict and discover start with."""
    with clock("listing"):
        names = meta["class_names"]
        images = load_image_set(
            data, names, data_root, unlabeled=unlabeled, progress=runtime.progress
        )
    with clock("model"):
        net, meta = load_adapted(adapter, runtime.device, pretrained, runtime.channels_last)
    return images, net, meta


def _in_world(runtime: Runtime) -> tuple[World, Runtime]:
    """This process's world (torchrun's, or itself alone) and the runtime on its device."""
    world, device = start_world(runtime.device)
    return world, runtime.replace(device=device)


def _discovery_dir(out: str | os.PathLike) -> Path:
    """`out` checked: writable, and new, empty or holding an earlier discovery."""
    out = check_output_dir(out)
    if out.is_dir() and any(out.iterdir()):
        if _holds_training_run(out):
            raise UeoError(f"--out {out} holds a training run; write the discovery elsewhere.")
        if not (out / JSON_FILE).is_file():
            raise UeoError(
                f"--out {out} holds other files and no ueo discovery; give a new or empty folder."
            )
    return out
