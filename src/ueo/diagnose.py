"""Which run to keep, without labels: runs compared by their label-free scores (`ueo diagnose`).

The runs' metrics.json files hold the label-free scores of every evaluation (ueo.diagnostics).
Candidates are the zero-shot model and each run's adapted model (what its adapter holds);
evaluations in between (`--eval-every`) are reported when they scored higher than their run's
end. The ranking score and how sure a ranking is come from the check on the demo's grid
(docs/diagnostics.md): there the nuclear norm tracked the true ACC and H best of the scores
that do not restate a training objective, and `SURENESS` is how often it ordered two
checkpoints as their true H did, by how far apart their scores were.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ueo.diagnostics import score_info
from ueo.errors import UeoError
from ueo.layout import METRICS_FILE
from ueo.provenance import differences

RANK_BY = "nuclear"
# (relative gap up to, in percent; share of the checkpoint pairs of a testbed task that the
# nuclear norm ordered as their true H; pairs): docs/diagnostics.md, "Pairs of checkpoints".
SURENESS = (
    (0.5, 0.72, 1453),
    (1.0, 0.84, 831),
    (2.0, 0.94, 1283),
    (5.0, 0.98, 2177),
    (float("inf"), 1.00, 1661),
)
NO_CLEAR_CHANGE = 0.5  # percent: this close, the testbed's pairs were ordered wrongly 1 in 4


@dataclass
class Candidate:
    """One model a user could keep: the zero-shot model or a run's adapted model."""

    name: str
    method: str
    seed: int | None
    epoch: int
    scores: dict
    saved: bool = True  # its adapter exists (or it is the zero-shot model)


def relative_gap(a: float, b: float) -> float:
    """How much higher `a` is than `b`, in percent of `b`'s magnitude."""
    return 100 * (a - b) / max(abs(b), 1e-12)


def sureness(gap: float) -> tuple[float, int]:
    """The testbed's share of correctly ordered pairs at this relative gap (percent), and how
    many pairs it was measured on."""
    return next((share, n) for limit, share, n in SURENESS if abs(gap) <= limit)


def trust(gap: float) -> str:
    """What the testbed says of a ranking by this gap, in words."""
    share, n = sureness(gap)
    apart = "this close" if abs(gap) <= NO_CLEAR_CHANGE else "this far apart"
    return (
        f"on the demo testbed, checkpoints {apart} were ordered as their true H in "
        f"{share:.0%} of {n} pairs"
    )


def verdict(zeroshot: dict, adapted: dict) -> str:
    """One line: did adaptation help, by the ranking score, and how far that can be trusted."""
    a, z = adapted.get(RANK_BY), zeroshot.get(RANK_BY)
    if a is None or z is None:
        return f"label-free verdict: none (no {rank_title()} for this set)"
    gap = relative_gap(a, z)
    if abs(gap) <= NO_CLEAR_CHANGE:
        head = f"no clear change: the {rank_title()} moved {gap:+.1f}% from zero-shot"
    else:
        moved = "rose" if gap > 0 else "fell"
        head = (
            f"adaptation probably {'helped' if gap > 0 else 'hurt'}: the {rank_title()} "
            f"{moved} {abs(gap):.1f}% from zero-shot"
        )
    return (
        f"label-free verdict: {head}; {trust(gap)} (docs/diagnostics.md). "
        "Labels alone can confirm it."
    )


def find_runs(paths: list[str | os.PathLike]) -> list[Path]:
    """metrics.json of each given run folder (or file); a folder without one stands for every
    run below it (a sweep's cells)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif (p / METRICS_FILE).is_file():
            found.append(p / METRICS_FILE)
        elif p.is_dir() and (below := sorted(p.rglob(METRICS_FILE))):
            found.extend(below)
        else:
            raise UeoError(f"{p} holds no ueo run (no {METRICS_FILE}).")
    return list(dict.fromkeys(found))


def read_run(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UeoError(f"{path} is not a readable metrics.json: {exc}") from None
    if "recipe" not in record:
        raise UeoError(f"{path} is not the metrics.json of an adaptation run.")
    if not record.get("label_free"):
        raise UeoError(
            f"{path} holds no label-free scores (made by an older ueo): run it again to compare."
        )
    return record


def compare_runs(paths: list[str | os.PathLike]) -> dict:
    """Rank the zero-shot model and every run's adapted model by `RANK_BY`; say which to keep
    and how sure that is, and in what software or hardware the runs differ. Runs must share
    their unlabeled images and class list."""
    files = find_runs(paths)
    records = [read_run(f) for f in files]
    _check_same_data(files, records)
    names = _short_names([f.parent for f in files])
    zero = records[0]["label_free"]["zeroshot"]
    candidates = [Candidate("zero-shot", "zeroshot", None, 0, zero)]
    peaks = []
    for name, record in zip(names, records, strict=True):
        recipe = record["recipe"]
        if recipe["method"] == "zeroshot" or not record.get("history"):
            continue
        end = Candidate(
            name,
            recipe["method"],
            recipe["seed"],
            recipe["epochs"],
            record["label_free"]["adapted"],
        )
        candidates.append(end)
        inner = [
            p
            for p in record.get("curves", [])
            if 0 < p["epoch"] < recipe["epochs"] and p.get("label_free")
        ]
        best = max(inner, key=lambda p: _value(p["label_free"]), default=None)
        if best is not None and _value(best["label_free"]) > _value(end.scores):
            peaks.append(
                Candidate(name, end.method, end.seed, best["epoch"], best["label_free"], False)
            )
    ranked = sorted(candidates, key=lambda c: _value(c.scores), reverse=True)
    keep = ranked[0]
    result = {"rank_by": RANK_BY, "ranked": ranked, "keep": keep, "peaks": peaks}
    result["differences"] = differences([r.get("environment") for r in records], names)
    if len(ranked) > 1:
        gap = relative_gap(_value(keep.scores), _value(ranked[1].scores))
        result.update(runner_up=ranked[1], gap=gap, trust=trust(gap))
    return result


def to_json(result: dict) -> dict:
    """`compare_runs`'s result as plain JSON-ready data."""

    def plain(value):
        if isinstance(value, list):
            return [plain(v) for v in value]
        return asdict(value) if isinstance(value, Candidate) else value

    return {k: plain(v) for k, v in result.items()}


def _value(scores: dict) -> float:
    value = scores.get(RANK_BY)
    return float("-inf") if value is None else value


def _check_same_data(files: list[Path], records: list[dict]) -> None:
    """Label-free scores rank models on one set of images: refuse runs on different data."""

    def data(record: dict) -> tuple:
        identity = record.get("identity") or {}
        return identity.get("unlabeled"), identity.get("class_names")

    first = data(records[0])
    for f, r in zip(files[1:], records[1:], strict=True):
        if data(r) != first or None in first:
            raise UeoError(
                f"{files[0].parent} and {f.parent} were not adapted on the same unlabeled "
                "images and classes: label-free scores compare runs on the same data only."
            )


def _short_names(folders: list[Path]) -> list[str]:
    """Run folders without their common prefix (the full path when there is one run)."""
    parts = [f.resolve().parts for f in folders]
    if len(parts) == 1:
        return [str(folders[0])]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return ["/".join(p[common:]) for p in parts]


def rank_title() -> str:
    return score_info(RANK_BY).title
