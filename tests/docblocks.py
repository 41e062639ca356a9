"""The fenced code blocks of README.md and docs/*.md, each with the HTML comment above it.

The convention they follow is in docs/architecture.md ("The documentation's code blocks").
"""

from __future__ import annotations
import __future__

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = ("python", "console", "sh", "text")
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")
COMMENT = re.compile(r"^\s*<!--\s*(?P<text>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: str | None  # the text of an HTML comment on the nearest non-blank line above

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang != "text" and not (self.marker or "").startswith("not run")


def blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start, indent = i, len(opening["indent"])
        body = []
        i += 1
        while i < len(lines) and not re.fullmatch(r" *```\s*", lines[i]):
            body.append(lines[i][indent:])
            i += 1
        above = start - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        comment = COMMENT.match(lines[above]) if above >= 0 else None
        code = "\n".join(body) + "\n"
        marker = comment["text"] if comment else None
        found.append(Block(path, start + 1, opening["lang"], code, marker))
        i += 1
    return found


def all_blocks() -> list[Block]:
    return [b for path in DOCS for b in blocks(path)]


def block(path: Path, containing: str) -> Block:
    """The one block of `path` whose code contains `containing`."""
    (found,) = [b for b in blocks(path) if containing in b.code]
    return found


def exec_block(block: Block) -> dict:
    """Run a python block; under `<!-- run in MODULE -->`, in a copy of that module's namespace
    and with its `from __future__` features, as if pasted into it. Returns the namespace.
    (What it registers in the module's registries stays there: the caller restores them.)"""
    namespace: dict = {"__name__": "__doc_block__"}
    flags = 0
    if block.marker and block.marker.startswith("run in "):
        module = importlib.import_module(block.marker.removeprefix("run in ").strip())
        namespace = dict(vars(module))
        for value in namespace.values():
            if isinstance(value, __future__._Feature):
                flags |= value.compiler_flag
    exec(compile(block.code, block.where, "exec", flags=flags, dont_inherit=True), namespace)
    return namespace
