"""Suites a sweep runs on: a paper benchmark from its list files, or a user's labelled folder."""

from __future__ import annotations

from pathlib import Path

from ueo.bench.grid import check_known
from ueo.bench.plan import Domain, Suite
from ueo.bench.protocol import (
    PAPER_SCENARIOS,
    class_names,
    custom_scenario_split,
    dataset_info,
    scenario_split,
)
from ueo.data import OOD, load_image_set
from ueo.errors import UeoError
from ueo.names import normalize_name


def benchmark_suite(dataset: str, lists: str | Path, root: str | Path) -> Suite:
    """A paper benchmark from the list files of `ueo prepare` (DomainNet: train/test lists)."""
    info = dataset_info(dataset)
    names = class_names(info.name)
    lists = Path(lists)
    domains = []
    for d in info.domains:
        if info.name == "domainnet":
            files = (lists / f"{d}_train.txt", lists / f"{d}_test.txt")
        else:
            files = (lists / f"{d}.txt", lists / f"{d}.txt")
        if not all(f.is_file() for f in files):
            continue
        unlabeled = load_image_set(files[0], names, root)
        test = unlabeled if files[1] == files[0] else load_image_set(files[1], names, root)
        domains.append(Domain(d, unlabeled, test))
    splits = {s: scenario_split(info.name, s) for s in PAPER_SCENARIOS + ("CLOSED",)}
    return Suite(info.name, names, domains, splits)


def folder_suite(
    data: str | Path,
    class_names: list[str],
    known: int | None = None,
    known_classes: list[str] | None = None,
) -> Suite:
    """A user's labelled folder as a one-domain benchmark (unlabeled = test = the folder).

    Known classes come first: the first `known` names, or the names in `known_classes`
    followed by the remaining ones. Scenarios follow `custom_scenario_split`.
    """
    check_known(class_names, known, known_classes)
    if known_classes:
        wanted = {normalize_name(n) for n in known_classes}
        first = [n for n in class_names if normalize_name(n) in wanted]
        class_names = first + [n for n in class_names if normalize_name(n) not in wanted]
        known = len(first)
    images = load_image_set(data, class_names)
    if not images.labelled:
        raise UeoError(f"{data} has no class folders; a benchmark needs labelled images.")
    unmatched = int((images.labels == OOD).sum())
    if unmatched:
        raise UeoError(f"{unmatched} images in {data} are in folders not named in --all-classes.")
    splits = {}
    for s in PAPER_SCENARIOS + ("CLOSED",):
        if s in ("ODA", "OPDA") and known == len(class_names):
            continue
        splits[s] = custom_scenario_split(len(class_names), known, s)
    name = Path(data).name
    return Suite(name, list(class_names), [Domain(name, images, images)], splits)
