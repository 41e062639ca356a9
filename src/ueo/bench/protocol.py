"""The four benchmarks of the paper: domains, class lists and the class-shift scenarios.

Which classes are known and which ones appear in the unlabeled set is fixed by the
paper's protocol (see the table below), so results stay comparable with published
numbers. Label indices follow the class lists shipped in ``ueo/bench/classes/``.

=========== ======= === ===== ===== ===== ===============
dataset     classes  N   CDA   PDA   ODA   OPDA
=========== ======= === ===== ===== ===== ===============
office31         31  25 0-24  0-19  0-27  0-14, 25-27
officehome       65  50 0-49  0-34  0-59  0-34, 50-59
visda-c          12   8 0-7   0-5   0-9   0-5, 8-9
domainnet       345 300 0-299 0-249 0-329 0-249, 300-329
=========== ======= === ===== ===== ===== ===============

Known classes are always the first N indices; the test set always holds all classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from ueo.errors import UeoError

SCENARIOS = ("CDA", "PDA", "ODA", "OPDA", "CLOSED")
PAPER_SCENARIOS = SCENARIOS[:4]  # the paper's four class shifts: what a benchmark runs by default


@dataclass(frozen=True)
class DatasetInfo:
    """A benchmark and the class counts that define its scenarios.

    Unlabeled classes per scenario: CDA ``[0, known)``; PDA ``[0, pda_known)``;
    ODA ``[0, known + oda_unknown)``; OPDA ``[0, opda_known)`` plus
    ``[known, known + oda_unknown)``. ``opda_known`` is separate from ``pda_known``
    because Office-31 uses fewer shared classes in OPDA than in PDA. ``epochs`` is the
    reference recipe's number of epochs for the dataset (docs/spec.md).
    """

    name: str
    domains: tuple[str, ...]
    num_classes: int
    known: int
    pda_known: int
    opda_known: int
    oda_unknown: int
    epochs: int = 50


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("office31", ("amazon", "dslr", "webcam"), 31, 25, 20, 15, 3),
        DatasetInfo("officehome", ("Art", "Clipart", "Product", "RealWorld"), 65, 50, 35, 35, 10),
        DatasetInfo("visda-c", ("train", "validation"), 12, 8, 6, 6, 2),
        DatasetInfo(
            "domainnet",
            ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
            345,
            300,
            250,
            250,
            30,
            epochs=5,
        ),
    )
}

# Aliases are matched after lowercasing and dropping '-', '_' and spaces.
_ALIASES = {
    "office31": "office31",
    "officehome": "officehome",
    "visdac": "visda-c",
    "visda": "visda-c",
    "domainnet": "domainnet",
}


def _key(text: str) -> str:
    return "".join(c for c in text.lower() if c not in "-_ ")


def dataset_info(dataset: str) -> DatasetInfo:
    """Resolve a dataset name or alias (``Office-31``, ``office_home``, ``VisDA``...)."""
    name = _ALIASES.get(_key(dataset))
    if name is None:
        raise UeoError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def domain_name(dataset: str, domain: str) -> str:
    """Canonical name of a benchmark domain, ignoring case, '-', '_' and spaces."""
    info = dataset_info(dataset)
    for name in info.domains:
        if _key(name) == _key(domain):
            return name
    raise UeoError(
        f"unknown domain {domain!r} for {info.name}; valid domains: {', '.join(info.domains)}"
    )


def _scenario(scenario: str) -> str:
    name = scenario.strip().upper()
    if name not in SCENARIOS:
        raise UeoError(f"unknown scenario {scenario!r}; valid scenarios: {', '.join(SCENARIOS)}")
    return name


@cache
def _class_names(name: str) -> tuple[str, ...]:
    text = (files("ueo.bench") / "classes" / f"{name}.classes.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def class_names(dataset: str) -> list[str]:
    """Raw class names of a benchmark in label-index order (``_`` stands for a space)."""
    return list(_class_names(dataset_info(dataset).name))


def _split(
    c: int, n: int, pda_known: int, opda_known: int, unknown: int, scenario: str
) -> dict[str, list[int]]:
    known = list(range(n))
    extra = list(range(n, n + unknown))
    unlabeled = {
        "CDA": known,
        "PDA": list(range(pda_known)),
        "ODA": known + extra,
        "OPDA": list(range(opda_known)) + extra,
        "CLOSED": list(range(c)),
    }[scenario]
    return {
        "known": list(range(c)) if scenario == "CLOSED" else known,
        "unlabeled": unlabeled,
        "test": list(range(c)),
    }


def scenario_split(dataset: str, scenario: str) -> dict[str, list[int]]:
    """Class indices of a benchmark scenario, exactly as in the paper's protocol.

    Returns ``{"known": ..., "unlabeled": ..., "test": ...}`` as sorted index lists.
    """
    info = dataset_info(dataset)
    return _split(
        info.num_classes,
        info.known,
        info.pda_known,
        info.opda_known,
        info.oda_unknown,
        _scenario(scenario),
    )


def custom_scenario_split(num_classes: int, known: int, scenario: str) -> dict[str, list[int]]:
    """Scenario class indices for user data with ``known`` known classes out of ``num_classes``.

    The benchmarks follow no common rule, so this one mimics Office-Home's ratios
    (35 of 50 known classes kept, 10 of 15 unknown classes added). With N known
    classes (the first N indices) and U = num_classes - N unknown ones:

    - CDA: all N known classes;
    - PDA: the first ceil(0.7 * N) known classes;
    - ODA: all known classes plus the first ceil(2/3 * U) unknown classes;
    - OPDA: PDA's known classes plus ODA's unknown classes;
    - CLOSED: every class is known and present.

    The test set always holds all classes. ODA and OPDA need U >= 1.
    """
    c, n = num_classes, known
    name = _scenario(scenario)
    if not 1 <= n <= c:
        raise UeoError(f"need 1 <= known <= num_classes, got known={n}, num_classes={c}")
    if name in ("ODA", "OPDA") and n == c:
        raise UeoError(
            f"scenario {name} needs at least one unknown class, but all {c} classes are known"
        )
    partial = (7 * n + 9) // 10  # ceil(0.7 * N) in integer arithmetic
    return _split(c, n, partial, partial, (2 * (c - n) + 2) // 3, name)  # ceil(2/3 * U)


def protocol_json(dataset: str, scenario: str) -> str:
    """What ``ueo protocol --json`` prints: exactly the scenario's three class-index sets."""
    return json.dumps(scenario_split(dataset, scenario))
