"""The benchmark protocol must match the spec's table literally."""

import json

import pytest

from ueo.bench.protocol import (
    DATASETS,
    SCENARIOS,
    class_names,
    custom_scenario_split,
    dataset_info,
    domain_name,
    protocol_json,
    scenario_split,
)
from ueo.errors import UeoError
from ueo.names import spoken_name


def r(a: int, b: int) -> list[int]:
    """Inclusive range, written as in the spec's table (``0-24``)."""
    return list(range(a, b + 1))


# dataset: (classes, known N, CDA, PDA, ODA, OPDA), copied from docs/spec.md
# ("Benchmarks and class shifts").
TABLE = {
    "office31": (31, 25, r(0, 24), r(0, 19), r(0, 27), r(0, 14) + r(25, 27)),
    "officehome": (65, 50, r(0, 49), r(0, 34), r(0, 59), r(0, 34) + r(50, 59)),
    "visda-c": (12, 8, r(0, 7), r(0, 5), r(0, 9), r(0, 5) + r(8, 9)),
    "domainnet": (345, 300, r(0, 299), r(0, 249), r(0, 329), r(0, 249) + r(300, 329)),
}

DOMAINS = {
    "office31": ("amazon", "dslr", "webcam"),
    "officehome": ("Art", "Clipart", "Product", "RealWorld"),
    "visda-c": ("train", "validation"),
    "domainnet": ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
}


@pytest.mark.parametrize("dataset", TABLE)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_split_matches_spec_table(dataset: str, scenario: str) -> None:
    classes, n, cda, pda, oda, opda = TABLE[dataset]
    split = scenario_split(dataset, scenario)
    if scenario == "CLOSED":
        expected = {"known": r(0, classes - 1), "unlabeled": r(0, classes - 1)}
    else:
        unlabeled = {"CDA": cda, "PDA": pda, "ODA": oda, "OPDA": opda}[scenario]
        expected = {"known": r(0, n - 1), "unlabeled": unlabeled}
    assert split == {**expected, "test": r(0, classes - 1)}


def test_every_dataset_is_checked_against_the_table() -> None:
    """The parametrised tests cover every dataset the protocol defines, and only those."""
    assert list(DATASETS) == list(TABLE) == list(DOMAINS)


@pytest.mark.parametrize("dataset", TABLE)
def test_dataset_info_and_class_lists(dataset: str) -> None:
    info = dataset_info(dataset)
    assert info.name == dataset
    assert info.domains == DOMAINS[dataset]
    assert (info.num_classes, info.known) == TABLE[dataset][:2]
    names = class_names(dataset)
    assert len(names) == info.num_classes
    # Folders are matched case-insensitively, so names must stay distinct when lowercased.
    assert len({n.lower() for n in names}) == len(names)
    assert all(n == n.strip() and " " not in n for n in names)


def test_class_names_in_label_order() -> None:
    assert class_names("office31")[:2] == ["back_pack", "bike"]
    assert class_names("officehome")[0] == "alarm_clock"
    assert class_names("visda-c")[7:9] == ["person", "plant"]
    assert class_names("domainnet")[308] == "The_Eiffel_Tower"
    assert spoken_name("The_Eiffel_Tower") == "The Eiffel Tower"
    assert spoken_name("bike") == "bike"


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("Office-31", "office31"),
        ("office_home", "officehome"),
        ("Office-Home", "officehome"),
        ("VisDA", "visda-c"),
        ("visdac", "visda-c"),
        ("VisDA-C", "visda-c"),
        ("DomainNet", "domainnet"),
    ],
)
def test_dataset_aliases(alias: str, name: str) -> None:
    assert dataset_info(alias).name == name


