"""How far each label-free score (ueo.diagnostics) can be trusted: checked against the truth.

Runs the demo's grid (bundled ueo-tiny-rn on the offline testbed: 4 domains x 4 scenarios x 7
methods) with an evaluation after every epoch, then treats every evaluation as a checkpoint
and asks of each score, within each task (a domain and scenario: one unlabeled set):

* Spearman and Kendall correlation with the true ACC, AUROC and H-score of the test set,
  per domain (mean over its scenarios), over all tasks, and pooled over every checkpoint;
* the weighted Spearman correlation of Musgrave et al. (2022), which weights each checkpoint
  by the larger of its normalised score rank and accuracy rank, squared;
* the regret of keeping the checkpoint the score ranks first (true best minus true of the
  pick, in points), beside three rules that use no score;
* how often the sign of the score's change from zero-shot matches the sign of the true change,
  over the adapted runs' final checkpoints (what the verdict line of `ueo adapt` states);
* which method each score would keep, against the truth (controls restate an objective).

    PYTHONPATH=src python benchmarks/diagnostics_check.py --out runs/diagnostics-check

The grid resumes like `ueo demo`: rerunning reuses finished cells. `--analyse-only` reads
the cells of an earlier run. docs/diagnostics.md holds the tables and the commit they were
measured at.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau, rankdata, spearmanr

from ueo.bench.protocol import SCENARIOS
from ueo.diagnostics import SCORES, score_info

TRUTH = ("acc", "auroc", "h")
SELECTION_TRUTH = ("acc", "h")
GAP_BINS = (0.0, 0.5, 1.0, 2.0, 5.0, math.inf)  # relative score gaps of a pair, in percent


def weighted_rank(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted mid-ranks: the weight of the smaller values plus half the tied group's weight
    scaled as WeightedCorr does ((count + 1) / 2 x the group's mean weight)."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    group = np.bincount(inverse, weights=w, minlength=len(values))
    below = np.cumsum(group) - group
    return (below + (counts + 1) / 2 * group / counts)[inverse]


def weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    mx, my = np.average(x, weights=w), np.average(y, weights=w)
    cov = np.average((x - mx) * (y - my), weights=w)
    vx, vy = np.average((x - mx) ** 2, weights=w), np.average((y - my) ** 2, weights=w)
    return float(cov / math.sqrt(vx * vy)) if vx > 0 and vy > 0 else float("nan")


def weighted_spearman(score: np.ndarray, truth: np.ndarray, power: float = 2.0) -> float:
    """Musgrave et al. (2022)'s weighted Spearman correlation of validation scores with
    accuracies: weights max(dense rank of score, dense rank of truth, each divided by its
    largest)^power, then the Pearson correlation of the weighted ranks (their code:
    powerful-benchmarker validator_tests/utils/weighted_spearman.py, power 2, with the
    WeightedCorr package). No library offers it."""
    score, truth = np.asarray(score, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    v = rankdata(score, method="dense")
    t = rankdata(truth, method="dense")
    w = np.maximum(v / v.max(), t / t.max()) ** power
    return weighted_pearson(weighted_rank(score, w), weighted_rank(truth, w), w)


def oriented(key: str, values: np.ndarray) -> np.ndarray:
    """Values turned so that higher means better, as the score's declared direction says."""
    return values if score_info(key).higher_is_better is not False else -values


def regret(score: np.ndarray, truth: np.ndarray) -> float:
    """Points lost by keeping the checkpoint the (oriented) score ranks first; ties: the
    first checkpoint in order (zero-shot comes first)."""
    return 100 * float(truth.max() - truth[int(np.argmax(score))])


# ----------------------------------------------------------------------------- the data


