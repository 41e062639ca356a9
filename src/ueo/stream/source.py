"""The images of a stream in order, read as they come: an image list (a file, or standard
input line by line as it arrives), a folder in sorted order, or one image. Torch-free.

A stream's list is an image list as everywhere in ueo (`path` or `path label` per line, the
first entry deciding which) with an optional third column, the domain: `path label domain`,
or `path - domain` without a label. A line is read with a domain when its last word is not
a number nor an image file's name and the word before it is a label or `-`; the first entry
decides for the whole list, as for labels. Nothing but the current line is held: a stream of
a million lines costs what one line does.
"""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

from ueo.checks import STDIN
from ueo.data import IMAGE_EXTENSIONS, is_image, load_image_set
from ueo.errors import UeoError
from ueo.names import OOD, UNLABELED, read_lines

NO_LABEL = "-"  # the label column of a line that has a domain but no label
CHUNK = 65536  # bytes read from standard input at a time (a read returns what has arrived)
LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Entry:
    """One image of the stream: its path, its label (a known class's index, `OOD`, or
    `UNLABELED`) and its domain (None when the list has no domain column)."""

    path: str
    label: int
    domain: str | None = None

    def key(self) -> bytes:
        """What a resumed stream must find again at this place (ueo.stream.resume)."""
        return f"{os.path.abspath(self.path)}\t{self.label}\t{self.domain}\n".encode()


class ListParser:
    """Lines of an image list to entries, one at a time; the first entry sets the list's kind
    (with or without labels, with or without domains) and every later one must match it."""

    def __init__(self, where: str, n_known: int, root: Path, unlabeled: bool = False):
        self.where, self.n_known, self.root, self.unlabeled = where, n_known, root, unlabeled
        self.kind: tuple[bool, bool] | None = None  # (labelled, with domains)
        self.first = 0  # line number of the first entry

    def parse(self, number: int, line: str) -> Entry | None:
        """The entry of line `number` (None for a blank line or a # comment)."""
        text = line.strip()
        if not text or text.startswith("#"):
            return None
        path, label, domain = _fields(line.rstrip())
        kind = (label is not None, domain is not None)
        if self.kind is None:
            self.kind, self.first = kind, number
        elif kind != self.kind:
            raise UeoError(
                f"{self.where}:{number}: {text!r} is not a line of the kind of line {self.first} "
                f"({_describe(self.kind)}): a stream's list keeps one kind of line."
            )
        if label is None or self.unlabeled:
            value = UNLABELED
        else:
            value = label if label < self.n_known else OOD
        return Entry(str(self.root / path), value, domain)


def _fields(line: str) -> tuple[str, int | None, str | None]:
    """(path, label or None, domain or None) of a non-blank list line (module docstring)."""
    parts = line.rsplit(maxsplit=2)
    if len(parts) == 3 and _is_domain(parts[2]) and (_is_label(parts[1]) or parts[1] == NO_LABEL):
        return parts[0], int(parts[1]) if _is_label(parts[1]) else None, parts[2]
    parts = line.rsplit(maxsplit=1)
    if len(parts) == 2 and _is_label(parts[1]):
        return parts[0], int(parts[1]), None
    return line.strip(), None, None


def _is_label(word: str) -> bool:
    return word.isascii() and word.isdigit()


def _is_domain(word: str) -> bool:
    return not _is_label(word) and not word.lower().endswith(IMAGE_EXTENSIONS)


def _describe(kind: tuple[bool, bool]) -> str:
    labelled, domains = kind
    what = "'path label" if labelled else ("'path -" if domains else "'path")
    return what + (" domain'" if domains else "'")


def stream_entries(
    data: str | os.PathLike,
    class_names: list[str],
    data_root: str | os.PathLike | None = None,
    *,
    unlabeled: bool = False,
    stdin: TextIO | BinaryIO | None = None,
) -> Iterator[Entry]:
    """The entries of `data` in order: a list file, `-` (a list on `stdin`, default standard
    input, read line by line as it arrives), a folder (`ueo.data.load_image_set`'s order: the
    sorted order of the paths' parts) or one image. `unlabeled` drops labels. Images are not
    opened here: one that cannot be read is the stream's to count (ueo.stream.run)."""
    n_known = len(class_names)
    if str(data) == STDIN:
        root = Path(data_root) if data_root else Path()
        parser = ListParser("standard input", n_known, root, unlabeled)
        yield from _parsed(arriving_lines(stdin or sys.stdin), parser)
        return
    path = Path(data)
    if path.is_file() and not is_image(path):
        try:
            lines = read_lines(path, "Image list")
        except UeoError:  # not text: an image PIL knows by its header (or an error below)
            lines = None
        if lines is not None:
            root = Path(data_root) if data_root else path.parent
            yield from _parsed(iter(lines), ListParser(str(path), n_known, root, unlabeled))
            return
    images = load_image_set(path, class_names, data_root, unlabeled=unlabeled)
    for p, label in zip(images.paths, images.labels.tolist(), strict=True):
        yield Entry(p, label)


def _parsed(lines: Iterator[str], parser: ListParser) -> Iterator[Entry]:
    for number, line in enumerate(lines, 1):
        entry = parser.parse(number, line)
        if entry is not None:
            yield entry


def arriving_lines(stream: TextIO | BinaryIO) -> Iterator[str]:
    """The lines of `stream` as each arrives: a pipe is read as it is written, not to its end.

    Standard input is read from its file descriptor (a read returns what has arrived), UTF-8
    with or without a byte-order mark, any line ending; a stream without one (a test's
    BytesIO or StringIO) line by line."""
    try:
        fd = getattr(stream, "buffer", stream).fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        fd = None
    if fd is None:
        for line in iter(stream.readline, type(stream.read(0))()):
            yield line.decode() if isinstance(line, bytes) else line
        return
    pending, number = b"", 0
    while True:
        try:
            chunk = os.read(fd, CHUNK)
        except OSError as exc:
            raise UeoError(f"Cannot read standard input: {exc.strerror}.") from None
        if not chunk:
            break
        pending += chunk
        *lines, pending = LINE_END.split(pending)
        for raw in lines:
            number += 1
            yield _decoded(raw, number)
    if pending:
        yield _decoded(pending, number + 1)


def _decoded(raw: bytes, number: int) -> str:
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UeoError(
            f"Standard input, line {number}, is not UTF-8 text (invalid byte at offset "
            f"{exc.start}): a stream's list is read as UTF-8."
        ) from None
