"""What determines a cell's numbers (its fingerprint), whether a finished cell can be reused,
and whether an interrupted one can be resumed: a cell made with other settings or data is
recomputed, saying what changed."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ueo.bench.plan import Cell, Suite, Sweep, plan
from ueo.bench.scores import SCORES_FILE
from ueo.checkpoint import load_checkpoint
from ueo.errors import UeoError
from ueo.fingerprint import describe_changes, digest, run_identity
from ueo.layout import CHECKPOINT_FILE, METRICS_FILE
from ueo.model import UeoModel
from ueo.recipe import Recipe

log = logging.getLogger("ueo")


def cell_components(suite: Suite, sweep: Sweep, cell: Cell) -> dict:
    """What determines a cell's numbers: its whole recipe, the model and its weights, the
    suite's class names in order, the scenario's class split and the cell's images."""
    names, unlabeled, test = suite.scenario_sets(suite.domain(cell.domain), cell.scenario)
    run = run_identity(
        sweep.model, sweep.pretrained, names, sweep.cell_recipe(cell), unlabeled, test
    )
    return {
        **run,
        "class_names": list(suite.class_names),
        "split": {k: list(v) for k, v in suite.splits[cell.scenario].items()},
        "known_classes": names,
    }


def cell_fingerprint(suite: Suite, sweep: Sweep, cell: Cell) -> str:
    return digest(cell_components(suite, sweep, cell))


def is_done(cell: Cell, out: Path, components: dict) -> bool:
    """Complete and made with the same components; anything else is (re)computed, and a cell
    made with other settings says which."""
    metrics, scores = cell.path(out) / METRICS_FILE, cell.path(out) / SCORES_FILE
    if not (metrics.is_file() and scores.is_file()):
        return False
    try:
        record = json.loads(metrics.read_text())
        made_with = record["cell_fingerprint"]
    except (ValueError, KeyError):
        return False
    if made_with != digest(components):
        changes = describe_changes(record.get("cell_fingerprint_components", {}), components)
        log.warning(
            "%s was made with other settings or data (%s); recomputing it",
            cell.path(out),
            "; ".join(changes) or "an older ueo",
        )
        return False
    return True


def status(suite: Suite, sweep: Sweep, out: str | Path) -> list[tuple[Cell, bool]]:
    """The plan with what already exists (for --dry-run)."""
    return [
        (c, is_done(c, Path(out), cell_components(suite, sweep, c))) for c in plan(suite, sweep)
    ]


def resumable(staging: Path, model: UeoModel, recipe: Recipe, unlabeled, test) -> bool:
    """Whether a cell's interrupted run can be continued; one made with other settings or
    data is discarded, saying what changed."""
    path = staging / CHECKPOINT_FILE
    if not path.is_file():
        if staging.exists():
            shutil.rmtree(staging)
        return False
    current = run_identity(
        model.clip.model_name, model.clip.pretrained, model.class_names, recipe, unlabeled, test
    )
    try:
        stored = load_checkpoint(path)[1].get("identity") or {}
    except UeoError as exc:
        log.warning("%s; starting the cell over", exc)
        stored = {}
    changes = describe_changes(stored, current)
    if changes:
        log.warning("Discarding %s, made with other settings: %s", path, "; ".join(changes))
        shutil.rmtree(staging)
        return False
    return True
