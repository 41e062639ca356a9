"""Run an exported model (`ueo export`) with numpy, Pillow and onnxruntime: no torch, no open_clip.

    python -m ueo.deploy EXPORT_DIR IMAGES --out predictions.csv

reads images as `ueo predict` does (a folder, an image list, `-`, one image; `ueo.data` and
`ueo.images`, both torch-free), gives each the pixels of the model's test transform with Pillow
(`pixels`: torchvision's `Resize(size, bicubic)` on a PIL image is PIL's own bicubic resize of
the shorter side to `size`, then `CenterCrop(size)`), runs `model.onnx` in batches and writes
`ueo predict`'s CSV (`ueo.predictions`). The graph takes the uint8 pixels and does the rest:
ToTensor's scaling, the normalisation, the image tower, the cosines with the adapted prompts'
text features, and the answers (`OUTPUTS`).

This module also holds what the export and the runner share: the names of an export folder's
files, the model's metadata keys, and the rule an `--out` of `ueo export` must follow.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ueo.checks import check_data, check_output_dir, check_output_file, check_threshold
from ueo.cpus import available_cpus
from ueo.data import ImageSet, load_image_set
from ueo.errors import UeoError
from ueo.images import open_rgb
from ueo.predictions import Predictions

log = logging.getLogger("ueo.deploy")

# The files of an export folder.
MODEL_FILE = "model.onnx"
EXPORT_FILE = "export.json"
CLASSES_FILE = "classes.txt"
README_FILE = "README.md"
OPEN_CLIP_DIR = "open_clip"
WEIGHTS_FILE = "open_clip_model.safetensors"  # the name open_clip's `local-dir:` looks for
LOCAL_DIR_CONFIG = "open_clip_config.json"  # open_clip's `local-dir:` config (model + preprocess)
HEAD_FILE = "head.safetensors"
HEAD_TENSOR = "text_features"
FORMAT = "ueo-export"
FORMAT_VERSION = 1

# The graph's input and outputs.
INPUT = "pixels"
OUTPUTS = ("probs", "mcm", "pred", "is_unknown")
RESIZE_RULE = (
    "shorter side to input_size with PIL's bicubic resize (the longer side "
    "int(input_size * long / short)), then a centre crop of input_size x input_size (offsets "
    "rounded half to even), RGB, uint8, channels first"
)
PRECISIONS = ("fp32", "fp16")
DEVICES = ("cpu", "cuda")
# onnxruntime's providers per --device: the first must be there; the CPU takes what CUDA lacks.
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
BAD_IMAGE_POLICIES = ("skip", "error")
DEFAULT_BATCH = 64
HASH_BLOCK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def check_export_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """`ueo export --out`: a new folder; an existing one only with `overwrite`, and only when it
    holds an earlier export (its export.json) or nothing, so that `--overwrite` never deletes
    a folder of other files."""
    out = check_output_dir(out)
    if not out.exists():
        return out
    if not overwrite:
        raise UeoError(f"--out {out} exists; give --overwrite to replace it, or a new folder.")
    if not (out / EXPORT_FILE).is_file() and any(out.iterdir()):
        raise UeoError(
            f"--out {out} holds other files, not an export (no {EXPORT_FILE}); --overwrite "
            "replaces only an earlier export: give a new folder."
        )
    return out


def needs_onnx(*modules: str) -> None:
    """A one-line error naming the `deploy` extra when onnx or onnxruntime is missing (asked
    without importing them)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise UeoError(
            f"{' and '.join(missing)} {verb} not installed: pip install 'ueo[deploy]' "
            f"(or pip install {' '.join(missing)})."
        )


