"""`ueo discover`: what the images an adapted model rejects are, as named groups.

`groups` clusters and names them, `vocabulary` holds the candidate names, `files` writes what
was found, `settings` says how (torch-free). The names below are imported on first use, so
that `ueo.discovery.settings` stays light. (The package is not named `ueo.discover`: that is
the Python API's function, `from ueo import discover`.)
"""

import importlib
import warnings

_API = {
    "Cluster": "groups",
    "Discovery": "groups",
    "discover": "groups",
    "discover_outputs": "groups",
    "evaluate_discovery": "groups",
    "DiscoverSettings": "settings",
    "K_SELECTIONS": "settings",
    "DEFAULT_MAX_CLUSTERS": "settings",
    "Vocabulary": "vocabulary",
    "load_vocabulary": "vocabulary",
    "without_known": "vocabulary",
    "write_discovery": "files",
    "discovery_table": "files",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f"ueo.discovery.{_API[name]}"), name)
    groups = importlib.import_module("ueo.discovery.groups")
    if name.startswith("__") or not hasattr(groups, name):
        raise AttributeError(f"module 'ueo.discovery' has no attribute {name!r}")
    # The rest of what ueo.discovery held when it was one module.
    warnings.warn(
        f"ueo.discovery.{name} is now ueo.discovery.groups.{name}; the old name goes in the "
        "next release.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(groups, name)
