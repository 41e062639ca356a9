"""Names that moved, still importable from where they were until the next release, with a
DeprecationWarning that says where they went. Torch-free."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable


def forwarding(old: str, moves: str | dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` for `old`, whose names moved: to the module `moves` names, or
    each to its own (`moves` maps a name to `module` or `module:new_name`; `*`: the rest)."""

    def __getattr__(name: str) -> object:
        target = moves if isinstance(moves, str) else moves.get(name, moves.get("*"))
        module_name, _, new = (target or "").partition(":")
        new = new or name
        module = importlib.import_module(module_name) if module_name else None
        if module is None or not hasattr(module, new):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(
            f"{old}.{name} is now {module_name}.{new}; the old name goes in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(module, new)

    return __getattr__