def load_checkpoints(out: Path) -> list[dict]:
    """One row per evaluation: task, method, seed, epoch, true test metrics, scores.

    The zero-shot cell gives each task's epoch-0 checkpoint; an adapted cell's epoch 0 is the
    same zero-shot model and is not counted again."""
    rows, zero_shot = [], set()
    for path in sorted(out.glob("runs/*/*/*/seed*/metrics.json")):
        record = json.loads(path.read_text())
        cell = record["cell"]
        if cell["method"] == "zeroshot":
            if (cell["domain"], cell["scenario"]) in zero_shot:
                continue  # the same model for every seed: one checkpoint
            zero_shot.add((cell["domain"], cell["scenario"]))
        last = max(p["epoch"] for p in record["curves"])
        for point in record["curves"]:
            if point["epoch"] == 0 and cell["method"] != "zeroshot":
                continue
            rows.append(
                {
                    "domain": cell["domain"],
                    "scenario": cell["scenario"],
                    "method": cell["method"],
                    "seed": cell["seed"],
                    "epoch": point["epoch"],
                    "final": point["epoch"] == last,
                    **{m: point["test"][m] for m in TRUTH},
                    **{k: point["label_free"][k] for k in point["label_free"]},
                }
            )
    if not rows:
        raise SystemExit(f"no cells with label-free scores under {out}/runs")
    return rows


def tasks_of(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    tasks: dict = defaultdict(list)
    for r in rows:
        tasks[r["domain"], r["scenario"]].append(r)
    return dict(tasks)


def column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=np.float64)


