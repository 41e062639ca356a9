"""Running a benchmark grid: every missing cell of the plan (ueo.bench.plan) adapted into its
run folder, one zero-shot pass per domain and prompt shared, each image decoded once, a
finished cell read back (ueo.bench.cells), so a sweep resumes where it stopped."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from socket import gethostname

import numpy as np
import torch

from ueo.adaptation import AdaptResult, adapt
from ueo.bench.cells import cell_components, is_done, resumable
from ueo.bench.plan import Cell, Suite, Sweep, plan
from ueo.bench.scores import save_scores
from ueo.cache import ImageCache
from ueo.clip import LoadedClip, load_clip
from ueo.data import OOD, ImageSet
from ueo.deprecated import forwarding
from ueo.errors import UeoError
from ueo.fingerprint import digest
from ueo.inference import Outputs, infer
from ueo.layout import METRICS_FILE
from ueo.model import UeoModel, norm_parameters
from ueo.pathkeys import PathIndex
from ueo.recipe import Recipe, Runtime
from ueo.runs import adapt_into, staging_dir
from ueo.runtime import resolve_device

log = logging.getLogger("ueo")

# The grid's data model, its fingerprints and its scores had their home here before.
__getattr__ = forwarding(
    "ueo.bench.sweep",
    {
        **dict.fromkeys(
            ("Domain", "Suite", "Cell", "Sweep", "plan", "shares", "cell_costs", "split"),
            "ueo.bench.plan",
        ),
        **dict.fromkeys(
            ("cell_components", "cell_fingerprint", "is_done", "status"), "ueo.bench.cells"
        ),
        "SCORES_FILE": "ueo.bench.scores",
        "load_scores": "ueo.bench.scores",
        "default_methods": "ueo.bench.grid",
    },
)


def _restore(net: torch.nn.Module, pristine: dict[str, torch.Tensor]) -> None:
    """Undo a cell's adaptation: only the norm affines of the shared model ever change."""
    with torch.no_grad():
        for name, p in norm_parameters(net, "all").items():
            p.copy_(pristine[name])


def run_sweep(
    suite: Suite,
    sweep: Sweep,
    out: str | Path,
    on_done: Callable[[Cell], None] | None = None,
    *,
    cells: list[Cell] | None = None,
    may_start: Callable[[Cell], bool] | None = None,
    images: ImageCache | None = None,
) -> list[tuple[Cell, dict]]:
    """Run every missing cell; complete cells are read back, so a sweep resumes where it stopped.

    Returns (cell, metrics record) for every cell of the plan (or of `cells`, a part of it);
    `on_done` is told of each cell as it is done or read back (progress of a sweep run in
    another process); `may_start` is asked before a cell is computed, and False stops the sweep
    there. `images` holds the decoded images (default: a store of the default size).

    A cell's numbers do not depend on the cells run before it in the process: each starts
    from the pristine model, its prompt is built after seeding with its seed, and its
    zero-shot outputs are those of its own prompt.
    """
    out = Path(out)
    cells = plan(suite, sweep) if cells is None else cells
    device = resolve_device(sweep.runtime.device)
    clip: LoadedClip | None = None
    pristine: dict[str, torch.Tensor] = {}
    zeroshot_cache: dict[tuple, tuple[PathIndex, Outputs]] = {}
    images = images if images is not None else ImageCache()  # each image decoded once
    results = []
    for n, cell in enumerate(cells, 1):
        components = cell_components(suite, sweep, cell)
        if is_done(cell, out, components):
            record = json.loads((cell.path(out) / METRICS_FILE).read_text())
            results.append((cell, record))
            if on_done is not None:
                on_done(cell)
            continue
        if may_start is not None and not may_start(cell):
            break
        if clip is None:
            clip = load_clip(sweep.model, sweep.pretrained, device, sweep.runtime.channels_last)
            pristine = {k: v.detach().clone() for k, v in norm_parameters(clip.model).items()}
        else:
            _restore(clip.model, pristine)
        domain = suite.domain(cell.domain)
        names, unlabeled, test = suite.scenario_sets(domain, cell.scenario)
        if not len(unlabeled):
            raise UeoError(f"Domain {cell.domain} has no images of the {cell.scenario} classes.")
        recipe = sweep.cell_recipe(cell)
        ctx = (recipe.n_ctx, recipe.ctx_init.strip())  # a random context: from the cell's seed
        model = UeoModel(clip, names, *ctx, seed=recipe.seed).to(device)
        log.info(
            "[%d/%d] %s %s %s seed %d: %d unlabeled, %d test images",
            n,
            len(cells),
            cell.domain,
            cell.scenario,
            cell.method,
            cell.seed,
            len(unlabeled),
            len(test),
        )
        zeroshot = _shared_zeroshot(
            zeroshot_cache, model, domain, names, unlabeled, test, recipe, sweep.runtime, images
        )
        staging = staging_dir(cell.path(out))
        resume = resumable(staging, model, recipe, unlabeled, test)
        run = partial(
            _adapt_cell,
            model=model,
            unlabeled=unlabeled,
            recipe=recipe,
            runtime=sweep.runtime,
            test=test,
            zeroshot=zeroshot,
            resume=resume,
            cache=images,
        )
        extra = {
            "cell": asdict(cell),
            "suite": suite.name,
            "cell_fingerprint": digest(components),
            "cell_fingerprint_components": components,
        }
        scores = partial(save_scores, test=test)
        record = adapt_into(cell.path(out), model, run, extra, also=scores)
        results.append((cell, record))
        if on_done is not None:
            on_done(cell)
    return results


def _shared_zeroshot(
    cache, model, domain, names, unlabeled, test, recipe, runtime, images
) -> dict[str, Outputs]:
    """Zero-shot outputs of the scenario's sets, sliced from one pass over the whole domain.

    The pass serves every cell whose prompt starts the same: the same known classes and
    context, and, for a random context (--ctx-init ''), the same seed."""
    r = recipe
    seed = None if r.ctx_init.strip() else r.seed
    key = (domain.name, tuple(names), r.precision, r.ctx_init, r.n_ctx, seed)
    if key not in cache:
        paths = sorted(set(domain.unlabeled.paths) | set(domain.test.paths))
        everything = ImageSet(paths, np.full(len(paths), OOD), domain.name)
        out = infer(
            model,
            everything,
            runtime,
            precision=r.precision,
            desc=f"zero-shot {domain.name}",
            cache=images,
        )
        cache.clear()
        cache[key] = (PathIndex(paths), out)
    index, out = cache[key]

    def take(images: ImageSet) -> Outputs:
        rows = index.positions(images.paths)
        return Outputs(out.cos[rows], out.valid[rows])

    return {"unlabeled": take(unlabeled), "test": take(test)}


def _adapt_cell(
    staging: Path, model: UeoModel, unlabeled: ImageSet, recipe: Recipe, runtime: Runtime, **kwargs
) -> AdaptResult:
    """`adapt` of one cell, checkpointed in its staging folder; its log says where it ran."""
    device = next(model.parameters()).device
    log.info("computed by process %d on %s, device %s", os.getpid(), gethostname(), device)
    return adapt(model, unlabeled, recipe, runtime, checkpoint_dir=staging, **kwargs)
