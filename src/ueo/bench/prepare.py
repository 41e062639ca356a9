"""Write the image lists of a benchmark from its folders as downloaded.

Each list has one image per line, ``relative/path label``, with paths relative to the
dataset root (forward slashes) and labels from the shipped class list, so runs on any
machine see the same samples with the same labels. Paths may contain spaces (Office-Home's
``Real World`` folder), so readers must split each line at its last space.

Expected layouts:

- Office-31: ``root/<domain>/images/<class>/<image>``
- Office-Home: ``root/<domain>/<class>/<image>``; RealWorld may be ``RealWorld``,
  ``Real_World`` or ``Real World``
- VisDA-C: ``root/<domain>/<class>/<image>`` (files next to the class folders, such as
  ``image_list.txt``, are ignored)
- DomainNet: ``root/<domain>/<class>/<image>`` plus the official split files
  ``root/<domain>_train.txt`` and ``root/<domain>_test.txt``

Every class of the benchmark must have a folder in every prepared domain; folder names
are matched to the class list case-insensitively.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ueo.bench.protocol import DatasetInfo, class_names, dataset_info, domain_name
from ueo.checks import check_output_dir
from ueo.data import IMAGE_EXTENSIONS
from ueo.errors import UeoError
from ueo.files import write_text

# Folder names a domain goes by in the different releases of a dataset.
_FOLDER_NAMES = {"RealWorld": ("RealWorld", "Real_World", "Real World")}

_SHOWN = 5  # how many offending paths an error message lists


def _few(items: list[str]) -> str:
    return ", ".join(items[:_SHOWN]) + (" ..." if len(items) > _SHOWN else "")


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _domain_folder(root: Path, info: DatasetInfo, domain: str) -> Path | None:
    for name in _FOLDER_NAMES.get(domain, (domain,)):
        folder = root / name / "images" if info.name == "office31" else root / name
        if folder.is_dir():
            return folder
    return None


def _class_folders(folder: Path, labels: dict[str, int], names: list[str]) -> dict[int, Path]:
    """Map each label to its class folder; every class needs exactly one folder."""
    found: dict[int, Path] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p)):
        label = labels.get(sub.name.lower())
        if label is None:
            raise UeoError(f"unknown class folder {sub}: no class of that name in the class list")
        if label in found:
            raise UeoError(f"class {names[label]!r} has two folders: {found[label]} and {sub}")
        found[label] = sub
    missing = [names[i] for i in range(len(names)) if i not in found]
    if missing:
        raise UeoError(f"{len(missing)} class folder(s) missing in {folder}: {_few(missing)}")
    return found


def _folder_lines(root: Path, folders: dict[int, Path]) -> list[str]:
    lines = []
    for label, folder in folders.items():
        for path in folder.iterdir():
            if _visible(path) and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                lines.append((path.relative_to(root).as_posix(), label))
    return [f"{rel} {label}" for rel, label in sorted(lines)]


def _split_lines(root: Path, split_file: Path, labels: dict[str, int]) -> list[str]:
    """Re-label an official DomainNet split by class folder name and check its files exist."""
    if not split_file.is_file():
        raise UeoError(f"official split file {split_file} not found")
    lines, missing = [], []
    text = split_file.read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().rsplit(maxsplit=1)
        parts = fields[0].replace("\\", "/").split("/")
        if len(fields) != 2 or len(parts) < 2:
            raise UeoError(f"{split_file}:{number}: expected '<domain>/<class>/<image> <label>'")
        label = labels.get(parts[-2].lower())
        if label is None:
            raise UeoError(f"{split_file}:{number}: unknown class folder {parts[-2]!r}")
        rel = "/".join(parts)
        if not (root / rel).is_file():
            missing.append(rel)
        lines.append((rel, label))
    if missing:
        raise UeoError(
            f"{len(missing)} file(s) listed in {split_file} are missing under {root}, e.g. "
            + _few(missing)
        )
    return [f"{rel} {label}" for rel, label in sorted(lines)]


def prepare_lists(
    dataset: str, root: str | Path, out: str | Path, domains: Iterable[str] | None = None
) -> dict[str, Path]:
    """Write one list per domain (DomainNet: ``<domain>_train`` and ``<domain>_test``).

    ``domains`` restricts the work to some domains; only those need to exist. All
    folders are checked before anything is written. Re-running gives identical files.
    Returns the list name (the file stem) -> path of each written list.
    """
    info = dataset_info(dataset)
    root, out = Path(root), check_output_dir(out)
    if not root.is_dir():
        raise UeoError(f"dataset root {root} does not exist or is not a folder")
    chosen = info.domains if domains is None else [domain_name(info.name, d) for d in domains]
    found = {d: f for d in info.domains if (f := _domain_folder(root, info, d)) is not None}
    absent = [d for d in chosen if d not in found]
    if absent:
        layout = "<domain>/images/<class>" if info.name == "office31" else "<domain>/<class>"
        entries = sorted(p.name for p in root.iterdir() if _visible(p))
        raise UeoError(
            f"{info.name} domain(s) {', '.join(absent)} not found under {root} "
            f"(expected {layout}); domains found: {', '.join(found) or 'none'}; "
            f"the folder holds: {_few(entries) or 'nothing'}"
        )
    names = class_names(info.name)
    labels = {name.lower(): i for i, name in enumerate(names)}
    lists: dict[str, list[str]] = {}
    for d in chosen:
        classes = _class_folders(found[d], labels, names)
        if info.name == "domainnet":
            for split in ("train", "test"):
                lists[f"{d}_{split}"] = _split_lines(root, root / f"{d}_{split}.txt", labels)
        else:
            lists[d] = _folder_lines(root, classes)
    out.mkdir(parents=True, exist_ok=True)
    return {
        name: write_text(out / f"{name}.txt", "".join(f"{line}\n" for line in lines))
        for name, lines in lists.items()
    }
