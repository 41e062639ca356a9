"""Paths found by their digests: where each of a million paths is, held as a few arrays of
numbers instead of a dict entry per path (ueo.cache's index of stored images, a sweep's rows
of a domain's zero-shot pass)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import numpy as np

KEY = "S16"  # a path's 128-bit BLAKE2b digest; two paths share one with odds of 2^-128


def path_key(path: str) -> bytes:
    return hashlib.blake2b(os.fsencode(path), digest_size=16).digest()


def path_keys(paths: Iterable[str]) -> np.ndarray:
    return np.array([path_key(p) for p in paths], dtype=KEY)


def lookup(keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The positions of `queries` in the sorted `keys`; -1 where absent."""
    at = np.searchsorted(keys, queries)
    found = at < len(keys)
    found[found] = keys[at[found]] == queries[found]
    return np.where(found, at, -1)


class PathIndex:
    """The position of each path of a list, found by its key."""

    def __init__(self, paths: Sequence[str]):
        keys = path_keys(paths)
        self.order = np.argsort(keys, kind="stable")
        self.keys = keys[self.order]

    def positions(self, paths: Sequence[str]) -> np.ndarray:
        """Where each of `paths` is in the indexed list (a KeyError names one that is not)."""
        found = lookup(self.keys, path_keys(paths))
        if (found < 0).any():
            raise KeyError(paths[int(np.argmax(found < 0))])
        return self.order[found]
