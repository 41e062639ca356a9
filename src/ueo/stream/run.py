"""A stream written into its run folder: `ueo stream`'s job (docs/stream.md).

The folder is live: `predictions.csv` gets each batch's rows (the columns of `ueo predict`
and the batch number) as soon as they are made, flushed, then the model updates on the batch.
Every `checkpoint_every` batches, and when SIGINT or SIGTERM stops the stream, a checkpoint
records the engine's state, how many images were read, and the CSV's length then; `--resume`
cuts the CSV back to that length and goes on from there, so the rows, the adapter and the
online metrics are those of an uninterrupted stream. The images a checkpoint covers are read
again on resume (without being decoded) and must be the same, checked by a chained sha256 of
their paths, labels and domains (ueo.stream.resume). At the end, `adapter.safetensors` (the
final state, an adapter as `ueo adapt` writes it) and `metrics.json` (throughput, latency, the
online metrics: what the stream's `History` recorded) are written atomically and the
checkpoint removed.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO, TextIO

from tqdm.auto import tqdm

from ueo import __version__
from ueo.adaptation import AdaptResult
from ueo.api import load_model
from ueo.checkpoint import Interrupted
from ueo.checks import check_data, check_int, check_output_dir, check_resume_overwrite
from ueo.clip import check_model
from ueo.errors import UeoError
from ueo.files import write_json
from ueo.fingerprint import weights_identity
from ueo.launch import launch_from_env
from ueo.layout import ADAPTER_FILE, CHECKPOINT_FILE, LOG_FILE, METRICS_FILE
from ueo.loader import BadImages
from ueo.logs import captured_log, logged_to
from ueo.model import UeoModel
from ueo.names import parse_classes
from ueo.predictions import PREDICTION_FIELDS, Predictions
from ueo.provenance import environment
from ueo.recipe import Runtime
from ueo.runs import build_adapter_metadata, save_adapter
from ueo.runtime import checked_runtime
from ueo.stream.history import History
from ueo.stream.online import OnlineStream
from ueo.stream.reader import ReadBatch, Reader
from ueo.stream.resume import restore, write_checkpoint
from ueo.stream.settings import DEFAULT_CHECKPOINT_EVERY, StreamSettings
from ueo.stream.source import Entry, stream_entries
from ueo.training import stop_on_signals

log = logging.getLogger("ueo")

PREDICTIONS_FILE = "predictions.csv"
CSV_FIELDS = (*PREDICTION_FIELDS, "batch")
STREAM_FILES = {PREDICTIONS_FILE, CHECKPOINT_FILE, ADAPTER_FILE, METRICS_FILE, LOG_FILE}
THRESHOLD_RULE = "otsu(MCM scores of the stream's rows as they were made)"


def stream_job(
    out: str | os.PathLike,
    *,
    model: str,
    pretrained: str,
    classes: str | list[str],
    data: str,
    settings: StreamSettings | None = None,
    runtime: Runtime | None = None,
    data_root: str | None = None,
    unlabeled: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    stdin: TextIO | BinaryIO | None = None,
) -> dict:
    """`ueo stream`: predict `data` as a stream into `out`, adapting as it goes.

    Args:
        out: the run folder: predictions.csv as the stream goes, then adapter.safetensors and
            metrics.json (module docstring).
        model, pretrained, classes: the zero-shot model to start from.
        data: an image list, `-` (standard input, or `stdin`, read as it arrives), a folder
            (sorted order) or one image.
        settings: method, batch size, resets, threshold, the update's recipe, TDA's settings.
        runtime: device, the bad-image policy, progress (its workers and evaluation batch are
            not used: the stream reads with one thread, in its own batches).
        resume: continue the interrupted stream of `out` from its checkpoint; `overwrite`:
            replace a finished or interrupted one.
        checkpoint_every: batches between checkpoints (0: only when a signal stops it).

    Returns:
        metrics.json's record.
    """
    settings = (settings or StreamSettings()).validate()
    runtime = checked_runtime(runtime, settings.step_recipe.precision)
    out = check_output_dir(out)
    check_resume_overwrite(resume, overwrite)
    check_int("checkpoint-every", checkpoint_every, 0)
    check_data(data)
    single_process()
    check_model(model, pretrained)
    resume = prepare_folder(out, resume, overwrite)
    with captured_log() as buffer:
        names = parse_classes(classes) if isinstance(classes, str) else list(classes)
        log.info(
            "ueo %s stream: %s/%s, %d classes, method %s, batch %d, reset %s",
            __version__,
            model,
            pretrained,
            len(names),
            settings.method,
            settings.batch_size,
            settings.reset,
        )
        header = buffer.getvalue()
    with logged_to(out / LOG_FILE, header):
        net = load_model(
            model,
            pretrained,
            names,
            settings.step_recipe,
            device=runtime.device,
            channels_last=runtime.channels_last,
        )
        return run_stream(
            net,
            data,
            out,
            settings,
            runtime,
            data_root=data_root,
            unlabeled=unlabeled,
            resume=resume,
            checkpoint_every=checkpoint_every,
            stdin=stdin,
        )


def single_process() -> None:
    """A stream is one sequence of updates: one process (torchrun's would each take a part)."""
    if launch_from_env().size > 1:
        raise UeoError("ueo stream runs in one process: start it without torchrun.")


def prepare_folder(out: Path, resume: bool, overwrite: bool) -> bool:
    """Apply the rules of a stream's folder; returns whether a checkpoint is resumed.

    A folder holding other files is refused; a finished stream is replaced only with
    `overwrite`; an interrupted one (rows written) is continued with `resume` (from its
    checkpoint, or from the start if it stopped before its first) or discarded with
    `overwrite`."""
    if not out.exists():
        out.mkdir(parents=True)
        return False
    found = {p.name for p in out.iterdir() if not _temporary(p.name)}
    if found - STREAM_FILES:
        raise UeoError(
            f"--out {out} holds other files than a stream's ({', '.join(sorted(found)[:3])}); "
            "give a new or empty folder."
        )
    finished = bool(found & {ADAPTER_FILE, METRICS_FILE})
    started = bool(found & {PREDICTIONS_FILE, CHECKPOINT_FILE})
    if overwrite:
        for name in found:
            (out / name).unlink()
        return False
    if finished:
        raise UeoError(f"{out} holds a finished stream: add --overwrite to replace it.")
    if started and not resume:
        raise UeoError(
            f"{out} holds an interrupted stream: add --resume to continue it, or --overwrite to "
            "start over."
        )
    if resume and (out / CHECKPOINT_FILE).is_file():
        return True
    (out / PREDICTIONS_FILE).unlink(missing_ok=True)  # rows from before any checkpoint
    return False


def _temporary(name: str) -> bool:
    """An atomic write's leftover (ueo.files.atomic_write), never part of a run."""
    return name.startswith(".") and name.endswith(".tmp")


# --- the stream ----------------------------------------------------------------------------


def run_stream(
    model: UeoModel,
    data: str,
    out: str | os.PathLike,
    settings: StreamSettings,
    runtime: Runtime,
    *,
    data_root: str | None = None,
    unlabeled: bool = False,
    resume: bool = False,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    stdin: TextIO | BinaryIO | None = None,
) -> dict:
    """The stream of `data` through `model` (changed in place) into the folder `out`, whose
    rules `prepare_folder` has applied; returns metrics.json's record."""
    out = Path(out)
    identity = stream_identity(model, settings)
    with OnlineStream(model, settings, runtime) as engine:
        entries = stream_entries(
            data, model.class_names, data_root, unlabeled=unlabeled, stdin=stdin
        )
        history = (
            restore(out / CHECKPOINT_FILE, out / PREDICTIONS_FILE, identity, engine, entries)
            if resume
            else History()
        )
        run = StreamRun(engine, out, identity, runtime, history)
        with stop_on_signals(True) as stop:
            run.go(entries, stop, checkpoint_every)
        return finish(engine, history, out, str(data))


def stream_identity(model: UeoModel, settings: StreamSettings) -> dict:
    """What a resumed stream must have been started with, as plain JSON
    (ueo.fingerprint.describe_changes names what differs by its option). The images are
    checked apart, by the digest of those read (their paths, labels and domains), so that the
    same list given another way (a relative path, standard input) resumes."""
    clip = model.clip
    recipe = asdict(settings.step_recipe)
    del recipe["method"]  # --method says it (TDA's recipe says zeroshot)
    identity = {
        "--method": settings.method,
        "--reset": settings.reset,
        "--threshold": settings.threshold,
        "recipe": recipe,
        "tda": asdict(settings.tda),
        "model": clip.model_name,
        "pretrained": clip.pretrained,
        "weights": weights_identity(clip.model_name, clip.pretrained),
        "class_names": list(model.class_names),
    }
    return json.loads(json.dumps(identity))  # tuples as lists, as a checkpoint reads them


class StreamRun:
    """A stream going into its run folder: each batch's rows appended to the CSV and flushed
    before the engine updates on it, its history kept, a checkpoint when one is due or a
    signal stops it."""

    def __init__(
        self, engine: OnlineStream, out: Path, identity: dict, runtime: Runtime, history: History
    ):
        self.engine, self.out, self.identity, self.runtime = engine, out, identity, runtime
        self.history = history
        self.bad = BadImages(runtime.on_bad_image)

    @property
    def csv_path(self) -> Path:
        return self.out / PREDICTIONS_FILE

    def go(self, entries: Iterator[Entry], stop: dict, checkpoint_every: int) -> None:
        """Every batch: its rows, flushed; the update; a checkpoint when due. A signal stops
        the stream after the current batch (or while it waits for images) with a checkpoint."""
        engine, history = self.engine, self.history
        start = time.perf_counter()
        reader = Reader(entries, engine.settings.batch_size, engine.split, history.digest)
        new = not self.csv_path.is_file() or history.csv_bytes == 0
        progress = self.runtime.progress
        try:
            with (
                open(self.csv_path, "a", newline="", encoding="utf-8") as f,
                tqdm(desc="stream", unit="img", leave=False, disable=not progress) as bar,
            ):
                writer = csv.writer(f)
                if new:
                    writer.writerow(CSV_FIELDS)
                    f.flush()
                    history.csv_bytes = f.tell()
                last = engine.batches
                while (batch := reader.get(stop)) is not None:
                    if isinstance(batch, BaseException):
                        raise batch
                    self._batch(batch, writer, f)
                    bar.update(len(batch.paths))
                    if not math.isnan(engine.threshold):
                        bar.set_postfix(threshold=f"{engine.threshold:.4g}")
                    if stop["signal"] is not None:
                        break
                    if checkpoint_every and engine.batches - last >= checkpoint_every:
                        self.checkpoint(f, start)
                        last = engine.batches
                if stop["signal"] is not None:
                    self.checkpoint(f, start)
                    raise self.interrupted(stop["signal"])
                os.fsync(f.fileno())
        finally:
            reader.close()
        history.elapsed += time.perf_counter() - start

    def _batch(self, batch: ReadBatch, writer, f) -> None:
        """One batch: count its unreadable images; predict, write and flush its rows; update."""
        history = self.history
        for message in batch.bad:
            self.bad.report(history.consumed, message)
        history.skipped += len(batch.bad)
        if batch.pixels is not None:
            engine = self.engine
            rows = engine.predict(batch.pixels, batch.paths, batch.labels, batch.domain)
            self._write(rows, writer, engine.batches)
            f.flush()
            flushed = time.perf_counter()
            history.latency.add(flushed - batch.read_at)
            engine.update()
            history.step_time.add(time.perf_counter() - flushed)
            flagged = int(rows.is_unknown.sum())
            history.add(rows.pred, rows.mcm, batch.labels, batch.domain, flagged)
        history.consumed += batch.entries
        history.digest = batch.digest
        history.csv_bytes = f.tell()

    @staticmethod
    def _write(rows: Predictions, writer, number: int) -> None:
        writer.writerows([*(row[k] for k in PREDICTION_FIELDS), number] for row in rows)

    def checkpoint(self, f, start: float) -> None:
        """The engine's state and the stream's history, after the CSV is on disk."""
        f.flush()
        os.fsync(f.fileno())
        write_checkpoint(
            self.out / CHECKPOINT_FILE, self.identity, self.engine, self.history, start
        )

    def interrupted(self, signum: int) -> Interrupted:
        """The exception that ends a stream a signal stopped, its checkpoint written."""
        name = signal.Signals(signum).name
        where = f"after {self.history.consumed} images (batch {self.engine.batches})"
        log.warning("%s: checkpoint written %s; resume with --resume", name, where)
        return Interrupted(f"interrupted by {name}; checkpoint {where}, resume with --resume")


# --- the end -------------------------------------------------------------------------------


def finish(engine: OnlineStream, history: History, out: Path, data: str) -> dict:
    """Write the adapter of the engine's final state and metrics.json into `out`, and remove
    the checkpoint; returns metrics.json's record."""
    if history.consumed == 0:
        raise UeoError("The stream held no image: nothing was predicted.")
    if history.rows == 0:
        raise UeoError(
            f"None of the {history.consumed} images of the stream could be read; nothing was "
            "predicted."
        )
    recipe = engine.recipe
    threshold = engine.threshold
    metadata = build_adapter_metadata(
        engine.model, AdaptResult(metrics={}, threshold=threshold, recipe=recipe)
    )
    if engine.settings.threshold is None:
        metadata["threshold_rule"] = THRESHOLD_RULE
    else:
        metadata["threshold_rule"] = "fixed (--threshold)"
    metadata["stream"] = {"method": engine.settings.method, "reset": engine.settings.reset}
    tuned = engine.model.adapter_state(recipe.norm_layers)
    save_adapter(out / ADAPTER_FILE, tuned, metadata)
    record = stream_record(engine, history, data)
    write_json(out / METRICS_FILE, record)
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    log.info(
        "%d images in %d batches, %.1f images/s -> %s",
        history.rows,
        engine.batches,
        record["images_per_s"],
        out,
    )
    return record


def stream_record(engine: OnlineStream, history: History, data: str) -> dict:
    """metrics.json: what the stream did, how fast, and how well (online, when labelled)."""
    settings = engine.settings
    clip = engine.model.clip
    rows, elapsed = history.rows, history.elapsed
    return {
        "ueo_version": __version__,
        "model": clip.model_name,
        "pretrained": clip.pretrained,
        "num_classes": engine.model.prompt.num_classes,
        "method": settings.method,
        "batch_size": settings.batch_size,
        "reset": settings.reset,
        "threshold_option": settings.threshold,
        "tda": asdict(settings.tda) if settings.method == "tda" else None,
        "recipe": asdict(engine.recipe),
        "data": data,
        "images": rows,
        "batches": engine.batches,
        "skipped_images": history.skipped,
        "skipped_steps": engine.skipped_steps,
        "unknown": history.flagged,
        "threshold": engine.threshold,
        "threshold_rule": THRESHOLD_RULE if settings.threshold is None else "fixed",
        "wall_time_s": round(elapsed, 3),
        "images_per_s": rows / elapsed if elapsed > 0 else None,
        "latency_s": {
            "median": history.latency.quantile(0.5),
            "p95": history.latency.quantile(0.95),
        },
        "update_s": {
            "median": history.step_time.quantile(0.5),
            "p95": history.step_time.quantile(0.95),
        },
        "timings_s": {k: round(v, 3) for k, v in engine.clock.seconds.items()},
        "sessions": history.sessions,
        "online": history.online(),
        "environment": environment(str(engine.device), engine.recipe.precision),
    }
