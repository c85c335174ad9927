"""Before/after metric tables with deltas."""

from __future__ import annotations

import math
from typing import Any

# Metrics where a smaller value is the better one; every other metric improves upward.
_LOWER_IS_BETTER = ("loss", "perplexity")


def lower_is_better(name: str) -> bool:
    return any(part in name for part in _LOWER_IS_BETTER)


def _scalar(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return v


def compare_rows(
    before: dict[str, Any], after: dict[str, Any]
) -> list[tuple[str, float | None, float | None, float | None]]:
    """(metric, before, after, after - before) for every scalar metric in either dict.

    Order: `before`'s keys, then keys only `after` has. Nested values (per-class details,
    confusion matrices) are left to the report. A metric missing on one side has no delta.
    """
    names = list(before) + [k for k in after if k not in before]
    rows = []
    for name in names:
        b, a = _scalar(before.get(name)), _scalar(after.get(name))
        if b is None and a is None:
            continue
        delta = a - b if a is not None and b is not None else None
        rows.append((name, b, a, delta))
    return rows


def fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, int):  # counts, e.g. tokens
        return f"{v:+,d}" if signed else f"{v:,d}"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def verdict(name: str, delta: float | None) -> str:
    """'better', 'worse' or '' (no change or no delta), knowing which way the metric improves."""
    if not delta:
        return ""
    improved = delta < 0 if lower_is_better(name) else delta > 0
    return "better" if improved else "worse"


def compare(
    before: dict[str, Any], after: dict[str, Any], names: tuple[str, str] = ("before", "after")
) -> str:
    """A plain-text table of the metrics side by side with deltas, ready to print."""
    header = ("metric", names[0], names[1], "delta", "")
    body = [
        (name, fmt(b), fmt(a), fmt(d, signed=True), verdict(name, d))
        for name, b, a, d in compare_rows(before, after)
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = []
    for r in [header, *body]:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:4], widths[1:4], strict=True)
        ]
        lines.append("  ".join(cells + [r[4]]).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths[:4]))
    return "\n".join(lines)


def metrics_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of one model's scalar metrics."""
    rows = [(name, fmt(v)) for name, _, v, _ in compare_rows({}, metrics)]
    width = max((len(n) for n, _ in rows), default=0)
    return "\n".join(f"{n.ljust(width)}  {v}" for n, v in rows)
