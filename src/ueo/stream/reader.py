"""The images of a stream, read and decoded by a thread one batch or two ahead of the model, so
that decoding overlaps the device's work (as a loader's worker does for `ueo predict`).

A batch is `size` readable images of consecutive entries (fewer at the end of the stream, or
where the domain column changes: a batch never spans two domains); the unreadable ones among
them are passed on as messages, to be counted. A standard input that pauses pauses the reading,
and what has arrived is answered once its batch is full, or the input ends. Each batch carries
the chained sha256 of the entries read up to its last one, which a checkpoint records and a
resume checks (ueo.stream.resume).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import UnidentifiedImageError

from ueo.cache import Split
from ueo.images import open_rgb
from ueo.stream.source import Entry

START = b"\0" * 32  # the digest of no image read
READ_AHEAD = 2  # batches the reading thread may hold ready


@dataclass
class ReadBatch:
    """What the reading thread hands over: the readable images of consecutive entries."""

    pixels: torch.Tensor | None  # uint8, N x 3 x H x W; None when none could be read
    paths: list[str]
    labels: np.ndarray
    domain: str | None
    entries: int  # entries of the source it covers, readable or not
    digest: bytes  # the chained digest after its last entry
    bad: list[str]  # "path: reason" of its unreadable images
    read_at: float  # when its last entry arrived (time.perf_counter)


def chain(digest: bytes, entry: Entry) -> bytes:
    """The digest of the entries read so far, one more entry read."""
    return hashlib.sha256(digest + entry.key()).digest()


class Reader:
    """A thread that reads the entries and decodes them into batches of `size` readable
    images (ending early where the domain changes), one batch or two ahead of the model."""

    def __init__(self, entries: Iterator[Entry], size: int, split: Split, digest: bytes):
        self.entries, self.size, self.split, self.digest = entries, size, split, digest
        self.ready: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._read, name="ueo-stream-reader", daemon=True)
        self.thread.start()

    def get(self, stop: dict) -> ReadBatch | BaseException | None:
        """The next batch, an error of the reading, None at the end or when `stop` says a
        signal came while waiting."""
        while True:
            try:
                item = self.ready.get(timeout=0.1)
            except queue.Empty:
                if stop["signal"] is not None:
                    return None
                continue
            return None if item is StopIteration else item

    def close(self) -> None:
        self.closed.set()

    def _put(self, item) -> None:
        while not self.closed.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _read(self) -> None:
        digest, batch = self.digest, _Filling()
        try:
            for entry in self.entries:
                if batch.entries and entry.domain != batch.domain:
                    self._put(batch.done(digest))
                    batch = _Filling()
                batch.domain = entry.domain
                batch.entries += 1
                digest = chain(digest, entry)
                read_at = time.perf_counter()
                try:
                    pixels = self.split.pixels(open_rgb(entry.path))
                except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
                    batch.bad.append(f"{entry.path}: {exc}")
                else:
                    batch.add(entry, pixels)
                batch.read_at = read_at
                if len(batch.paths) == self.size:
                    self._put(batch.done(digest))
                    batch = _Filling()
                if self.closed.is_set():
                    return
            if batch.entries:
                self._put(batch.done(digest))
            self._put(StopIteration)
        except BaseException as exc:  # handed to the main thread, which raises it
            self._put(exc)


class _Filling:
    """A batch the reader is filling."""

    def __init__(self):
        self.paths: list[str] = []
        self.labels: list[int] = []
        self.pixels: list[torch.Tensor] = []
        self.bad: list[str] = []
        self.domain: str | None = None
        self.entries = 0
        self.read_at = 0.0

    def add(self, entry: Entry, pixels: torch.Tensor) -> None:
        self.paths.append(entry.path)
        self.labels.append(entry.label)
        self.pixels.append(pixels)

    def done(self, digest: bytes) -> ReadBatch:
        pixels = torch.stack(self.pixels) if self.pixels else None
        labels = np.array(self.labels, dtype=np.int64)
        return ReadBatch(
            pixels, self.paths, labels, self.domain, self.entries, digest, self.bad, self.read_at
        )