def test_domain_names() -> None:
    assert domain_name("officehome", "Real_World") == "RealWorld"
    assert domain_name("officehome", "real world") == "RealWorld"
    assert domain_name("office31", "Amazon") == "amazon"
    with pytest.raises(UeoError, match="valid domains: amazon, dslr, webcam"):
        domain_name("office31", "art")


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(UeoError, match="office31, officehome, visda-c, domainnet"):
        dataset_info("imagenet")
    with pytest.raises(UeoError, match="CDA, PDA, ODA, OPDA, CLOSED"):
        scenario_split("office31", "UDA")
    assert scenario_split("office31", "opda") == scenario_split("office31", "OPDA")


def test_custom_split_reproduces_office_home() -> None:
    for scenario in SCENARIOS:
        assert custom_scenario_split(65, 50, scenario) == scenario_split("officehome", scenario)


def test_custom_rule_is_only_similar_on_other_benchmarks() -> None:
    # ceil(0.7 * 25) = 18 and ceil(2/3 * 6) = 4, while the table says 0-19 and 25-27.
    assert custom_scenario_split(31, 25, "PDA")["unlabeled"] == r(0, 17)
    assert custom_scenario_split(31, 25, "ODA")["unlabeled"] == r(0, 28)
    assert custom_scenario_split(12, 8, "ODA")["unlabeled"] == r(0, 10)  # table: 0-9
    assert custom_scenario_split(345, 300, "PDA")["unlabeled"] == r(0, 209)  # table: 0-249
    for dataset, (classes, n, *_) in TABLE.items():
        differs = [
            s
            for s in SCENARIOS
            if custom_scenario_split(classes, n, s) != scenario_split(dataset, s)
        ]
        assert bool(differs) == (dataset != "officehome")


def test_custom_split_examples() -> None:
    # N = 7 of C = 10: PDA keeps ceil(4.9) = 5; U = 3 adds ceil(2) = 2 unknown classes.
    assert custom_scenario_split(10, 7, "CDA") == {
        "known": r(0, 6),
        "unlabeled": r(0, 6),
        "test": r(0, 9),
    }
    assert custom_scenario_split(10, 7, "PDA")["unlabeled"] == r(0, 4)
    assert custom_scenario_split(10, 7, "ODA")["unlabeled"] == r(0, 8)
    assert custom_scenario_split(10, 7, "OPDA")["unlabeled"] == r(0, 4) + [7, 8]
    assert custom_scenario_split(10, 7, "CLOSED") == {
        "known": r(0, 9),
        "unlabeled": r(0, 9),
        "test": r(0, 9),
    }
    # ceil(0.7 * 10) = 7 exactly; one unknown class still gives one (ceil(2/3) = 1).
    assert custom_scenario_split(11, 10, "OPDA")["unlabeled"] == r(0, 6) + [10]
    assert custom_scenario_split(1, 1, "PDA")["unlabeled"] == [0]
    assert custom_scenario_split(3, 3, "CDA")["unlabeled"] == [0, 1, 2]


@pytest.mark.parametrize(
    ("classes", "known", "scenario", "message"),
    [
        (5, 0, "CDA", "1 <= known <= num_classes"),
        (5, 6, "CDA", "1 <= known <= num_classes"),
        (5, 5, "ODA", "at least one unknown class"),
        (5, 5, "OPDA", "at least one unknown class"),
        (5, 3, "XDA", "valid scenarios"),
    ],
)
def test_custom_split_errors(classes: int, known: int, scenario: str, message: str) -> None:
    with pytest.raises(UeoError, match=message):
        custom_scenario_split(classes, known, scenario)


def test_protocol_json() -> None:
    data = json.loads(protocol_json("Office-31", "opda"))
    assert data == {"known": r(0, 24), "unlabeled": r(0, 14) + r(25, 27), "test": r(0, 30)}


def test_protocol_command(capsys) -> None:
    from ueo.cli import main

    assert main(["protocol", "officehome", "--scenario", "opda", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == {"known": r(0, 49), "unlabeled": r(0, 34) + r(50, 59), "test": r(0, 64)}
    assert main(["protocol", "domainnet", "--scenario", "ODA"]) == 0
    assert "unlabeled: 0-329  (330 classes)" in capsys.readouterr().out
    assert main(["protocol", "imagenet", "--scenario", "CDA"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
