"""Class names as users and benchmark lists write them, and the labels images get from them.

Benchmark class lists write `_` for a space (`alarm_clock`); prompts say the name in words,
and folders are matched to names case-insensitively with the same rule. An image's label is
the index of its class in the known list, `OOD` for a class that is not on the list, or
`UNLABELED` when the data says nothing.
"""

from __future__ import annotations

OOD = -1
UNLABELED = -2


def spoken_name(name: str) -> str:
    """The name as it goes into a text prompt: `alarm_clock` -> `alarm clock`."""
    return " ".join(name.replace("_", " ").split())


def normalize_name(name: str) -> str:
    """The key two names are compared by: spoken form, lower case."""
    return spoken_name(name).lower()
