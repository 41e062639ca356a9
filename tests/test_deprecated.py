"""Import paths of the release before the house move still work for one release, each with a
DeprecationWarning naming the new place (ueo.deprecated)."""

from __future__ import annotations

import importlib

import pytest

MOVED = [
    ("ueo.io", "load_adapter", "ueo.runs", "load_adapter"),
    ("ueo.io", "atomic_write", "ueo.files", "atomic_write"),
    ("ueo.io", "check_output_dir", "ueo.checks", "check_output_dir"),
    ("ueo.io", "ADAPTER_FILE", "ueo.layout", "ADAPTER_FILE"),
    ("ueo.compare", "compare_runs", "ueo.diagnose", "compare_runs"),
    ("ueo.compare", "plain", "ueo.diagnose", "to_json"),
    ("ueo.discovery", "cluster_accuracy", "ueo.discovery.groups", "cluster_accuracy"),
    ("ueo.discovery_files", "write_discovery", "ueo.discovery.files", "write_discovery"),
    ("ueo.vocabulary", "load_vocabulary", "ueo.discovery.vocabulary", "load_vocabulary"),
    ("ueo.data", "make_loader", "ueo.loader", "make_loader"),
    ("ueo.data", "parse_classes", "ueo.names", "parse_classes"),
]


@pytest.mark.parametrize(("old", "name", "new", "new_name"), MOVED)
def test_an_old_import_path_works_and_says_where_the_name_went(old, name, new, new_name):
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} is now {new}\.{new_name}"):
        found = getattr(importlib.import_module(old), name)
    assert found is getattr(importlib.import_module(new), new_name)


@pytest.mark.parametrize("old", sorted({m for m, *_ in MOVED}))
def test_a_name_that_never_was_there_is_still_an_attribute_error(old):
    with pytest.raises(AttributeError, match="no_such_name"):
        importlib.import_module(old).no_such_name  # noqa: B018


def test_the_discovery_package_answers_its_api_without_a_warning():
    """`ueo.discovery`, a module before, is the package of `ueo discover`: its API is its own."""
    import warnings

    import ueo.discovery.groups

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from ueo.discovery import DiscoverSettings, discover, load_vocabulary

    assert discover is ueo.discovery.groups.discover
    assert DiscoverSettings().k_select == "silhouette" and callable(load_vocabulary)