def _corr(fn, x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    return float(fn(x[ok], y[ok])[0]) if fn is not weighted_spearman else fn(x[ok], y[ok])


# ----------------------------------------------------------------------------- the check


def correlations(rows: list[dict]) -> dict:
    """{score: {metric: {"spearman"|"kendall"|"weighted": {domain or scenario: mean over its
    tasks, "all": mean, "pooled": value}}}}, correlations of the raw score (not oriented)."""
    tasks = tasks_of(rows)
    groups = sorted({d for d, _ in tasks}) + sorted({sc for _, sc in tasks})
    out: dict = {}
    for s in SCORES:
        out[s.key] = {}
        for m in TRUTH:
            entry: dict = {}
            for name, fn in (("spearman", spearmanr), ("kendall", kendalltau), ("weighted", None)):
                fn = fn or weighted_spearman
                per_task = {t: _corr(fn, column(r, s.key), column(r, m)) for t, r in tasks.items()}
                values = {d: _nanmean([v for t, v in per_task.items() if d in t]) for d in groups}
                values["all"] = _nanmean(list(per_task.values()))
                values["pooled"] = _corr(fn, column(rows, s.key), column(rows, m))
                entry[name] = values
            out[s.key][m] = entry
    return out


def selection(rows: list[dict]) -> dict:
    """Regret of keeping each score's first checkpoint, per task, and three rules without a
    score: always zero-shot, always UEO's last epoch, a checkpoint at random (expected)."""
    tasks = tasks_of(rows)
    out: dict = {}
    for s in SCORES:
        if s.higher_is_better is None:
            continue
        per = {m: [] for m in SELECTION_TRUTH}
        picks = []
        for r in tasks.values():
            score = oriented(s.key, column(r, s.key))
            score = np.where(np.isfinite(score), score, -np.inf)
            picks.append(r[int(np.argmax(score))])
            for m in SELECTION_TRUTH:
                per[m].append(regret(score, column(r, m)))
        out[s.key] = {
            **{f"regret_{m}": float(np.mean(v)) for m, v in per.items()},
            **{f"worst_regret_{m}": float(np.max(v)) for m, v in per.items()},
            "picked_zeroshot": sum(p["method"] == "zeroshot" for p in picks),
            "tasks": len(picks),
        }
    rules = {
        "always zero-shot": lambda r: [x["method"] == "zeroshot" for x in r],
        "UEO's last epoch": lambda r: [x["method"] == "ueo" and x["final"] for x in r],
    }
    for name, rule in rules.items():
        out[name] = {
            f"regret_{m}": _nanmean(
                [100 * (column(r, m).max() - column(r, m)[rule(r)].mean()) for r in tasks.values()]
            )
            for m in SELECTION_TRUTH
        }
    out["random checkpoint"] = {
        f"regret_{m}": float(
            np.mean([100 * (column(r, m).max() - column(r, m).mean()) for r in tasks.values()])
        )
        for m in SELECTION_TRUTH
    }
    return out


def sign_agreement(rows: list[dict]) -> dict:
    """Over every adapted run's final checkpoint: how often sign(score change from zero-shot,
    oriented) equals sign(true change), for ACC and H; `helped` is the share of runs whose
    truth rose (what a score that always rises would match)."""
    zero = {(r["domain"], r["scenario"]): r for r in rows if r["method"] == "zeroshot"}
    finals = [r for r in rows if r["final"] and r["method"] != "zeroshot"]
    out: dict = {"runs": len(finals)}
    for m in SELECTION_TRUTH:
        truth = np.array([r[m] - zero[r["domain"], r["scenario"]][m] for r in finals])
        out[f"helped_{m}"] = float(np.mean(truth > 0))
        out[f"hurt_{m}"] = int(np.sum(truth < 0))
    for s in SCORES:
        if s.higher_is_better is None:
            continue
        change = oriented(
            s.key,
            np.array(
                [_num(r[s.key]) - _num(zero[r["domain"], r["scenario"]][s.key]) for r in finals]
            ),
        )
        out[s.key] = {}
        for m in SELECTION_TRUTH:
            truth = np.array([r[m] - zero[r["domain"], r["scenario"]][m] for r in finals])
            ok = np.isfinite(change)
            out[s.key][m] = float(np.mean(np.sign(change[ok]) == np.sign(truth[ok])))
            hurt = ok & (truth < 0)
            out[s.key][f"fell_when_{m}_fell"] = (
                float(np.mean(change[hurt] < 0)) if hurt.any() else None
            )
    return out


def pair_concordance(rows: list[dict], truth: str = "h") -> dict:
    """How often a score orders two checkpoints of a task as the truth does, by how far apart
    their scores are (relative gap, percent of the smaller magnitude): what `ueo diagnose`
    says about its own sureness. Pairs with equal truth are left out."""
    out: dict = {}
    for s in SCORES:
        if s.higher_is_better is None:
            continue
        hits = np.zeros(len(GAP_BINS) - 1)
        counts = np.zeros(len(GAP_BINS) - 1)
        for r in tasks_of(rows).values():
            x, y = oriented(s.key, column(r, s.key)), column(r, truth)
            i, j = np.triu_indices(len(r), k=1)
            ok = np.isfinite(x[i]) & np.isfinite(x[j]) & (y[i] != y[j])
            i, j = i[ok], j[ok]
            gap = (
                100
                * np.abs(x[i] - x[j])
                / np.maximum(np.minimum(np.abs(x[i]), np.abs(x[j])), 1e-12)
            )
            agree = np.sign(x[i] - x[j]) == np.sign(y[i] - y[j])
            b = np.digitize(gap, GAP_BINS[1:-1])
            np.add.at(counts, b, 1)
            np.add.at(hits, b, agree)
        out[s.key] = {
            "bins": [list(GAP_BINS[k : k + 2]) for k in range(len(GAP_BINS) - 1)],
            "pairs": counts.astype(int).tolist(),
            "concordant": [float(h / c) if c else None for h, c in zip(hits, counts, strict=True)],
        }
    return out


def method_picks(rows: list[dict]) -> dict:
    """Per score, how many tasks (and seeds) it would keep each method's final checkpoint in,
    comparing final checkpoints and zero-shot only; and the same for the true H and ACC."""
    groups: dict = defaultdict(list)
    for r in rows:
        if r["final"] and r["method"] != "zeroshot":
            groups[r["domain"], r["scenario"], r["seed"]].append(r)
    zero = {(r["domain"], r["scenario"]): r for r in rows if r["method"] == "zeroshot"}
    out: dict = {}
    keys = [(s.key, s.key) for s in SCORES if s.higher_is_better is not None]
    keys += [("true H", "h"), ("true ACC", "acc")]
    for name, key in keys:
        counts: dict = defaultdict(int)
        agree = 0
        for (d, sc, _), r in groups.items():
            r = [zero[d, sc], *(x for x in r if x["method"] != "zeroshot")]
            values = column(r, key)
            values = values if name.startswith("true") else oriented(key, values)
            pick = r[int(np.nanargmax(values))]["method"]
            counts[pick] += 1
            best_h = r[int(np.nanargmax(column(r, "h")))]["method"]
            agree += pick == best_h
        out[name] = {"counts": dict(counts), "same_as_true_h": agree, "groups": len(groups)}
    return out


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _nanmean(values: list[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


# ----------------------------------------------------------------------------- tables


def _f(v, digits: int = 2) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def markdown(result: dict) -> str:
    corr, sel, sign, picks = (
        result["correlations"],
        result["selection"],
        result["signs"],
        result["picks"],
    )
    groups = [g for g in corr[SCORES[0].key]["acc"]["spearman"] if g not in ("all", "pooled")]
    domains = [g for g in groups if g not in SCENARIOS]
    scenarios = [g for g in groups if g in SCENARIOS]
    arrow = {True: "higher", False: "lower", None: "info"}
    lines = [
        "### Correlation with the truth within a task (mean over the 16 tasks)",
        "",
        "Spearman rho / Kendall tau / Musgrave's weighted Spearman of the raw score with the "
        "test set's ACC, AUROC and H-score.",
        "",
        "| score | kind | better | ACC rho / tau / w | AUROC rho / tau / w | H rho / tau / w |",
        "|---|---|---|---|---|---|",
    ]
    for s in SCORES:
        cells = [
            " / ".join(_f(corr[s.key][m][k]["all"]) for k in ("spearman", "kendall", "weighted"))
            for m in TRUTH
        ]
        lines.append(
            f"| {s.title} | {s.kind} | {arrow[s.higher_is_better]} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "### Per domain and pooled (Spearman rho / Kendall tau)",
        "",
        "Per domain: mean over its four scenarios; all: mean over the 16 tasks; pooled: one "
        "correlation over every checkpoint of every task (scores compared across unlabeled sets).",
        "",
        "| score | truth | " + " | ".join(domains) + " | all | pooled |",
        "|---|---|" + "---|" * (len(domains) + 2),
    ]
    for s in SCORES:
        for m in TRUTH:
            c = corr[s.key][m]
            cells = [
                f"{_f(c['spearman'][d])} / {_f(c['kendall'][d])}"
                for d in [*domains, "all", "pooled"]
            ]
            lines.append(f"| {s.title} | {m.upper()} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Per scenario (Spearman rho with ACC / AUROC / H, mean over the four domains)",
        "",
        "| score | " + " | ".join(scenarios) + " |",
        "|---|" + "---|" * len(scenarios),
    ]
    for s in SCORES:
        cells = [" / ".join(_f(corr[s.key][m]["spearman"][sc]) for m in TRUTH) for sc in scenarios]
        lines.append(f"| {s.title} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Keeping the checkpoint a score ranks first",
        "",
        "Regret: true best minus true value of the kept checkpoint, in points, mean (worst) over "
        f"the {sel[SCORES[0].key]['tasks']} tasks. Sign: share of the {sign['runs']} adapted "
        "runs whose score moved from zero-shot in the direction of the truth (final epoch).",
        "",
        "| score | kind | regret ACC | regret H | kept zero-shot | sign ACC | sign H "
        "| fell when H fell |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in SCORES:
        if s.key not in sel:
            continue
        r, g = sel[s.key], sign[s.key]
        lines.append(
            f"| {s.title} | {s.kind} | {_f(r['regret_acc'], 1)} ({_f(r['worst_regret_acc'], 1)}) | "
            f"{_f(r['regret_h'], 1)} ({_f(r['worst_regret_h'], 1)}) | "
            f"{r['picked_zeroshot']}/{r['tasks']} | {_f(g['acc'])} | {_f(g['h'])} | "
            f"{_f(g['fell_when_h_fell'])} |"
        )
    for name in ("always zero-shot", "UEO's last epoch", "random checkpoint"):
        r = sel[name]
        lines.append(
            f"| *{name}* | rule | {_f(r['regret_acc'], 1)} | {_f(r['regret_h'], 1)} | | | | |"
        )
    lines.append(
        f"| *says 'helped' always* | rule | | | | {_f(sign['helped_acc'])} | "
        f"{_f(sign['helped_h'])} | 0.00 |"
    )
    lines += [
        "",
        f"Runs whose true ACC fell below zero-shot: {sign['hurt_acc']}; "
        f"whose H fell: {sign['hurt_h']}.",
        "",
        "### Which method each score would keep",
        "",
        "Final checkpoints and zero-shot of each (task, seed); counts of the method kept, and in "
        "how many groups that is the method with the best true H.",
        "",
    ]
    methods = sorted({m for p in picks.values() for m in p["counts"]})
    lines += [
        "| score | " + " | ".join(methods) + " | = best H |",
        "|---|" + "---|" * (len(methods) + 1),
    ]
    for name, p in picks.items():
        title = score_info(name).title if not name.startswith("true") else f"*{name}*"
        cells = [str(p["counts"].get(m, 0)) for m in methods]
        lines.append(
            f"| {title} | " + " | ".join(cells) + f" | {p['same_as_true_h']}/{p['groups']} |"
        )
    conc = result["concordance"]
    bins = next(iter(conc.values()))["bins"]
    names = [f"{lo:g}-{hi:g}%" if math.isfinite(hi) else f">{lo:g}%" for lo, hi in bins]
    lines += [
        "",
        "### Pairs of checkpoints ordered as the true H orders them, by score gap",
        "",
        "Every pair of checkpoints of a task with different true H; the gap is the relative "
        "difference of their scores. Cells: share of pairs in the truth's order (pairs).",
        "",
        "| score | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, c in conc.items():
        cells = [f"{_f(v)} ({n})" for v, n in zip(c["concordant"], c["pairs"], strict=True)]
        lines.append(f"| {score_info(key).title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def analyse(out: Path) -> dict:
    rows = load_checkpoints(out)
    return {
        "checkpoints": len(rows),
        "tasks": len(tasks_of(rows)),
        "correlations": correlations(rows),
        "selection": selection(rows),
        "signs": sign_agreement(rows),
        "picks": method_picks(rows),
        "concordance": pair_concordance(rows),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/diagnostics-check", help="the grid's folder")
    p.add_argument("--seeds", default="2023", help="comma list (default 2023)")
    p.add_argument("--analyse-only", action="store_true", help="read an earlier run's cells")
    p.add_argument("--json", default=None, help="also write the whole result as JSON here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not args.analyse_only:
        from ueo.demo.processes import start_part_server

        start_part_server()
        from ueo.demo.runner import run_demo
        from ueo.recipe import Runtime

        runtime = Runtime(device="cpu", workers=0, eval_every=1, progress=not args.quiet)
        start = time.perf_counter()
        run_demo(out, runtime=runtime, seeds=[int(s) for s in args.seeds.split(",")])
        print(f"grid: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    result = analyse(out)
    result["commit"] = _commit()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    print(
        f"{result['checkpoints']} checkpoints in {result['tasks']} tasks, "
        f"commit {result['commit']}\n"
    )
    print(markdown(result))
    return 0


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
