"""Human-readable summaries of metrics: terminal tables and Markdown."""

from __future__ import annotations

from ueo.metrics import METRIC_NAMES

# The label-free scores a report shows (the controls that restate an objective stay in
# metrics.json): the ranking score first.
SHOWN_SCORES = {
    "nuclear": "nuclear",
    "class_ami": "ClassAMI",
    "snd": "SND",
    "agreement": "agree-ZS",
    "mcm_split": "MCM-split",
    "rejected": "rejected",
}


def fmt(value: float | None, digits: int = 1) -> str:
    """Percent with `digits` decimals; '-' where a metric is undefined."""
    return "-" if value is None else f"{100 * value:.{digits}f}"


def metrics_table(record: dict) -> str:
    """Rows = (phase, set), columns = metrics, in percent."""
    header = f"{'':<22}" + "".join(f"{m.upper():>8}" for m in METRIC_NAMES)
    lines = [header]
    for phase in ("zeroshot", "adapted"):
        for name, metrics in (record.get(phase) or {}).items():
            if metrics is None:
                lines.append(f"{phase + ' ' + name:<22}  (no labels)")
                continue
            cells = "".join(f"{fmt(metrics.get(m)):>8}" for m in METRIC_NAMES)
            lines.append(f"{phase + ' ' + name:<22}{cells}")
    scores = record.get("label_free")
    if scores:
        from ueo.diagnose import verdict

        lines += ["", label_free_header("label-free, unlabeled", 22)]
        for phase in ("zeroshot", "adapted"):
            lines.append(f"{phase:<22}{label_free_cells(scores[phase])}")
        lines.append(verdict(scores["zeroshot"], scores["adapted"]))
    return "\n".join(lines)


def label_free_header(title: str, width: int) -> str:
    return f"{title:<{width}}" + "".join(f"{name:>10}" for name in SHOWN_SCORES.values())


def label_free_cells(scores: dict) -> str:
    """The shown scores, 4 significant digits; the rejected share in percent."""
    cells = []
    for key in SHOWN_SCORES:
        value = scores.get(key)
        if value is None:
            cells.append(f"{'-':>10}")
        elif key == "rejected":
            cells.append(f"{fmt(value) + '%':>10}")
        else:
            cells.append(f"{value:>10.4g}")
    return "".join(cells)


def diagnose_report(result: dict) -> str:
    """`ueo diagnose`: the candidates ranked, which to keep and how sure that is."""
    from ueo.diagnose import rank_title

    width = max(len(c.name) for c in result["ranked"]) + 2
    head = f"{'':<3}{'candidate':<{width}}{'method':<12}{'seed':>6}{'epoch':>6}"
    lines = [
        f"Label-free scores of the unlabeled images, ranked by the {rank_title()} "
        "(docs/diagnostics.md):",
        head + label_free_header("", 0),
    ]
    for i, c in enumerate(result["ranked"], 1):
        seed = "-" if c.seed is None else str(c.seed)
        lines.append(
            f"{i:<3}{c.name:<{width}}{c.method:<12}{seed:>6}{c.epoch:>6}"
            + label_free_cells(c.scores)
        )
    keep = result["keep"]
    what = (
        "the zero-shot model (no adapter)"
        if keep.method == "zeroshot"
        else (f"{keep.name} ({keep.method}, epoch {keep.epoch})")
    )
    if "runner_up" in result:
        lines.append(
            f"keep: {what}: its {rank_title()} is {result['gap']:.1f}% above the next, "
            f"{result['runner_up'].name}; {result['trust']}."
        )
    else:
        lines.append(f"keep: {what}, the only candidate.")
    for difference in result.get("differences", []):
        lines.append(f"note: the runs differ in {difference}")
    for peak in result["peaks"]:
        lines.append(
            f"note: {peak.name} scored higher at epoch {peak.epoch} than at its end; its adapter "
            "holds the last epoch (a run of that many epochs has another schedule)."
        )
    return "\n".join(lines)
