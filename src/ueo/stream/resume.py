"""A stream's checkpoint, written as it goes and read back by `--resume` (docs/stream.md,
"Checkpoints and resume").

A checkpoint holds the engine's state (`OnlineStream.state`), the stream's history but its
rows' numbers (`History.state`), the engine's timings and the identity the stream must be
resumed with. `restore` puts a stream back there: it cuts the CSV back to the length the
checkpoint recorded, then reads the entries the checkpoint covers again, without decoding
them: they must be the same (their chained digest), and each kept row of the CSV gives the
online metrics its numbers back, so that the rows, the adapter and the metrics end as an
uninterrupted stream's.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ueo.checkpoint import check_identity, load_checkpoint, save_checkpoint, under_prefix
from ueo.errors import UeoError
from ueo.stream.history import History
from ueo.stream.online import OnlineStream
from ueo.stream.reader import START, chain
from ueo.stream.source import Entry

log = logging.getLogger("ueo")


def write_checkpoint(
    path: Path, identity: dict, engine: OnlineStream, history: History, start: float
) -> None:
    """Write the checkpoint of a stream whose CSV is on disk, its session having begun at
    `start` (`time.perf_counter`): what `restore` puts back."""
    tensors, engine_state = engine.state()
    arrays, meta = history.state(start)
    tensors.update({f"timing/{k}": torch.from_numpy(v) for k, v in arrays.items()})
    meta = {"identity": identity, "engine": engine_state, **meta, "timings_s": engine.clock.seconds}
    save_checkpoint(path, tensors, meta)


def restore(
    path: Path, csv_path: Path, identity: dict, engine: OnlineStream, entries: Iterator[Entry]
) -> History:
    """The history of the interrupted stream whose checkpoint is `path` and whose rows are in
    `csv_path`, with the engine put back there too and the CSV cut back to the rows it
    covers; the entries it covers are read from `entries` again."""
    tensors, meta = load_checkpoint(path)
    check_identity(path, meta.get("identity", {}), identity)
    engine.load(tensors, meta["engine"])
    engine.clock.seconds = dict(meta["timings_s"])
    history = History()
    history.load({k: v.numpy() for k, v in under_prefix(tensors, "timing").items()}, meta)
    size = csv_path.stat().st_size if csv_path.is_file() else 0
    if size < history.csv_bytes:
        raise UeoError(
            f"{csv_path} is shorter than its checkpoint says ({size} < "
            f"{history.csv_bytes} bytes): start over with --overwrite."
        )
    os.truncate(csv_path, history.csv_bytes)
    digest, matched = _replay(history, csv_path, entries, engine.model.class_names)
    if digest.hex() != meta["digest"]:
        raise UeoError(
            f"The first {history.consumed} images of --data are not those the interrupted "
            "stream read: resume with the same --data (on standard input, the same list)."
        )
    if not matched or history.rows != meta["rows"]:
        raise UeoError(
            f"{csv_path} does not hold the rows its checkpoint covers: start over with --overwrite."
        )
    history.digest = digest
    log.info(
        "resuming from %s after %d images (%d rows, batch %d)",
        path,
        history.consumed,
        meta["rows"],
        engine.batches,
    )
    return history


def _replay(
    history: History, csv_path: Path, entries: Iterator[Entry], class_names: Sequence[str]
) -> tuple[bytes, bool]:
    """Read the entries the checkpoint covers again (not decoding them), matching each row
    of the cut CSV to its entry for the online metrics; their digest, and whether every row
    found its entry."""
    index = {name: i for i, name in enumerate(class_names)}
    digest = START
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)  # the header
        row = next(reader, None)
        for k in range(history.consumed):
            entry = next(entries, None)
            if entry is None:
                raise UeoError(
                    f"--data ends after {k} images, before the {history.consumed} the "
                    "checkpoint covers: resume with the same --data."
                )
            digest = chain(digest, entry)
            if row is not None and row[0] == entry.path:
                pred, mcm = [index[row[1]]], [float(row[3])]
                history.add(pred, mcm, [entry.label], entry.domain, row[4] == "True")
                row = next(reader, None)
    return digest, row is None