# --- the model's pixels, with Pillow -----------------------------------------------------------


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's `Resize(size)`: the shorter side becomes `size`, the
    longer `int(size * long / short)` (truncated, as torchvision computes it)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def pixels(img: Image.Image, size: int) -> np.ndarray:
    """The model's input for one RGB image: 3 x size x size uint8, what ueo's test transform
    gives before ToTensor (`Resize(size, BICUBIC)`, `CenterCrop(size)`, `pil_to_tensor`).

    torchvision resizes a PIL image with PIL's `resize` (antialiased, always) and skips it when
    the size is already right; its centre crop offsets are `int(round((side - size) / 2))`.
    """
    width, height = img.size
    new = resized_size(width, height, size)
    if new != (width, height):
        img = img.resize(new, Image.Resampling.BICUBIC)
    top = int(round((new[1] - size) / 2.0))
    left = int(round((new[0] - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


# --- the exported model ------------------------------------------------------------------------


@dataclass
class ExportedModel:
    """An onnxruntime session of `model.onnx` and what its metadata says."""

    session: object
    path: Path
    class_names: list[str]
    threshold: float
    input_size: int
    metadata: dict

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs (`OUTPUTS`) for an N x 3 x S x S uint8 batch."""
        values = self.session.run(list(OUTPUTS), {INPUT: batch})
        return dict(zip(OUTPUTS, values, strict=True))


def read_metadata(raw: dict[str, str], where: str) -> dict:
    """The model's metadata_props (each value JSON text), checked for what the runner needs."""
    try:
        meta = {key: json.loads(value) for key, value in raw.items()}
    except ValueError as exc:
        raise UeoError(f"{where}: its metadata is not valid JSON ({exc}).") from None
    if meta.get("format") != FORMAT:
        raise UeoError(f"{where} was not written by `ueo export` (no {FORMAT} metadata).")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UeoError(
            f"{where} is export format {meta.get('format_version')}; this ueo reads "
            f"{FORMAT_VERSION}: export it again with this ueo."
        )
    return meta


def exported_model_file(path: str | os.PathLike) -> tuple[Path, str | None]:
    """`model.onnx` of an export folder, its checksum checked against export.json, and its
    precision; or an .onnx file given itself (it carries its own metadata: precision None)."""
    path = Path(path)
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise UeoError(f"Export {path} does not exist.")
    record_file, model_file = path / EXPORT_FILE, path / MODEL_FILE
    if not record_file.is_file() or not model_file.is_file():
        raise UeoError(f"{path} is not an export folder (no {EXPORT_FILE} or {MODEL_FILE}).")
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        expected, precision = record["files"][MODEL_FILE], record["precision"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UeoError(f"{record_file} is damaged ({type(exc).__name__}: {exc}).") from None
    if file_sha256(model_file) != expected:
        raise UeoError(
            f"{model_file} does not match its checksum in {EXPORT_FILE} (the file was changed "
            "or damaged after it was exported)."
        )
    return model_file, precision


def session_options(precision: str | None, device: str, threads: int | None = None):
    """onnxruntime's options for a graph of `precision` on `device`.

    Every graph optimisation, but for an fp16 graph on the CPU: onnxruntime 1.32's layout
    optimisations (level ALL) crash on the fp16 ViT tower there, so it gets level EXTENDED.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cpus()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its notes on graph fusions are not ours
    # Threads that sleep while they wait, as ueo asks of OpenMP (OMP_WAIT_POLICY=PASSIVE):
    # spinning ones take the CPU from the threads reading the next batch.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if precision != "fp32" and device == "cpu":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return options


def _session(model_file: Path, options, providers: list[str]):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(model_file), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types for a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UeoError(f"onnxruntime cannot load {model_file}: {first}") from None


def load_exported(
    path: str | os.PathLike, *, threads: int | None = None, device: str = "cpu"
) -> ExportedModel:
    """An export folder's (or .onnx file's) model in onnxruntime.

    `threads`: onnxruntime's intra-op threads (default: the CPUs this process may use, as
    `ueo predict` caps torch's); `device` `cuda` needs onnxruntime-gpu.
    """
    if device not in DEVICES:
        raise UeoError(f"--device must be one of {', '.join(DEVICES)}, not {device!r}.")
    needs_onnx("onnxruntime")
    import onnxruntime as ort

    model_file, precision = exported_model_file(path)
    providers = PROVIDERS[device]
    if providers[0] not in ort.get_available_providers():
        raise UeoError(
            f"--device {device} needs onnxruntime's {providers[0]}, which this onnxruntime "
            "lacks (install onnxruntime-gpu for cuda)."
        )
    if precision is None:  # a bare .onnx file: its metadata first, from an unoptimised session
        bare = session_options(None, "none", 1)
        bare.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        peek = _session(model_file, bare, PROVIDERS["cpu"]).get_modelmeta()
        precision = read_metadata(peek.custom_metadata_map, str(model_file)).get("precision")
    session = _session(model_file, session_options(precision, device, threads), providers)
    meta = read_metadata(session.get_modelmeta().custom_metadata_map, str(model_file))
    return ExportedModel(
        session,
        model_file,
        list(meta["class_names"]),
        float(meta["threshold"]),
        int(meta["input_size"]),
        meta,
    )


# --- predicting image files --------------------------------------------------------------------


class _Unreadable:
    """Unreadable images: counted and warned about once each, or fatal (`--on-bad-image`)."""

    def __init__(self, policy: str):
        if policy not in BAD_IMAGE_POLICIES:
            raise UeoError(f"--on-bad-image must be 'skip' or 'error', not {policy!r}.")
        self.policy = policy
        self.count = 0

    def report(self, message: str) -> None:
        if self.policy == "error":
            raise UeoError(f"Unreadable image: {message}")
        self.count += 1
        log.warning("Skipping unreadable image %s", message)


def _read(path: str, size: int) -> np.ndarray | str:
    """One image's pixels, or the message of why it cannot be read (ueo's loader's catch)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pixels(open_rgb(path), size)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        return f"{path}: {exc}"


def _batches(
    paths: list[str], size: int, batch_size: int, workers: int
) -> Iterator[tuple[int, list]]:
    """(start, pixels or message per image) for each batch, in order; the next batch is read
    by `workers` threads while the caller runs the current one (PIL decodes and resizes
    without the GIL)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        ahead = None
        for start in range(0, len(paths), batch_size):
            part = [pool.submit(_read, p, size) for p in paths[start : start + batch_size]]
            if ahead is not None:
                yield ahead[0], [f.result() for f in ahead[1]]
            ahead = (start, part)
        if ahead is not None:
            yield ahead[0], [f.result() for f in ahead[1]]


def predict_files(
    model: ExportedModel,
    images: ImageSet,
    *,
    threshold: float | None = None,
    batch_size: int = DEFAULT_BATCH,
    workers: int | None = None,
    on_bad_image: str = "skip",
    progress: bool = False,
) -> Predictions:
    """`ueo predict`'s rows for an image set, from the exported model.

    Args:
        model: from `load_exported`.
        images: an image set (`ueo.data.load_image_set`), read in its order.
        threshold: the MCM score below which an image is unknown (default: the model's, which
            the graph's `is_unknown` uses); compared in float64, as `ueo predict` does.
        batch_size: images per run of the graph.
        workers: threads that read and resize images (default: the CPUs this process may use).
        on_bad_image: `skip` (warn, count, leave out) or `error`.
        progress: a bar in images.

    Returns:
        The rows, as columns (`ueo.predictions.Predictions`); `len(images) - len(rows)`
        images were unreadable.
    """
    check_threshold(threshold)
    if batch_size < 1:
        raise UeoError(f"--batch-size must be at least 1, not {batch_size}.")
    bad = _Unreadable(on_bad_image)
    n, size = len(images), model.input_size
    pred = np.zeros(n, dtype=np.int64)
    prob = np.zeros(n, dtype=np.float32)
    mcm = np.zeros(n, dtype=np.float32)
    valid = np.zeros(n, dtype=bool)
    with tqdm(total=n, desc="predict", unit="img", leave=False, disable=not progress) as bar:
        for start, read in _batches(images.paths, size, batch_size, workers or available_cpus()):
            good = [j for j, r in enumerate(read) if not isinstance(r, str)]
            for r in read:
                if isinstance(r, str):
                    bad.report(r)
            if good:
                out = model(np.stack([read[j] for j in good]))
                rows = start + np.asarray(good)
                pred[rows] = out["pred"]
                prob[rows] = out["probs"][np.arange(len(good)), out["pred"]]
                mcm[rows] = out["mcm"]
                valid[rows] = True
            bar.update(len(read))
    if not valid.any():
        raise UeoError(
            f"None of the {n} images of {images.source or 'the data'} could be read, "
            f"e.g. {images.paths[0]}."
        )
    rows = np.flatnonzero(valid)
    return Predictions(
        images.paths,
        rows,
        model.class_names,
        pred[rows],
        prob[rows],
        mcm[rows],
        model.threshold if threshold is None else float(threshold),
    )


# --- the command -------------------------------------------------------------------------------

PROG = "python -m ueo.deploy"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Label images with a model exported by `ueo export`: numpy, Pillow and "
        "onnxruntime only (no torch, no open_clip). Writes `ueo predict`'s CSV.",
    )
    p.add_argument("export", help="the folder `ueo export` wrote (or its model.onnx)")
    p.add_argument(
        "data",
        metavar="IMAGES",
        help="image folder (root/<class>/<img>), image list, - (the list on standard input), "
        "a folder of loose images or one image file",
    )
    p.add_argument("--out", required=True, help="CSV file to write: path, pred, prob, mcm, ...")
    p.add_argument("--data-root", default=None, help="root for relative paths of an image list")
    p.add_argument(
        "--unlabeled", action="store_true", help="every image under the folder, at any depth"
    )
    p.add_argument(
        "--threshold", type=float, default=None, help="MCM threshold (default: the model's)"
    )
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"default {DEFAULT_BATCH}")
    p.add_argument(
        "--threads", type=int, default=None, help="onnxruntime threads (default: the CPUs)"
    )
    p.add_argument("--workers", type=int, default=None, help="image-reading threads")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (onnxruntime-gpu)")
    p.add_argument("--on-bad-image", default="skip", help="skip (default) or error")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check(args: argparse.Namespace) -> None:
    """Every option, before onnxruntime is loaded or an image listed; one line each."""
    if args.device not in DEVICES:
        raise UeoError(f"--device must be one of {', '.join(DEVICES)}, not {args.device!r}.")
    if args.on_bad_image not in BAD_IMAGE_POLICIES:
        raise UeoError(f"--on-bad-image must be 'skip' or 'error', not {args.on_bad_image!r}.")
    for name in ("batch_size", "threads", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UeoError(f"--{name.replace('_', '-')} must be at least 1, not {value}.")
    check_threshold(args.threshold)
    check_output_file(args.out)
    check_data(args.data)
    if not Path(args.export).exists():
        raise UeoError(f"Export {args.export} does not exist.")


def main(argv: list[str] | None = None) -> int:
    """`python -m ueo.deploy`: mistakes one line on stderr and exit code 2, as `ueo`'s."""
    from ueo.logs import setup_logging

    args = build_parser().parse_args(argv)
    try:
        check(args)
        setup_logging(args.quiet)
        model = load_exported(args.export, threads=args.threads, device=args.device)
        images = load_image_set(
            args.data,
            model.class_names,
            args.data_root,
            unlabeled=args.unlabeled,
            progress=not args.quiet,
        )
        rows = predict_files(
            model,
            images,
            threshold=args.threshold,
            batch_size=args.batch_size,
            workers=args.workers,
            on_bad_image=args.on_bad_image,
            progress=not args.quiet,
        )
        rows.write_csv(args.out)
    except UeoError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{len(rows)} images, {int(rows.is_unknown.sum())} flagged unknown "
        f"(threshold {rows.threshold:.6g}) -> {args.out}"
    )
    skipped = len(images) - len(rows)
    if skipped:
        print(f"{skipped} unreadable image(s) skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
