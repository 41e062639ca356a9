"""How `ueo discover` forms its groups: plain data, checked without torch (the command line
checks it before it imports anything heavy)."""

from __future__ import annotations

from dataclasses import dataclass

from ueo.checks import check_choice, check_int
from ueo.recipe import MAX_SEED

K_SELECTIONS = ("silhouette", "gcd")  # how `ueo discover` chooses its number of groups
DEFAULT_MAX_CLUSTERS = 15


@dataclass(frozen=True)
class DiscoverSettings:
    """How `ueo discover` forms its groups (ueo.discovery.groups); `clusters` None chooses their
    number with `k_select`. Plain data, so that the command line checks it before torch."""

    clusters: int | None = None
    k_select: str = "silhouette"
    max_clusters: int = DEFAULT_MAX_CLUSTERS
    seed: int = 0

    def validate(self) -> DiscoverSettings:
        if self.clusters is not None:
            check_int("clusters", self.clusters, 1)
        check_int("max-clusters", self.max_clusters, 2)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_choice("k-select", self.k_select, K_SELECTIONS)
        return self
