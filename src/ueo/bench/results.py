"""Tables and plots of a sweep: results.csv, results.json, results.md and PNG figures.

Numbers come from each cell's metrics.json (the held-out test set unless said otherwise), so
the report can be rebuilt at any time from the run directories.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

import numpy as np

from ueo.bench.plots import (
    CURVE_METRICS,
    METRIC_TITLES,
    TABLE_METRICS,
    curve_plot,
    method_plot,
    score_plot,
)
from ueo.diagnostics import SCORE_KEYS, SCORES
from ueo.files import write_json, write_text
from ueo.metrics import METRIC_NAMES
from ueo.provenance import differences as differences_of
from ueo.reports import fmt

SETS = ("test", "unlabeled")
MISSING_SHOWN = 10  # missing cells named in results.md


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def rows(results: list) -> list[dict]:
    """One flat row per cell: identifiers, then every metric of every evaluated set."""
    out = []
    for cell, record in results:
        row = {
            "domain": cell.domain,
            "scenario": cell.scenario,
            "method": cell.method,
            "seed": cell.seed,
        }
        for s in SETS:
            metrics = (record["adapted"] or {}).get(s) or {}
            row.update({f"{s}_{m}": metrics.get(m) for m in METRIC_NAMES})
        row["wall_time_s"] = record.get("wall_time_s")
        row["skipped_images"] = record.get("skipped_images")
        out.append(row)
    return out


def summary(results: list, settings: dict, metric_set: str = "test") -> dict:
    """{"mean": {scenario: {method: metrics}}, "domains": {domain: {scenario: {method: ...}}}}.

    Seeds are averaged within a domain; "mean" averages the domains.
    """
    per: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for cell, record in results:
        per[cell.domain][cell.scenario][cell.method].append(record["adapted"][metric_set])
    domains = {
        d: {
            s: {
                m: {k: _mean([r[k] for r in runs]) for k in METRIC_NAMES}
                for m, runs in methods.items()
            }
            for s, methods in scenarios.items()
        }
        for d, scenarios in per.items()
    }
    mean: dict = {}
    for cell, _ in results:
        if cell.method not in mean.setdefault(cell.scenario, {}):
            cells = [
                v[cell.scenario][cell.method]
                for v in domains.values()
                if cell.method in v.get(cell.scenario, {})
            ]
            mean[cell.scenario][cell.method] = {
                k: _mean([c[k] for c in cells]) for k in METRIC_NAMES
            }
    return {"mean": mean, "domains": domains, "settings": settings}


def learning_curves(
    results: list, metric_set: str = "test", keys: tuple[str, ...] = CURVE_METRICS
) -> dict:
    """{scenario: {method: {epoch: {key: value}}}} from the cells' `curves` (--eval-every):
    `keys` of the `metric_set` ("test", "unlabeled", or "label_free" for the label-free scores).

    As in `summary`, seeds are averaged within a domain, then domains are averaged. A scenario
    appears only when some cell was evaluated between epoch 0 (zero-shot) and its last epoch.
    """
    per: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    inner: set[str] = set()
    for cell, record in results:
        points = record.get("curves") or []
        last = max((p["epoch"] for p in points), default=0)
        if any(0 < p["epoch"] < last for p in points):
            inner.add(cell.scenario)
        for p in points:
            if p.get(metric_set):
                per[cell.scenario][cell.method][p["epoch"]][cell.domain].append(p[metric_set])
    out: dict = {}
    for scenario in (s for s in per if s in inner):
        out[scenario] = {}
        for method, epochs in per[scenario].items():
            out[scenario][method] = {
                epoch: {
                    k: _mean([_mean([r.get(k) for r in runs]) for runs in domains.values()])
                    for k in keys
                }
                for epoch, domains in sorted(epochs.items())
            }
    return out


def markdown(
    results: list,
    title: str,
    metric_set: str = "test",
    missing: list[str] = (),
    differences: list[str] = (),
) -> str:
    """The paper's layout: per scenario and metric, rows = methods, columns = domains + Avg.

    `missing`: the grid's cells without a result (named under the title); `differences`: what
    the cells' software or hardware differ in (ueo.provenance), said under it too."""
    table: dict = defaultdict(list)
    for cell, record in results:
        table[(cell.scenario, cell.method, cell.domain)].append(record["adapted"][metric_set])
    scenarios = list(dict.fromkeys(c.scenario for c, _ in results))
    methods = list(dict.fromkeys(c.method for c, _ in results))
    domains = list(dict.fromkeys(c.domain for c, _ in results))
    seeds = sorted({c.seed for c, _ in results})
    lines = [
        f"# {title}",
        "",
        f"{metric_set.capitalize()} set, in percent; {len(seeds)} seed(s) "
        f"({', '.join(map(str, seeds))}){'; mean ± std over seeds' if len(seeds) > 1 else ''}."
        " '-' = undefined (no OOD sample for AUROC).",
        "",
    ]
    if missing:
        shown = ", ".join(missing[:MISSING_SHOWN])
        more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
        lines += [
            f"**Incomplete**: {len(missing)} of the grid's {len(missing) + len(results)} cells "
            f"have no result yet ({shown}{more}; results.json lists them all).",
            "",
        ]
    if differences:
        lines += [
            "**Made with different software or hardware**: "
            + "; ".join(differences)
            + " (results.json: `differences`).",
            "",
        ]
    for s in scenarios:
        for metric in TABLE_METRICS:
            lines += [
                f"## {s} — {METRIC_TITLES[metric]}",
                "",
                "| method | " + " | ".join(domains) + " | Avg |",
                "|---|" + "---:|" * (len(domains) + 1),
            ]
            for m in methods:
                cells, avgs = [], []
                for d in domains:
                    vals = [r[metric] for r in table.get((s, m, d), []) if r[metric] is not None]
                    cells.append(_pm(vals))
                    avgs.append(float(np.mean(vals)) if vals else None)
                avg = _mean(avgs) if all(a is not None for a in avgs) else None
                lines.append(f"| {m} | " + " | ".join(cells) + f" | {fmt(avg)} |")
            lines.append("")
    return "\n".join(lines)


