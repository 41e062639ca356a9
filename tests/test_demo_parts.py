"""The demo's grid split over processes: every cell once, domains kept whole when possible."""

import numpy as np
import pytest
from conftest import CLASSES

from ueo.bench.plan import Domain, Suite, Sweep, plan
from ueo.bench.protocol import PAPER_SCENARIOS, custom_scenario_split
from ueo.data import ImageSet
from ueo.demo.runner import parts


def suite(n_domains: int) -> Suite:
    images = ImageSet([f"{i}.png" for i in range(4)], np.arange(4))
    splits = {s: custom_scenario_split(len(CLASSES), 2, s) for s in PAPER_SCENARIOS}
    domains = [Domain(f"d{i}", images, images) for i in range(n_domains)]
    return Suite("s", list(CLASSES), domains, splits)


@pytest.mark.parametrize("n_domains", [1, 4])
@pytest.mark.parametrize("processes", [1, 2, 3, 8, 16, 40])
def test_parts_cover_the_grid_once(n_domains, processes):
    s = suite(n_domains)
    sweep = Sweep("test-tiny-rn", "none", methods=["zeroshot", "ueo"])
    split = parts(s, sweep, processes)
    cells = [c for part in split for c in plan(s, part)]
    assert sorted(cells, key=str) == sorted(plan(s, sweep), key=str)
    assert len(set(cells)) == len(cells)
    assert 1 <= len(split) <= processes
    if processes <= n_domains:  # no domain is split: one zero-shot pass per domain
        domains = [d for part in split for d in part.domains]
        assert len(domains) == len(set(domains)) == n_domains
    else:
        assert len(split) == min(processes, n_domains * len(PAPER_SCENARIOS))
