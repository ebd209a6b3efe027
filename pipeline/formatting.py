"""Numbers as reports print them, by kind: the one place that decides how a metric, a count, a duration,
a rate or a p-value reads (`mpr eval`'s table, `mpr run`'s report.md, the commands' end-of-run summaries)."""

from __future__ import annotations

from typing import Literal

Kind = Literal["metric", "delta", "count", "seconds", "rate", "p"]


def number(value: float | None, kind: Kind) -> str:
    """`value` as its kind reads; None is "-".

    metric 0.1235 (4 decimals), delta +0.0123, count 1,234 (rounded), seconds 12.3 s / 2 min 05 s /
    1 h 02 min, rate 12.3/s, p <0.0001 below 1e-4, else 4 decimals.
    """
    if value is None:
        return "-"
    if kind == "metric":
        return f"{value:.4f}"
    if kind == "delta":
        return f"{value:+.4f}"
    if kind == "count":
        return f"{round(value):,}"
    if kind == "rate":
        return f"{value:,.1f}/s"
    if kind == "p":
        return "<0.0001" if value < 1e-4 else f"{value:.4f}"
    if value < 59.95:
        return f"{value:.1f} s"
    whole = round(value)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    minutes = round(value / 60)
    return f"{minutes // 60:,} h {minutes % 60:02d} min"


def p_clause(value: float) -> str:
    """A p-value inside a sentence: "p = 0.0123", or "p <0.0001"."""
    text = number(value, "p")
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def kind_of(key: str, value: float) -> Kind:
    """The kind of a stage summary's number, from its key: `seconds` and `*_seconds` are durations,
    `*_per_s` rates, whole numbers counts, anything else (a share, a mean) a metric."""
    if key == "seconds" or (key.endswith(("_seconds", "_s")) and not key.endswith("per_s")):
        return "seconds"
    if key.endswith("per_s"):
        return "rate"
    if isinstance(value, int) or float(value).is_integer():
        return "count"
    return "metric"


def summary_value(key: str, value: float) -> str:
    return number(value, kind_of(key, value))