def _score_title(score) -> str:
    """A panel's title: the score, which way is better, and whether it is a control."""
    better = {True: "higher is better", False: "lower is better", None: "information"}
    control = ", restates an objective" if score.kind == "control" else ""
    return f"{score.title} ({better[score.higher_is_better]}{control})"


def _pm(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(float(np.mean(values)))} ± {100 * float(np.std(values)):.1f}"


def write_csv(path: Path, table: list[dict]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]) if table else ["domain"])
    writer.writeheader()
    writer.writerows(table)
    return write_text(path, buf.getvalue())


def write_report(
    results: list, out: Path, title: str, settings: dict, missing: list[str] = ()
) -> dict[str, Path]:
    """results.csv, results.json, results.md and one plot per scenario, all from the cells;
    with learning curves (--eval-every), also ACC and AUROC against epochs per scenario, and
    the label-free scores of the unlabeled set against epochs. `missing` names the grid's
    cells without a result (results.json "missing", results.md)."""
    out.mkdir(parents=True, exist_ok=True)
    missing = list(missing)
    written = {"csv": write_csv(out / "results.csv", rows(results))}
    data = summary(results, settings)
    data["curves"] = learning_curves(results)
    data["label_free_curves"] = learning_curves(results, "label_free", SCORE_KEYS)
    data["missing"] = missing
    environments = [record.get("environment") for _, record in results]
    data["environment"] = environments[0]
    data["differences"] = differences_of(environments, [cell.name for cell, _ in results])
    written["json"] = write_json(out / "results.json", data)
    text = markdown(results, title, missing=missing, differences=data["differences"])
    written["md"] = write_text(out / "results.md", text + "\n")
    (out / "plots").mkdir(exist_ok=True)
    for s in data["mean"]:
        written[f"plot_{s}"] = method_plot(data["mean"], s, out / "plots" / f"{s}.png")
    for s, lines in data["curves"].items():
        written[f"curves_{s}"] = curve_plot(lines, s, out / "plots" / f"curves_{s}.png")
    titles = {x.key: _score_title(x) for x in SCORES}
    for s, lines in data["label_free_curves"].items():
        path = out / "plots" / f"label_free_{s}.png"
        written[f"label_free_{s}"] = score_plot(lines, s, titles, path)
    return written
