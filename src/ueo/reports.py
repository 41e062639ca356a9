"""Human-readable summaries of metrics: terminal tables and Markdown."""

from __future__ import annotations

from ueo.metrics import METRIC_NAMES


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
    return "\n".join(lines)
