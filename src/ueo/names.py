"""Class names as users and benchmark lists write them, and the labels images get from them.

Benchmark class lists write `_` for a space (`alarm_clock`); prompts say the name in words,
and folders are matched to names case-insensitively with the same rule. An image's label is
the index of its class in the known list, `OOD` for a class that is not on the list, or
`UNLABELED` when the data says nothing. `parse_classes` reads a `--classes` value and
`read_lines` the user's text files (class files, image lists); like the rest of this module
they need no heavy library, so the command line checks a class list before importing torch.
"""

from __future__ import annotations

import codecs
import os
import re
from pathlib import Path
from typing import BinaryIO, TextIO

from ueo.errors import UeoError

OOD = -1
UNLABELED = -2


def spoken_name(name: str) -> str:
    """The name as it goes into a text prompt: `alarm_clock` -> `alarm clock`."""
    return " ".join(name.replace("_", " ").split())


def normalize_name(name: str) -> str:
    """The key two names are compared by: spoken form, lower case."""
    return spoken_name(name).lower()


BOMS = (  # UTF-32 first: its little-endian BOM starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8-sig", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
)


def parse_classes(spec: str) -> list[str]:
    """Class names from a text file (one per line) or a comma-separated list.

    A file is read by `read_lines`; blank lines and spaces around names are ignored. A value
    that looks like a path (a folder separator, a file suffix, a leading `.` or `~`) must name
    a file; anything else is a comma list, a single word being a one-class list. Names that
    `normalize_name` makes equal are an error: they would match the same folders.
    """
    if not spec.strip():
        raise UeoError("No class names given (an empty --classes).")
    path = Path(os.path.expanduser(spec))  # unlike Path.expanduser, never raises
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError:  # a long comma list is no valid file name (ENAMETOOLONG)
        is_dir = is_file = False
    if is_dir:
        raise UeoError(
            f"--classes {spec} is a folder: give a class file or a comma-separated list."
        )
    if is_file:
        lines = read_lines(path, "Class file")
        named = [(line.strip(), f"{path}:{i}") for i, line in enumerate(lines, 1) if line.strip()]
    elif _looks_like_path(spec):
        raise UeoError(f"Class file {spec} not found (give a file or a comma-separated list).")
    else:
        named = [(n.strip(), f"item {i} of --classes") for i, n in enumerate(spec.split(","), 1)]
        for name, loc in named:
            if not name:
                raise UeoError(f"Empty class name at {loc}.")
    if not named:
        raise UeoError(f"No class names in {spec}.")
    seen: dict[str, tuple[str, str]] = {}
    for name, loc in named:
        key = normalize_name(name)
        if key in seen:
            first, first_loc = seen[key]
            raise UeoError(
                f"Duplicated class name '{name}' at {loc} (same as '{first}' at {first_loc})."
            )
        seen[key] = name, loc
    return [name for name, _ in named]


def _looks_like_path(spec: str) -> bool:
    """Whether a --classes value that names no file was meant as one (see parse_classes)."""
    spec = spec.strip()
    return (
        spec.startswith((".", "~"))
        or "/" in spec
        or os.sep in spec
        or re.fullmatch(r"\.[^\s.,]+", Path(spec).suffix) is not None
    )


def read_lines(path: Path, what: str) -> list[str]:
    """The lines of a user's text file, with any line ending (LF, CRLF or CR).

    UTF-8, with or without a BOM; UTF-16 and UTF-32 are recognised by their BOM (Windows tools
    write them). Anything else is an error that names the file, not a decoding traceback.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UeoError(f"Cannot read {what.lower()} {path}: {exc.strerror}.") from None
    return _decoded_lines(data, f"{what} {path}")


def read_stream(stream: TextIO | BinaryIO, what: str) -> list[str]:
    """The lines of a stream read to its end (standard input), decoded as `read_lines` does;
    a text stream without a binary buffer (a test's StringIO) is taken as it is."""
    binary = getattr(stream, "buffer", stream)
    try:
        data = binary.read()
    except OSError as exc:
        raise UeoError(f"Cannot read {what.lower()}: {exc.strerror}.") from None
    if isinstance(data, str):
        return re.split(r"\r\n|\r|\n", data)
    return _decoded_lines(data, what)


def _decoded_lines(data: bytes, what: str) -> list[str]:
    codec, name = next(((c, n) for bom, c, n in BOMS if data.startswith(bom)), ("utf-8", "UTF-8"))
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as exc:
        raise UeoError(
            f"{what} is not {name} text (invalid byte at offset {exc.start}): save it as UTF-8."
        ) from None
    return re.split(r"\r\n|\r|\n", text)
